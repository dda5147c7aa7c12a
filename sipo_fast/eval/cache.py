"""Scoring cache: every (prompt, response, scorer) is scored once per run directory.

A sweep scores W weights × P prompts × M methods responses per objective, and greedy decoding often gives
the same response at neighbouring weights or across methods; the scorers (a sentence-embedding model, or a
7B reward model in the paper's setting) dominate evaluation time once generation is batched. Scores are
kept in SQLite (stdlib, safe for concurrent readers, one file) at ``<run_dir>/eval/scores.sqlite``.
The key is the scorer's ``name`` plus the exact prompt and response text, so two scorers must not share a
name unless they give the same numbers.
"""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Sequence

import torch

_SCHEMA = """CREATE TABLE IF NOT EXISTS scores (
    scorer TEXT NOT NULL, prompt TEXT NOT NULL, response TEXT NOT NULL, score REAL NOT NULL,
    PRIMARY KEY (scorer, prompt, response))"""


def _open(path: str | os.PathLike | None, schema: str) -> tuple[Path | None, sqlite3.Connection]:
    """(path, connection) of a cache database with ``schema``; ``path=None`` keeps it in memory."""
    path = Path(path) if path is not None else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path) if path is not None else ":memory:")
    db.execute(schema)
    db.commit()
    return path, db


class ScoreCache:
    """Persistent map (scorer name, prompt, response) → float. ``path=None`` keeps it in memory."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path, self._db = _open(path, _SCHEMA)

    def get(self, scorer: str, prompts: Sequence[str], responses: Sequence[str]) -> list[float | None]:
        """Cached scores in input order, None where missing."""
        q = "SELECT score FROM scores WHERE scorer=? AND prompt=? AND response=?"
        out = []
        for p, r in zip(prompts, responses):
            row = self._db.execute(q, (scorer, p, r)).fetchone()
            out.append(None if row is None else float(row[0]))
        return out

    def put(self, scorer: str, prompts: Sequence[str], responses: Sequence[str], scores: Sequence[float]) -> None:
        self._db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?)",
                             [(scorer, p, r, float(s)) for p, r, s in zip(prompts, responses, scores)])
        self._db.commit()

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM scores").fetchone()[0])

    def close(self) -> None:
        self._db.close()


class CachedScorer:
    """Wraps a scorer (``name``, ``higher_is_better``, ``score(prompts, responses) -> [B]``) with a
    :class:`ScoreCache`: each call scores only the distinct (prompt, response) pairs not yet cached, in one
    batched call, and returns scores in input order. ``calls`` / ``scored`` count the underlying work."""

    def __init__(self, scorer, cache: ScoreCache):
        for attr in ("name", "higher_is_better", "score"):
            if not hasattr(scorer, attr):
                raise ValueError(f"CachedScorer: {scorer!r} has no {attr!r}; scorers need name, higher_is_better "
                                 "and score(prompts, responses)")
        self.scorer, self.cache = scorer, cache
        self.name, self.higher_is_better = scorer.name, bool(scorer.higher_is_better)
        self.calls = self.scored = 0

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise ValueError(f"score(): {len(prompts)} prompts but {len(responses)} responses")
        from sipo_fast.distributed import current

        dist = current()
        # With several processes rank 0's cache answers for all (the others hold an empty one).
        cached = dist.on_main(lambda: self.cache.get(self.name, prompts, responses))
        todo = list(dict.fromkeys((p, r) for p, r, s in zip(prompts, responses, cached) if s is None))
        if todo:
            ps, rs = [p for p, _ in todo], [r for _, r in todo]
            fresh = torch.as_tensor(self._score(ps, rs, dist), dtype=torch.float64).reshape(-1)
            if fresh.numel() != len(todo):
                raise ValueError(f"scorer {self.name!r} returned {fresh.numel()} scores for {len(todo)} inputs")
            self.cache.put(self.name, ps, rs, fresh.tolist())
            self.calls, self.scored = self.calls + 1, self.scored + len(todo)
            lookup = dict(zip(todo, fresh.tolist()))
            cached = [lookup[(p, r)] if s is None else s for p, r, s in zip(prompts, responses, cached)]
        return torch.tensor(cached, dtype=torch.float32)

    __call__ = score

    def _score(self, prompts: list[str], responses: list[str], dist):
        """The underlying scorer on every pair. With several processes, a transformer scorer (reward or score
        model, batching its inputs in order) scores its share of its own batches on each rank, so every batch
        is the single-process one; any other scorer runs on rank 0 and its scores are broadcast."""
        if not dist.enabled:
            return self.scorer.score(prompts, responses)
        from sipo_fast.distributed import batched
        from sipo_fast.scoring import _TransformerScorer

        def run(a: int, b: int) -> list[float]:
            return torch.as_tensor(self.scorer.score(prompts[a:b], responses[a:b])).double().reshape(-1).tolist()
        if isinstance(self.scorer, _TransformerScorer):
            return [x for chunk in batched(len(prompts), self.scorer.batch_size, run, dist=dist) for x in chunk]
        return dist.on_main(lambda: run(0, len(prompts)))


_TEXT_SCHEMA = """CREATE TABLE IF NOT EXISTS texts (
    model TEXT NOT NULL, prompt TEXT NOT NULL, text TEXT NOT NULL, PRIMARY KEY (model, prompt))"""


class TextCache:
    """Persistent map (model key, prompt) → generated text, for greedy decoding, where the same model and prompt
    always give the same text. Methods share models more often than it seems: every baseline's endpoints
    (w = 0 and 1) are the stage-1 policies themselves, and SIPO's policies are the stage-1 ones when no
    candidate survives the filter. The key must name everything that decides the text (weights of the
    models, mixing weight, decoding settings); :mod:`.baselines` builds it from file hashes."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path, self._db = _open(path, _TEXT_SCHEMA)

    def get(self, model: str, prompts: Sequence[str]) -> list[str] | None:
        """Texts for every prompt, or None unless all are cached."""
        q = "SELECT text FROM texts WHERE model=? AND prompt=?"
        out = []
        for p in prompts:
            row = self._db.execute(q, (model, p)).fetchone()
            if row is None:
                return None
            out.append(row[0])
        return out

    def put(self, model: str, prompts: Sequence[str], texts: Sequence[str]) -> None:
        self._db.executemany("INSERT OR REPLACE INTO texts VALUES (?, ?, ?)",
                             [(model, p, t) for p, t in zip(prompts, texts)])
        self._db.commit()

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM texts").fetchone()[0])
