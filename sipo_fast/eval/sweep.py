"""Weight sweeps: generate one response per (weight, prompt), score it with every objective's scorer.

One :class:`SweepResult` per method (and seed) holds everything needed downstream: the weights, the
prompts, the responses and the raw scores. Summaries (:meth:`SweepResult.summary`) are in *maximisation*
orientation: a lower-is-better scorer's column is negated, so larger is better on every axis.

A *generator* is any callable ``generate(prompts, weights, seed) -> texts`` with ``weights`` [W, N] and
``texts`` a list of W lists of P strings (row w answers every prompt at weight w). :mod:`.methods` builds
them from a MOD decoder, DPO soups or per-weight models.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from sipo_fast.ops.mod import check_weights

from .cache import CachedScorer, ScoreCache
from .stats import mean_ci, to_maximisation

Generator = Callable[..., list]


@dataclass
class SweepResult:
    """One method's sweep. ``scores`` are raw scorer units, [W, P, N] (weight, prompt, objective)."""

    method: str
    objectives: list[str]
    higher_is_better: list[bool]
    weights: np.ndarray
    prompts: list[str]
    responses: list[list[str]]
    scores: np.ndarray
    seed: int | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.weights = np.asarray(self.weights, dtype=np.float64)
        self.scores = np.asarray(self.scores, dtype=np.float64)
        W, P, N = len(self.weights), len(self.prompts), len(self.objectives)
        if self.scores.shape != (W, P, N):
            raise ValueError(f"SweepResult({self.method!r}): scores have shape {self.scores.shape}, expected "
                             f"[weights, prompts, objectives] = {(W, P, N)}")
        if len(self.higher_is_better) != N or len(self.responses) != W or any(len(r) != P for r in self.responses):
            raise ValueError(f"SweepResult({self.method!r}): directions/responses do not match {W} weights × "
                             f"{P} prompts × {N} objectives")

    def maximised(self) -> np.ndarray:
        """Scores [W, P, N] with costs negated (larger is better everywhere)."""
        return to_maximisation(self.scores, self.higher_is_better)

    def summary(self, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Per-weight mean over prompts and the CI half-width, both [W, N], maximisation orientation."""
        return mean_ci(self.maximised(), confidence, axis=1)

    @property
    def points(self) -> np.ndarray:
        """The method's front: one point per weight, [W, N], maximisation orientation."""
        return self.maximised().mean(1)

    # -- persistence --------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"method": self.method, "objectives": self.objectives, "higher_is_better": self.higher_is_better,
                "weights": self.weights.tolist(), "prompts": self.prompts, "responses": self.responses,
                "scores": self.scores.tolist(), "seed": self.seed, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> "SweepResult":
        return cls(**{k: d[k] for k in ("method", "objectives", "higher_is_better", "weights", "prompts",
                                        "responses", "scores")}, seed=d.get("seed"), meta=d.get("meta", {}))

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), ensure_ascii=False))
        os.replace(tmp, path)  # a killed run leaves the old file or the new one, never half of one
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SweepResult":
        return cls.from_dict(json.loads(Path(path).read_text()))


def sweep_weights(weights, n_objectives: int) -> np.ndarray:
    """Weights as a [W, N] float64 array on the simplex; a bare list of numbers w means rows [w, 1 − w]."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim == 1 and n_objectives == 2:
        w = np.stack([w, 1.0 - w], axis=1)  # (W,) → (W, 2)
    if w.ndim != 2 or w.shape[1] != n_objectives or w.shape[0] == 0:
        raise ValueError(f"weights must be [W, {n_objectives}] (one column per objective), got shape {w.shape}; "
                         "for two objectives a list of numbers w also works")
    check_weights(w, n_objectives)  # raises ValueError naming the row off the simplex
    return w + 0.0  # -0.0 -> 0.0


def _check_scorers(scorers) -> list:
    if not scorers:
        raise ValueError("run_eval: no scorers; pass one scorer per objective (see sipo_fast.scoring.get_scorer)")
    for s in scorers:
        if not all(hasattr(s, a) for a in ("name", "higher_is_better", "score")):
            raise ValueError(f"run_eval: {s!r} is not a scorer (needs name, higher_is_better, score(prompts, responses))")
    names = [s.name for s in scorers]
    if len(set(names)) != len(names):
        raise ValueError(f"run_eval: scorer names {names} repeat; the score cache is keyed by name, so make them unique")
    return list(scorers)


def score_responses(prompts: Sequence[str], responses: Sequence[Sequence[str]], scorers, *,
                    cache: ScoreCache | None = None) -> np.ndarray:
    """Scores [W, P, N] of ``responses`` [W][P] under each scorer, raw units. All W·P pairs go to each scorer
    in one batched, cache-filtered call (the cache is in memory when ``cache`` is None)."""
    cache = cache if cache is not None else ScoreCache()
    W, P = len(responses), len(prompts)
    flat_p = [p for _ in range(W) for p in prompts]              # (W·P,), weight-major
    flat_r = [r for row in responses for r in row]               # (W·P,)
    cols = [CachedScorer(s, cache).score(flat_p, flat_r).double().numpy() for s in scorers]
    return np.stack(cols, axis=-1).reshape(W, P, len(scorers))   # (W, P, N)


def run_eval(generate: Generator, prompts: Sequence[str], scorers, weights, method_name: str, *,
             cache: ScoreCache | str | os.PathLike | None = None, seed: int | None = 0,
             meta: dict | None = None) -> SweepResult:
    """Sweep ``weights`` [W, N] with ``generate`` on ``prompts`` and score with ``scorers`` (one per objective).

    ``generate(prompts, weights, seed=seed)`` returns W lists of P texts. The global torch RNG is seeded
    with ``seed`` (and restored afterwards) around generation, so a sampling generator gives the same sweep
    for the same seed. ``cache``: a :class:`ScoreCache`, a path to one (e.g. ``<run_dir>/eval/scores.sqlite``)
    or None for an in-memory cache.
    """
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("run_eval: prompts must be a non-empty list of non-empty strings")
    scorers = _check_scorers(scorers)
    w = sweep_weights(weights, len(scorers))
    if not method_name:
        raise ValueError("run_eval: give the method a name (it labels the table and the plot)")
    if cache is not None and not isinstance(cache, ScoreCache):
        cache = ScoreCache(cache)
    prompts = list(prompts)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        texts = generate(prompts, w, seed=seed)
    if len(texts) != len(w) or any(len(row) != len(prompts) for row in texts):
        raise ValueError(f"generator for {method_name!r} returned {len(texts)} rows; expected {len(w)} weights × "
                         f"{len(prompts)} prompts")
    texts = [[str(t) for t in row] for row in texts]
    scores = score_responses(prompts, texts, scorers, cache=cache)
    return SweepResult(method=method_name, objectives=[s.name for s in scorers],
                       higher_is_better=[bool(s.higher_is_better) for s in scorers], weights=w, prompts=prompts,
                       responses=texts, scores=scores, seed=seed, meta=dict(meta or {}))


def pooled(results: Sequence[SweepResult]) -> SweepResult:
    """Several seeds of one method on the same weights → one result whose prompts are the seeds' prompts
    concatenated (so per-weight CIs use every prompt-level score)."""
    if not results:
        raise ValueError("pooled: no results")
    first = results[0]
    for r in results[1:]:
        if r.method != first.method or r.objectives != first.objectives or not np.allclose(r.weights, first.weights):
            raise ValueError("pooled: results differ in method, objectives or weights; pool one method's seeds only")
    if len(results) == 1:
        return first
    return SweepResult(method=first.method, objectives=first.objectives, higher_is_better=first.higher_is_better,
                       weights=first.weights, prompts=[p for r in results for p in r.prompts],
                       responses=[[t for r in results for t in r.responses[i]] for i in range(len(first.weights))],
                       scores=np.concatenate([r.scores for r in results], axis=1), seed=None,
                       meta={"seeds": [r.seed for r in results]})


def weight_label(w: Sequence[float]) -> str:
    """Short label of a weight vector: "0.2" for [0.2, 0.8] (the first objective's weight), else "0.2/0.3/0.5"."""
    w = [float(x) for x in w]
    fmt = lambda x: f"{x:.2f}".rstrip("0").rstrip(".") if not math.isclose(x, round(x)) else str(int(round(x)))  # noqa: E731
    return fmt(w[0]) if len(w) == 2 else "/".join(fmt(x) for x in w)
