"""Held-out evaluation prompts and split checks.

The evaluation reads prompts from a source of its own (``eval.prompt_source``, ``eval.prompt_split``,
``eval.prompt_select``), because the paper's held-out prompts are not in the training data's split: BeaverTails
trains on PKU-SafeRLHF-10K (one ``train`` split) and scores the last 500 rows of PKU-SafeRLHF-30K's ``test``
split (the authors' src/data/preprocess/PKUSafeRLHF.py: ``train_test_split(test_size=500, shuffle=False)``).

Selections: ``"first"`` / ``"last"``: the split's first / last ``n`` distinct prompts; ``"first:N"`` /
``"last:N"``: the split's first / last N rows, then the first ``n`` distinct prompts among them, in order.

:func:`check_split` says before any training whether a split exists: local sources are always checked; hub
datasets only where the hub answers (offline, the check is skipped with a note, never an error).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("sipo_fast.data")
_DEMO_SPLITS = ("all", "train", "test")


def parse_select(select: str, where: str = "select") -> tuple[str, int | None]:
    """``"last:500"`` -> ("last", 500); ``"first"`` -> ("first", None). ValueError for anything else."""
    side, _, count = str(select).partition(":")
    ok = side in ("first", "last") and (not count or (count.isdigit() and int(count) > 0))
    if not ok:
        raise ValueError(f"{where}={select!r}: use 'first', 'last', 'first:N' or 'last:N' (N rows, N >= 1)")
    return side, int(count) if count else None


def select_prompts(prompts: list[str], select: str, n: int) -> list[str]:
    """Apply a selection to a split's prompt column (one entry per row, repeats allowed)."""
    side, rows = parse_select(select)
    if rows is not None:
        prompts = prompts[:rows] if side == "first" else prompts[-rows:]
        side = "first"
    distinct = list(dict.fromkeys(prompts))
    return distinct[:n] if side == "first" else distinct[-n:]


def split_prompts(source: str | os.PathLike, split: str) -> list[str]:
    """The ``prompt`` column of one split, one entry per row: "demo" (its seeded test split), a local file
    (every row: a file has no splits), a local dataset directory or a hub dataset."""
    from . import _load_any, load_demo

    if str(source) == "demo":
        return list(load_demo(split)["prompt"])
    ds = _load_any(source, split)
    if "prompt" not in ds.column_names:
        raise ValueError(f"{source} (split {split!r}) has no 'prompt' column; evaluation prompts need one")
    return list(ds["prompt"])


def heldout_prompts(source: str | os.PathLike, num_prompts: int, *, split: str = "test",
                    select: str = "first") -> list[str]:
    """``num_prompts`` distinct held-out prompts of ``source``'s ``split``, chosen by ``select``."""
    prompts = select_prompts(split_prompts(source, split), select, num_prompts)
    if not prompts:
        raise ValueError(f"{source!r} has no prompts in split {split!r} to evaluate on")
    return prompts


def available_splits(source: str | os.PathLike) -> list[str] | None:
    """Split names of a data source, or None when they cannot be known here (a file has one, unnamed; a hub
    dataset while the hub is unreachable or switched off)."""
    if str(source) == "demo":
        return list(_DEMO_SPLITS)
    path = Path(source)
    if path.is_file():
        return None
    if not path.exists() and (_offline() or not hub_reachable()):
        return None
    from datasets import get_dataset_split_names

    try:
        return list(get_dataset_split_names(str(source)))
    except Exception as err:  # noqa: BLE001 - no network, hub down, gated repo: the check is best-effort
        if path.exists():
            raise ValueError(f"{source}: cannot read its splits ({err}); a dataset directory needs files named "
                             "by split (train.jsonl, test.jsonl, ...)") from err
        log.warning("could not reach the hub to list the splits of %s (%s: %s); skipping the check",
                    source, type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return None


def check_split(source: str | os.PathLike, split: str, what: str) -> None:
    """Raise ValueError, naming ``what`` (the config field), if ``source`` is known to lack ``split``."""
    names = available_splits(source)
    if names is None:
        if Path(source).is_file():
            log.info("%s: %s is a single file; its split %r is every row", what, source, split)
        else:
            log.warning("%s: not checking that %s has split %r (the hub is offline or unreachable here); the "
                        "stage that reads it fails if it does not", what, source, split)
        return
    if split not in names:
        raise ValueError(f"{what}: {source} has no split {split!r}; its splits are {names}. Set the split to one "
                         "of them, or point the source at a dataset that has it")


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub's host: without it the hub client would retry with back-off for ~30 s."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))
