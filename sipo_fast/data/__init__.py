"""Preference data: the shipped demo set, loaders for PKU-SafeRLHF and HelpSteer, and the normalised form.

Two forms:
- **PKU-SafeRLHF schema** (what ``load_demo`` and ``load_pku_saferlhf`` return): ``prompt, response_0,
  response_1, better_response_id, safer_response_id, is_response_0_safe, is_response_1_safe``.
- **Normalised preferences** (what the pipeline consumes; ``load_preferences`` returns it): ``prompt,
  response_0, response_1`` and one column ``pref_<objective>`` per objective holding the index (0/1) of the
  response that objective prefers. PKU data maps to objectives ``helpful`` (better_response_id) and
  ``harmless`` (safer_response_id); HelpSteer to one objective per attribute.

Either form loads from any source ``datasets`` reads (a jsonl/json/csv/tsv/parquet/arrow file, a directory of
data files, a ``save_to_disk`` directory, a hub name): :mod:`sipo_fast.data.sources`, whose
:func:`~sipo_fast.data.sources.line_checks` says which text checks apply to a source before it is loaded.

A pair is *conflicting* when its objectives prefer different responses (SIPO.md §1).
"""
from __future__ import annotations

import itertools
import os
from importlib import resources
from pathlib import Path

from .sources import line_checks, load_source  # noqa: F401  (re-exported: the data API in one place)

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
    """A hub dataset name, a local directory (a data directory or a ``save_to_disk`` one) or a local file of any
    format ``datasets`` reads (:mod:`sipo_fast.data.sources`)."""
    from .sources import load_source

    return load_source(source, split, **kwargs)


def load_pku_saferlhf(source: str | os.PathLike = "PKU-Alignment/PKU-SafeRLHF-10K", split: str = "train", **kwargs):
    """PKU-SafeRLHF (``PKU-Alignment/PKU-SafeRLHF``, ``-10K``, ``-30K``) or a local copy, reduced to the
    PKU columns above. Extra keyword arguments go to ``datasets.load_dataset`` (e.g. ``name=`` for a config)."""
    from .sources import check_columns

    ds = _load_any(source, split, **kwargs)
    check_columns(ds, source, PKU_COLUMNS, "PKU-SafeRLHF")
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
    from .sources import check_columns

    ds = _load_any(source, split, **kwargs)
    check_columns(ds, source, ["prompt", "response", *attributes], "HelpSteer")
    return helpsteer_pairs(ds, attributes)


def objectives(ds) -> list[str]:
    """Objective names of a normalised dataset (its ``pref_*`` columns, in column order)."""
    return [c[len(PREF_PREFIX):] for c in ds.column_names if c.startswith(PREF_PREFIX)]


PREF_COLUMNS = ("prompt", "response_0", "response_1")


def schema(ds) -> str | None:
    """Which schema a dataset's columns are in: "preferences" (the normalised one: ``pref_*`` columns), "pku"
    (PKU-SafeRLHF), "helpsteer" (one response per row with attribute scores), or None."""
    cols = set(ds.column_names)
    if any(c.startswith(PREF_PREFIX) for c in cols):
        return "preferences"
    if set(PKU_OBJECTIVES.values()) <= cols:
        return "pku"
    if {"prompt", "response"} <= cols and cols & set(HELPSTEER_ATTRIBUTES):
        return "helpsteer"
    return None


def check_preferences(ds, source) -> None:
    """ValueError naming ``source`` unless ``ds`` is in the normalised schema with at least two objectives."""
    from .sources import check_columns

    check_columns(ds, source, PREF_COLUMNS, "normalised preference")
    prefs = [c for c in ds.column_names if c.startswith(PREF_PREFIX)]
    if len(prefs) < 2:
        raise ValueError(f"{source}: the normalised schema needs at least two {PREF_PREFIX}<objective> columns (one "
                         f"per objective: the index 0/1 of the response it prefers), found {prefs}")


def load_preferences(source: str | os.PathLike = "demo", split: str = "train", **kwargs):
    """Normalised preferences from ``"demo"`` or any source :mod:`sipo_fast.data.sources` reads (a local file of
    any format, a data or ``save_to_disk`` directory, a hub name), in either schema: already normalised
    (``prompt, response_0, response_1, pref_<objective>...``), PKU-SafeRLHF, or HelpSteer (one response per row;
    ``attributes=`` picks the objectives). The schema is read from the columns; ``kind="pku" | "helpsteer" |
    "preferences"`` insists on one. Other keyword arguments go to ``datasets.load_dataset``."""
    kind = kwargs.pop("kind", None)
    attributes = kwargs.pop("attributes", ("correctness", "verbosity"))
    if str(source) == "demo" and kind in (None, "demo"):
        return pku_to_preferences(load_demo(split))
    if kind not in (None, "pku", "helpsteer", "preferences"):
        raise ValueError(f"kind={kind!r}: choose 'demo', 'pku', 'helpsteer' or 'preferences'")
    ds = _load_any(source, split, **kwargs)
    found = kind or schema(ds)
    if found == "preferences":
        check_preferences(ds, source)
        return ds
    if found == "pku":
        from .sources import check_columns

        check_columns(ds, source, PKU_COLUMNS, "PKU-SafeRLHF")
        return pku_to_preferences(ds.select_columns(PKU_COLUMNS))
    if found == "helpsteer":
        from .sources import check_columns

        check_columns(ds, source, ["prompt", "response", *attributes], "HelpSteer")
        return helpsteer_pairs(ds, attributes)
    raise ValueError(f"{source}: columns {ds.column_names} are in no preference schema this loader reads: the "
                     f"normalised one ({', '.join(PREF_COLUMNS)} and {PREF_PREFIX}<objective> per objective), "
                     f"PKU-SafeRLHF ({', '.join(PKU_COLUMNS)}) or HelpSteer (prompt, response and attribute scores "
                     f"{', '.join(HELPSTEER_ATTRIBUTES)})")


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
