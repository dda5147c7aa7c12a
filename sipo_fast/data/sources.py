"""Where a dataset comes from: every local file, directory or hub name that ``datasets`` reads, and what can be
checked of it as text.

    data.jsonl / data.json / data.ndjson    load_dataset("json", data_files=...)   (also .gz/.bz2/.xz/.zst)
    data.csv / data.tsv                     load_dataset("csv", ...)               (.tsv: tab-separated)
    data.parquet / data.pq                  load_dataset("parquet", ...)
    data.arrow                              load_dataset("arrow", ...)
    a directory written by save_to_disk     load_from_disk(dir)      (dataset_dict.json, or state.json)
    any other directory of data files       load_dataset(dir)        (e.g. train-*.parquet, test.jsonl)
    anything else                           load_dataset(name)       (a hub dataset)

A single file, or a saved ``Dataset`` (not a ``DatasetDict``), has no splits: it is all its rows, whichever split is
asked for (callers that need a real split check for one). Every failure names the source.
:func:`line_checks` says which line-by-line checks of the raw bytes make sense: only a text file has lines.
"""
from __future__ import annotations

import os
from pathlib import Path

# suffix -> (datasets builder, extra load_dataset arguments)
FILE_FORMATS = {".json": ("json", {}), ".jsonl": ("json", {}), ".ndjson": ("json", {}), ".csv": ("csv", {}),
                ".tsv": ("csv", {"sep": "\t"}), ".parquet": ("parquet", {}), ".pq": ("parquet", {}),
                ".arrow": ("arrow", {})}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
TEXT_BUILDERS = ("json", "csv")
UTF8, JSON_LINES = "utf8", "json_lines"


def _suffixes(path: Path) -> tuple[str, str | None]:
    """(format suffix, compression suffix or None), lowercased: data.jsonl.gz -> (".jsonl", ".gz")."""
    suffix = path.suffix.lower()
    if suffix in COMPRESSIONS:
        return Path(path.stem).suffix.lower(), suffix
    return suffix, None


def file_format(path: str | os.PathLike) -> tuple[str, dict]:
    """The ``load_dataset`` builder and arguments for a local data file; ValueError naming it otherwise."""
    path = Path(path)
    suffix, _ = _suffixes(path)
    if suffix not in FILE_FORMATS:
        known = ", ".join(FILE_FORMATS)
        raise ValueError(f"{path}: unsupported file type {suffix or path.suffix!r}; use one of {known} (optionally "
                         f"compressed: {', '.join(COMPRESSIONS)}), a dataset directory, or a hub dataset name")
    return FILE_FORMATS[suffix]


def is_saved_dataset(path: str | os.PathLike) -> bool:
    """A directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    p = Path(path)
    return p.is_dir() and ((p / "dataset_dict.json").is_file() or ((p / "state.json").is_file()
                                                                    and (p / "dataset_info.json").is_file()))


def _first_content_byte(path: Path) -> bytes | None:
    with open(path, "rb") as fh:
        while chunk := fh.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return stripped[:1]
    return None


def line_checks(source: str | os.PathLike) -> tuple[str, ...]:
    """Which text-level line checks apply to ``source``: ``("utf8", "json_lines")`` for an uncompressed JSON-lines
    file (every line UTF-8 and one JSON object), ``("utf8",)`` for another uncompressed text file (a JSON array,
    CSV, TSV), and ``()`` for everything else (parquet and arrow files, compressed files, directories, hub
    names): their bytes are not lines of text, and ``load_dataset`` reports what is wrong with them."""
    path = Path(source)
    if not path.is_file():
        return ()
    suffix, compression = _suffixes(path)
    if compression is not None or suffix not in FILE_FORMATS or FILE_FORMATS[suffix][0] not in TEXT_BUILDERS:
        return ()
    if FILE_FORMATS[suffix][0] == "json" and (suffix != ".json" or _first_content_byte(path) == b"{"):
        return (UTF8, JSON_LINES)
    return (UTF8,)


def load_source(source: str | os.PathLike, split: str = "train", **kwargs):
    """One split of ``source`` (see the module docstring) as a ``datasets.Dataset``. ``kwargs`` go to
    ``load_dataset`` (e.g. ``name=`` for a hub config). Raises ValueError naming the source."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    path, what = Path(source), str(source)
    if path.is_file():
        builder, extra = file_format(path)
        read = lambda: load_dataset(builder, data_files=str(path), split="train", **extra, **kwargs)  # noqa: E731
    elif is_saved_dataset(path):
        read = lambda: load_from_disk(str(path))  # noqa: E731
    elif path.is_dir():
        read = lambda: load_dataset(str(path), split=split, **kwargs)  # noqa: E731
    elif what.startswith((".", "/", "~")) or _suffixes(path)[0] in FILE_FORMATS:
        raise ValueError(f"{what}: no such file or directory")
    else:
        read = lambda: load_dataset(what, split=split, **kwargs)  # noqa: E731
    try:
        ds = read()
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; each becomes one line naming the source
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(f"{what}: cannot be read ({type(exc).__name__}: {first})") from exc
    if isinstance(ds, DatasetDict):  # a saved DatasetDict
        if split not in ds:
            raise ValueError(f"{what}: the saved DatasetDict has no split {split!r} (it has {sorted(ds)})")
        return ds[split]
    return ds


def check_columns(ds, source, needed, schema: str) -> None:
    """ValueError naming ``source`` unless ``ds`` has every column in ``needed``."""
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise ValueError(f"{source}: not in the {schema} schema, missing columns {missing} (it has "
                         f"{ds.column_names})")
