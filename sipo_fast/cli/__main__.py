"""``python -m sipo_fast.cli``: what ``accelerate launch -m sipo_fast.cli`` and ``torchrun -m`` run."""
import sys

from sipo_fast.cli import main
from sipo_fast.distributed import end_process

code = main()
end_process(code)  # a launched rank ends here, past the C++ teardown that can abort it (distributed.py)
sys.exit(code)
