"""What an evaluation sweeps over: held-out prompts and ground-truth scorers, by name."""
from __future__ import annotations

from typing import Sequence

# Scorers that need no download; the paper's beaver reward/cost models need local paths (--scorers
# beaver_reward:/path beaver_cost:/path), as does any hf:<model> reward model, so other sources have no default.
# The demo data's labels come from relevance (helpfulness stand-in) and tone (harmlessness stand-in), so its
# evaluation scores the same two.
DEFAULT_SCORERS = {"demo": ["relevance", "tone"]}


def heldout_prompts(source: str, num_prompts: int, *, split: str = "test", select: str = "first") -> list[str]:
    """``num_prompts`` distinct prompts of ``source``'s ``split`` chosen by ``select`` (never trained on);
    :func:`sipo_fast.data.prompts.heldout_prompts`."""
    from sipo_fast.data.prompts import heldout_prompts as load

    return load(source, num_prompts, split=split, select=select)


def build_scorers(specs: Sequence[str]):
    """Scorers from spec strings: ``name``, ``name:path``, ``hf:<model>[#label]`` or ``module:Class(...)``
    (``sipo_fast.scoring.get_scorer``)."""
    from sipo_fast.scoring import get_scorer

    return [get_scorer(str(spec)) for spec in specs]
