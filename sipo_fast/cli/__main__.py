"""``python -m sipo_fast.cli``: what ``accelerate launch -m sipo_fast.cli`` and ``torchrun -m`` run."""
import sys

from sipo_fast.cli import main

sys.exit(main())
