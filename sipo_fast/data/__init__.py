"""Preference data: the shipped demo set, loaders for PKU-SafeRLHF and HelpSteer, and the normalised form.

Two forms:
- **PKU-SafeRLHF schema** (what ``load_demo`` and ``load_pku_saferlhf`` return): ``prompt, response_0,
  response_1, better_response_id, safer_response_id, is_response_0_safe, is_response_1_safe``.
- **Normalised preferences** (what the pipeline consumes; ``load_preferences`` returns it): ``prompt,
  response_0, response_1`` and one column ``pref_<objective>`` per objective holding the index (0/1) of the
  response that objective prefers. PKU data maps to objectives ``helpful`` (better_response_id) and
  ``harmless`` (safer_response_id); HelpSteer to one objective per attribute.

A pair is *conflicting* when its objectives prefer different responses (SIPO.md §1).
"""
from __future__ import annotations

import itertools
import os
from importlib import resources
from pathlib import Path

PKU_COLUMNS = ["prompt", "response_0", "response_1", "better_response_id", "safer_response_id",
               "is_response_0_safe", "is_response_1_safe"]
PKU_OBJECTIVES = {"helpful": "better_response_id", "harmless": "safer_response_id"}
HELPSTEER_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
PREF_PREFIX = "pref_"
DEMO_SIZE_MIN = 400


def _demo_file() -> Path:
    return Path(str(resources.files("sipo_fast.data").joinpath("demo", "demo.jsonl")))


def split_train_test(ds, *, test_size: float = 0.1, seed: int = 0):
    """Deterministic split (the paper splits PKU-SafeRLHF-10K 90/10 with seed 0): ``{"train", "test"}``."""
    return ds.train_test_split(test_size=test_size, seed=seed, shuffle=True)


def load_demo(split: str = "all"):
    """The shipped demo preference set (PKU-SafeRLHF schema plus raw scores and ``kind``); see its
    DATASET_CARD.md. ``split``: "all", "train" (90%) or "test" (10%), seed 0."""
    from datasets import load_dataset

    path = _demo_file()
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the demo data ships with the package; regenerate it with "
                                "`python scripts/make_demo_data.py` from the repository root")
    ds = load_dataset("json", data_files=str(path), split="train")
    if split == "all":
        return ds
    if split not in ("train", "test"):
        raise ValueError(f"load_demo(split={split!r}): choose 'all', 'train' or 'test'")
    return split_train_test(ds)[split]


def _load_any(source: str | os.PathLike, split: str, **kwargs):
    """A hub dataset name, a local directory, or a local .json/.jsonl/.parquet/.csv file."""
    from datasets import load_dataset

    path = Path(source)
    if path.is_file():
        fmt = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
        if fmt is None:
            raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .json, .jsonl, .parquet or .csv")
        return load_dataset(fmt, data_files=str(path), split="train")
    if path.is_dir():
        return load_dataset(str(path), split=split, **kwargs)
    return load_dataset(str(source), split=split, **kwargs)


def load_pku_saferlhf(source: str | os.PathLike = "PKU-Alignment/PKU-SafeRLHF-10K", split: str = "train", **kwargs):
    """PKU-SafeRLHF (``PKU-Alignment/PKU-SafeRLHF``, ``-10K``, ``-30K``) or a local copy, reduced to the
    PKU columns above. Extra keyword arguments go to ``datasets.load_dataset`` (e.g. ``name=`` for a config)."""
    ds = _load_any(source, split, **kwargs)
    missing = [c for c in PKU_COLUMNS if c not in ds.column_names]
    if missing:
        raise ValueError(f"{source}: not in the PKU-SafeRLHF schema, missing columns {missing}")
    return ds.select_columns(PKU_COLUMNS)


def _index(x):
    """A response index as an int; anything else (null, 2, "yes") is kept as is, for the pipeline's data check
    to report with its row (``sipo_fast.pipeline.datacheck``) instead of failing here without one."""
    return int(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and x in (0, 1) else x


def pku_to_preferences(ds):
    """PKU schema -> normalised: adds ``pref_helpful`` and ``pref_harmless``."""
    def add(batch):
        return {f"{PREF_PREFIX}{obj}": [_index(x) for x in batch[col]] for obj, col in PKU_OBJECTIVES.items()}

    return ds.map(add, batched=True, desc="preferences")


def helpsteer_pairs(ds, attributes=("correctness", "verbosity")):
    """HelpSteer/HelpSteer2 rows (one response per row, 0–4 attribute scores; rows share prompts) ->
    every pair of responses to one prompt, preferred per attribute by the higher score (SIPO.md §5).
    A pair tied on any of the chosen attributes is dropped, since it has no preference for that objective.
    Columns: prompt, response_0, response_1, pref_<attribute>, score_<attribute>_0/1."""
    from datasets import Dataset

    bad = [a for a in attributes if a not in HELPSTEER_ATTRIBUTES]
    if bad or len(attributes) < 2:
        raise ValueError(f"attributes must be at least two of {HELPSTEER_ATTRIBUTES}, got {list(attributes)}")
    groups: dict[str, list[dict]] = {}
    for row in ds:
        groups.setdefault(row["prompt"], []).append(row)
    out: dict[str, list] = {k: [] for k in ["prompt", "response_0", "response_1"]}
    for a in attributes:
        out.update({f"{PREF_PREFIX}{a}": [], f"score_{a}_0": [], f"score_{a}_1": []})
    for prompt, rows in groups.items():
        for r0, r1 in itertools.combinations(rows, 2):
            if any(r0[a] == r1[a] for a in attributes) or r0["response"] == r1["response"]:
                continue
            out["prompt"].append(prompt)
            out["response_0"].append(r0["response"])
            out["response_1"].append(r1["response"])
            for a in attributes:
                out[f"{PREF_PREFIX}{a}"].append(int(r1[a] > r0[a]))
                out[f"score_{a}_0"].append(r0[a])
                out[f"score_{a}_1"].append(r1[a])
    return Dataset.from_dict(out)


def load_helpsteer(source: str | os.PathLike = "nvidia/HelpSteer", split: str = "train",
                   attributes=("correctness", "verbosity"), **kwargs):
    """``nvidia/HelpSteer`` or ``nvidia/HelpSteer2`` (or a local copy) as normalised preference pairs."""
    ds = _load_any(source, split, **kwargs)
    missing = [c for c in ["prompt", "response", *attributes] if c not in ds.column_names]
    if missing:
        raise ValueError(f"{source}: not in the HelpSteer schema, missing columns {missing}")
    return helpsteer_pairs(ds, attributes)


def objectives(ds) -> list[str]:
    """Objective names of a normalised dataset (its ``pref_*`` columns, in column order)."""
    return [c[len(PREF_PREFIX):] for c in ds.column_names if c.startswith(PREF_PREFIX)]


def load_preferences(source: str | os.PathLike = "demo", split: str = "train", **kwargs):
    """Normalised preferences from ``"demo"``, a PKU-SafeRLHF name/path, or a HelpSteer name/path
    (``kind="helpsteer"`` for a local HelpSteer copy; names containing "HelpSteer" are detected)."""
    kind = kwargs.pop("kind", None) or ("helpsteer" if "helpsteer" in str(source).lower() else
                                        "demo" if str(source) == "demo" else "pku")
    if kind == "demo":
        return pku_to_preferences(load_demo(split))
    if kind == "helpsteer":
        return load_helpsteer(source, split, **kwargs)
    if kind == "pku":
        return pku_to_preferences(load_pku_saferlhf(source, split, **kwargs))
    raise ValueError(f"kind={kind!r}: choose 'demo', 'pku' or 'helpsteer'")


def _pref_matrix(ds) -> list[tuple[int, ...]]:
    cols = [c for c in ds.column_names if c.startswith(PREF_PREFIX)]
    if not cols and all(c in ds.column_names for c in PKU_OBJECTIVES.values()):
        cols = list(PKU_OBJECTIVES.values())
    if len(cols) < 2:
        raise ValueError("need at least two preference columns (pref_<objective>, or PKU's better/safer_response_id)")
    return list(zip(*(ds[c] for c in cols)))


def is_conflicting(ds) -> list[bool]:
    """Per row: do the objectives prefer different responses?"""
    return [len(set(row)) > 1 for row in _pref_matrix(ds)]


def conflict_ratio(ds) -> float:
    """Share of rows where the objectives prefer different responses (SIPO.md §1). 0.0 for an empty set."""
    flags = is_conflicting(ds) if len(ds) else []
    return sum(flags) / len(flags) if flags else 0.0


def conflicting(ds):
    """Only the conflicting rows."""
    flags = is_conflicting(ds)
    return ds.select([i for i, f in enumerate(flags) if f])
