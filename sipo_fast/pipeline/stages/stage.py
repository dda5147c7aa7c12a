"""What every stage is: a small object of one shape (STYLE.md 7).

- ``name``: the stage's directory in the run directory and its key in ``manifest.json``;
- ``upstream``: the stages whose artifacts it reads (``inputs[name]`` is that stage's directory);
- ``config_keys``: the config values it reads (``PipelineConfig.get`` paths); with ``name``, ``version`` and the
  upstream artifacts' content hashes they make its fingerprint (:mod:`..rundir.directory`);
- ``version``: bumped when the code changes what the stage writes, so that old artifacts are redone;
- ``run(ctx, parts, inputs) -> summary``: writes the artifact into ``parts.work`` (resumable units through
  :class:`~..rundir.parts.Parts`) and returns the counts that go into ``stage.json``.

Randomness. No stage seeds or draws from the global RNG (the evaluation's ``run_eval`` seeds it only inside
``torch.random.fork_rng``, for outside generators that use it). The only random draws of a run are MOD
sampling in the sample stage (``sample.do_sample``) and the trainers': the sample stage decodes weight index wi
with a stream seeded :func:`sample_seed` ``(config.seed, wi)``, whose batch k the decoder seeds with
``sipo_fast.decoding.inputs.batch_seed(that seed, k)`` on a ``torch.Generator`` of its own; each trainer seeds
itself with ``TrainingArguments(seed=config.seed)`` before PEFT initialises its adapter. Greedy decoding,
scoring, soups, the filter and the evaluation draw nothing, so a resumed stage reproduces an uninterrupted one.
"""
from __future__ import annotations

from pathlib import Path

from ..context import Context
from ..rundir.parts import Parts


class Stage:
    name: str = ""
    upstream: tuple[str, ...] = ()
    config_keys: tuple[str, ...] = ()
    version: int = 1

    def run(self, ctx: Context, parts: Parts, inputs: dict[str, Path]) -> dict:
        raise NotImplementedError


def sample_seed(seed: int, weight_index: int) -> int:
    """The seed of the sample stage's stream at weight index ``weight_index`` of W in a run seeded ``seed``."""
    return seed + weight_index
