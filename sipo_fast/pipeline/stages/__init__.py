"""The stages of SIPO.md §3, one file each, in pipeline order; :data:`STAGES` is the order the runner follows.

- ``stage.py``: the shape every stage has (:class:`Stage`) and where its randomness comes from;
- ``align.py`` (stage 1), ``sample.py`` (2.1), ``refine.py`` (2.2, with its one-shot prompts in
  ``refine_prompts.py``), ``filter.py`` (2.3), ``finetune.py`` (3), ``evaluate.py`` (the evaluation);
- what stages share: ``generation.py`` (MOD generation, per-weight parts), ``rewards.py`` (implicit rewards of
  pairs), ``rules.py`` (the pure refine and filter rules, with worked examples).
"""
from __future__ import annotations

from .align import AlignStage
from .evaluate import EvalStage
from .filter import FilterStage
from .finetune import FinetuneStage
from .refine import RefineStage
from .sample import SampleStage
from .stage import Stage

STAGES: tuple[Stage, ...] = (AlignStage(), SampleStage(), RefineStage(), FilterStage(), FinetuneStage(), EvalStage())
