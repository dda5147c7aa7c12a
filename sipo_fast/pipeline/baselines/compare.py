"""Compare SIPO with the baselines on one pipeline run directory: :func:`evaluate_run` (``sipo-fast eval
--run-dir``, the pipeline's evaluation stage, benchmarks/pareto_demo.py).

Methods (SIPO.md §4), all swept over the same weights, prompts and scorers:

- ``sipo``: MOD over the fine-tuned policies (``finetune/policies``), i.e. SIPO + MOD.
- ``mod``: MOD over the stage-1 policies (``align/policies``).
- ``soups``: DPO soups of the stage-1 policies, exact LoRA ΔW interpolation (:func:`sipo_fast.merging.lora_soup`).
- ``soups_ab``: the authors' A/B interpolation (:func:`sipo_fast.merging.lora_soup_ab`), inexact.
- ``modpo``: one MODPO model per weight, trained like stage 1 on the first objective's pairs with the other
  objectives' stage-1 implicit rewards as margins (:mod:`.trained`).
- ``dpo_lw``: one DPO LW model per weight, trained like stage 1 on the w-weighted sum of the objectives' DPO
  losses (:mod:`.trained`).

This is the part of the evaluation that knows run directories: which stage artifacts a method needs, the
sweep fingerprints (the run directory's own :func:`~.rundir.stable_hash` over the manifest's artifact hashes)
and the baselines that train. The sweeps, scoring, statistics and report are :mod:`sipo_fast.eval`'s pure
functions over given policies.

Everything lands in ``<run_dir>/comparison/`` (outside the pipeline's hashed stage directories):
``sweeps/<method>.json`` (reused when prompts, weights, decoding settings and the input artifacts are
unchanged), ``modpo/<key>/w<w>/`` and ``dpo_lw/<key>/w<w>/`` adapters, ``scores.sqlite`` (the scoring cache),
``report.md`` and ``report.png``.
The report's notes explain the run: conflict ratio of the training data, how many candidates survived the
filter, and whether the survivors really beat both originals under the ground-truth scorers.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from sipo_fast.distributed import current
from sipo_fast.eval.cache import ScoreCache, TextCache
from sipo_fast.eval.inputs import DEFAULT_SCORERS, build_scorers
from sipo_fast.eval.report import diagnostics_markdown, write_report
from sipo_fast.eval.stats import to_maximisation, weight_grid
from sipo_fast.eval.sweep import SweepResult, run_eval, score_responses, sweep_weights

from ..context import Context
from ..rundir.directory import RunDir
from ..rundir.files import dir_hash, read_jsonl, stable_hash
from .trained import TRAINED, trained_key, trained_policy_for

log = logging.getLogger("sipo_fast.eval")
METHODS = ("sipo", "mod", "soups", "soups_ab", "modpo", "dpo_lw")
DEFAULT_METHODS = ("sipo", "mod", "soups")
_NEEDS = {"sipo": ("finetune",), "mod": ("align",), "soups": ("align",), "soups_ab": ("align",), "modpo": ("align",),
          "dpo_lw": ("align",)}


def default_weights(config) -> np.ndarray:
    """The sweep's default: W of stage 2 (``sample.weights``) plus the endpoints, [W, N]."""
    n = len(config.data.objectives)
    if n == 2:
        return weight_grid(2, [w[0] for w in config.sample.weights], endpoints=True)
    return np.unique(np.vstack([np.asarray(config.sample.weights), np.eye(n)]), axis=0)


# ---------------------------------------------------------------------------------------------- diagnostics
def _gt_prefers(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per objective (maximisation orientation), +1 if a is better, −1 if b is, 0 on a tie: [..., N]."""
    return np.sign(a - b)


def pipeline_diagnostics(run_dir: Path, scorers, cache: ScoreCache) -> dict:
    """Why the fronts look the way they do: the data's conflict ratio, the filter's survivors and a ground-truth
    check of them. ``gt_dominating``: survivors y_c that beat both y_a and y_b on every objective under the
    ground-truth scorers; ``dc_conflict_ratio``: share of the D_c pairs (y_c, y_l) on which the ground-truth
    scorers still disagree (the conflict ratio after SIPO's self-improvement; SIPO intends 0)."""
    rd = RunDir(run_dir)
    stages = rd.manifest().get("stages", {})
    out: dict = {}
    align = stages.get("align", {}).get("summary", {})
    if align:
        out["train_pairs"] = align.get("train_pairs")
        out["conflicting_train_pairs"] = align.get("conflicting_train_pairs")
        if align.get("train_pairs"):
            out["conflict_ratio"] = align["conflicting_train_pairs"] / align["train_pairs"]
    filt = stages.get("filter", {}).get("summary", {})
    for key in ("conflicting_prompts", "candidates", "rewrites_kept", "survivors", "prompts_covered", "pairs"):
        if key in filt:
            out[key] = filt[key]
    surv_path = rd.stage_dir("filter") / "survivors.jsonl"
    survivors = read_jsonl(surv_path) if surv_path.exists() else []
    if survivors and scorers:
        prompts = [s["prompt"] for s in survivors]
        resp = [[s["chosen"] for s in survivors], [s["response_0"] for s in survivors], [s["response_1"] for s in survivors]]
        sc = to_maximisation(score_responses(prompts, resp, scorers, cache=cache), [s.higher_is_better for s in scorers])
        c, a, b = sc[0], sc[1], sc[2]                                 # each (S, N)
        out["gt_dominating"] = int(((c > a) & (c > b)).all(-1).sum())
        pa, pb = _gt_prefers(c, a), _gt_prefers(c, b)                 # (S, N) for the pairs (y_c, y_a), (y_c, y_b)
        pref = np.concatenate([pa, pb], 0)                            # (2S, N)
        conflicting = (pref > 0).any(-1) & (pref < 0).any(-1)
        out["dc_conflict_ratio"] = float(conflicting.mean())
        out["dc_gt_gain_mean"] = (c - (a + b) / 2).mean(0).tolist()
    return out


# ---------------------------------------------------------------------------------------------- the runner
@dataclass
class EvalRun:
    results: list[SweepResult]
    diagnostics: dict
    paths: dict = field(default_factory=dict)


def _load_config(run_dir: Path):
    from ..config.pipeline_config import PipelineConfig

    path = run_dir / "config.yaml"
    if not path.exists():
        raise ValueError(f"{run_dir} has no config.yaml: not a pipeline run directory. Run `sipo-fast run` (or "
                         "`sipo-fast demo`) first, or evaluate your own policies with sipo_fast.eval.run_eval")
    return PipelineConfig.from_yaml(path.read_text())


def _fingerprint(run_dir: Path, method: str, prompts, weights, settings: dict) -> str:
    stages = RunDir(run_dir).manifest().get("stages", {})
    inputs = {s: stages.get(s, {}).get("artifact") for s in _NEEDS[method]}
    return stable_hash({"method": method, "prompts": list(prompts), "weights": np.asarray(weights).tolist(),
                        "settings": settings, "inputs": inputs})


def _policy_hash(policy_dir: Path) -> str:
    """Content hash of a saved policy's weights and configs (not its metrics or README), so a copied policy
    (finetune without survivors copies stage 1) hashes like its source."""
    return dir_hash(policy_dir, include=lambda rel: rel.suffix in (".safetensors", ".bin")
                    or rel.name.endswith("config.json"))


def _model_keys(ctx, run_dir: Path, method: str, weights: np.ndarray, settings: dict) -> list[str]:
    """What decodes each sweep weight, as a text-cache key. A one-hot weight is policy k alone for every
    method (MOD mixes nothing else in, the soup is that adapter, MODPO and DPO LW use the stage-1 policy), so rows
    share one key across methods; so do SIPO's rows and MOD's when finetune kept the stage-1 policies."""
    stage = "finetune" if method == "sipo" else "align"
    own = [_policy_hash(run_dir / stage / "policies" / o) for o in ctx.config.data.objectives]
    tag = {"sipo": "mod", "mod": "mod", "soups": "soup", "soups_ab": "soup_ab", "modpo": "modpo",
           "dpo_lw": "dpo_lw"}[method]
    mix = trained_key(ctx, run_dir) if method in TRAINED else ",".join(own)
    tail = f"|{settings['max_new_tokens']}|{settings['template']}|greedy"
    keys = []
    for w in np.asarray(weights, dtype=np.float64).tolist():
        if max(w) == 1.0:
            keys.append(f"policy:{own[int(np.argmax(w))]}{tail}")
        else:
            keys.append(f"{tag}:{mix}:{','.join(f'{x:.6g}' for x in w)}{tail}")
    return keys


def _generator(ctx, run_dir: Path, method: str, weights: np.ndarray, out_dir: Path, settings: dict):
    """The method's generator, wrapped with the run's text cache (``out_dir/generations.sqlite``)."""
    from sipo_fast.eval.methods import cached_generator

    return cached_generator(_raw_generator(ctx, run_dir, method, out_dir, settings),
                            _text_cache(out_dir), _model_keys(ctx, run_dir, method, weights, settings))


def _text_cache(out_dir: Path):
    """The run's text cache; with several processes only rank 0 keeps the file (the others' is never read)."""
    return TextCache(out_dir / "generations.sqlite" if current().is_main else None)


def _raw_generator(ctx, run_dir: Path, method: str, out_dir: Path, settings: dict):
    """Models load lazily, on the first call: a sweep served from the text cache loads nothing."""
    from sipo_fast.eval.methods import mod_generator, per_weight_generator, soup_generator

    from ..policies import load_policies

    kw = dict(max_new_tokens=settings["max_new_tokens"], template=settings["template"],
              batch_size=settings["batch_size"], progress=ctx.progress)

    def build():
        if method in ("sipo", "mod"):
            pol = load_policies(ctx, run_dir / ("finetune" if method == "sipo" else "align") / "policies")
            return mod_generator(pol.decoder(ctx), **kw)
        if method in ("soups", "soups_ab"):
            pol = load_policies(ctx, run_dir / "align" / "policies")
            if pol.names is not None:
                return soup_generator(pol.model, ctx.tokenizer, adapter_names=pol.names, exact=method == "soups", **kw)
            if method == "soups_ab":
                raise ValueError("soups_ab interpolates LoRA A and B; this run trained full models "
                                 "(align.use_lora=false): use method 'soups', which interpolates the full weights")
            return soup_generator(list(pol.models), ctx.tokenizer, **kw)
        if method in TRAINED:
            return per_weight_generator(trained_policy_for(ctx, run_dir, out_dir, method), ctx.tokenizer, **kw)
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")

    def generate(prompts, weights, seed=None):
        return build()(prompts, weights, seed=seed)
    return generate


def evaluate_run(run_dir: str | os.PathLike, *, methods: Sequence[str] = DEFAULT_METHODS, weights=None,
                 num_prompts: int | None = None, max_new_tokens: int | None = None, batch_size: int | None = None,
                 scorers: Sequence[str] | None = None, ref: Sequence[float] | None = None, baseline: str | None = "mod",
                 out_dir: str | os.PathLike | None = None, progress: bool = True, write: bool = True,
                 title: str | None = None) -> EvalRun:
    """Sweep ``methods`` on a finished pipeline run and write the comparison report.

    Defaults come from the run's config: weights = ``sample.weights`` plus the endpoints 0 and 1, prompts =
    ``eval.num_prompts`` held-out prompts (:meth:`~..context.Context.heldout_prompts`), ``eval.max_new_tokens``,
    ``eval.batch_size``, ``eval.scorers`` (or the data source's defaults). Decoding is greedy; the run's seed labels the results.
    """
    dist = current()  # several processes: each decodes and scores a share, rank 0 decides and writes
    run_dir = Path(run_dir)
    config = _load_config(run_dir)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"unknown or no methods {list(bad) or list(methods)}; choose from {', '.join(METHODS)}")
    manifest = RunDir(run_dir).manifest().get("stages", {})
    for m in methods:
        missing = [s for s in _NEEDS[m] if s not in manifest]
        if missing:
            raise ValueError(f"method {m!r} needs the pipeline stage(s) {missing} of {run_dir}, which are not finished; "
                             "run `sipo-fast run` with that --output-dir first")
    for name, v in (("num_prompts", num_prompts), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    n = len(config.data.objectives)
    if ref is not None and len(ref) != n:
        raise ValueError(f"ref has {len(ref)} values; give one per objective {config.data.objectives}")
    w = sweep_weights(weights, n) if weights is not None else default_weights(config)
    specs = list(scorers) if scorers is not None else (config.eval.scorers or DEFAULT_SCORERS.get(config.data.source))
    if not specs or len(specs) != n:
        raise ValueError(f"give one scorer per objective {config.data.objectives} (e.g. --scorers relevance "
                         f"harmlessness); got {specs}")
    scorer_objs = build_scorers(specs)
    ctx = Context(config, RunDir(run_dir), progress=progress and dist.is_main)
    prompts = ctx.heldout_prompts(num_prompts)
    settings = {"max_new_tokens": max_new_tokens or config.eval.max_new_tokens,
                "batch_size": batch_size or config.eval.batch_size, "template": config.model.template}
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "comparison"
    cache = ScoreCache(out_dir / "scores.sqlite" if dist.is_main else None)
    _place_scorers(scorer_objs, ctx)
    results = {}
    # MOD first: its stage-1 endpoints seed the text cache that the other methods' endpoints reuse.
    for m in sorted(methods, key=lambda name: name != "mod"):
        fp = _fingerprint(run_dir, m, prompts, w, {k: v for k, v in settings.items() if k != "batch_size"})
        path = out_dir / "sweeps" / f"{m}.json"
        old = dist.on_main(lambda: _reusable(path, fp, scorer_objs))
        if old is not None:
            log.info("eval: %s: reusing %s", m, path)
            results[m] = old
            continue
        log.info("eval: %s: sweeping %d weights × %d prompts", m, len(w), len(prompts))
        gen = _generator(ctx, run_dir, m, w, out_dir, settings)
        res = run_eval(gen, prompts, scorer_objs, w, m, cache=cache, seed=config.seed,
                       meta={"fingerprint": fp, "run_dir": str(run_dir), **settings})
        dist.on_main(lambda: res.save(path))
        results[m] = res
    results = [results[m] for m in methods]
    diag = pipeline_diagnostics(run_dir, scorer_objs, cache)
    paths = {}
    if write and dist.is_main:
        notes = "### Pipeline diagnostics\n\n" + diagnostics_markdown({config.seed: diag}, config.data.objectives)
        paths = write_report(results, out_dir, ref=ref, baseline=baseline if baseline in methods else None, notes=notes,
                             title=title or f"SIPO vs baselines on {config.data.source} ({run_dir.name}, seed "
                                            f"{config.seed})")
        (out_dir / "diagnostics.json").write_text(json.dumps(diag, indent=1))
    if write:
        paths = dist.broadcast(paths)
    return EvalRun(results=results, diagnostics=diag, paths=paths)


def _place_scorers(scorers, ctx) -> None:
    """Reward/score-model scorers (7B beaver models in the paper's setting) load on the CPU in float32; on a GPU
    run they move to the run's device and dtype (this rank's GPU under accelerate launch), as the policies do.
    On CPU they stay as built."""
    from sipo_fast.scoring import _TransformerScorer

    if ctx.device.type != "cuda":
        return
    for s in scorers:
        if isinstance(s, _TransformerScorer):
            s.model = s.model.to(ctx.device, dtype=ctx.dtype)


def _reusable(path: Path, fingerprint: str, scorers) -> SweepResult | None:
    """A saved sweep of the same inputs and scorers (scorer names key the score cache too; other names mean
    other scorers, so the sweep is redone), or None."""
    if not path.exists():
        return None
    old = SweepResult.load(path)
    return old if old.meta.get("fingerprint") == fingerprint and old.objectives == [s.name for s in scorers] else None
