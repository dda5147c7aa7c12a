"""Checks of preference data before any work: encoding, JSON, and the value of every cell the pipeline reads.

Every problem names where it is: ``file:line`` for a local JSON-lines file (the line number counts blank
lines too, as an editor does), ``<source> row i`` for anything else. Up to ``MAX_REPORTED`` problems are
listed, so a file with one systematic mistake does not print ten thousand lines.

Values the pipeline needs (SIPO.md §5, normalised schema):
- ``prompt``, ``response_0``, ``response_1``: non-empty strings (an empty response would be trained on as a
  preferred or rejected answer);
- ``pref_<objective>``: the index 0 or 1 of the response that objective prefers; null, 2, 0.5 or "yes" are
  errors, not preferences.
"""
from __future__ import annotations

import json
from pathlib import Path

MAX_REPORTED = 10
TEXT_COLUMNS = ("prompt", "response_0", "response_1")


class DataError(ValueError):
    """Bad preference data; ``problems`` holds one line per problem (``str(exc)`` joins them)."""

    def __init__(self, problems: list[str] | str, total: int | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        more = (total or len(self.problems)) - len(self.problems)
        if more > 0:
            self.problems.append(f"... and {more} more problem(s) of the same kind")
        super().__init__("; ".join(self.problems))


def _bad_utf8(raw: bytes, path: Path, line: int) -> str | None:
    try:
        raw.decode("utf-8")
        return None
    except UnicodeDecodeError as exc:
        return (f"{path}:{line}: not UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1}); save the file "
                "as UTF-8")


class _Problems:
    """The first MAX_REPORTED problem lines of a file, and how many there were in all."""

    def __init__(self):
        self.lines: list[str] = []
        self.total = 0

    def add(self, why: str | None) -> None:
        if why:
            self.total += 1
            if len(self.lines) < MAX_REPORTED:
                self.lines.append(why)

    def raise_any(self) -> None:
        if self.lines:
            raise DataError(self.lines, self.total)


def check_utf8(path: Path) -> None:
    """Raise :class:`DataError` naming the lines of a text file that are not UTF-8."""
    problems = _Problems()
    with open(path, "rb") as fh:
        for i, raw in enumerate(fh, start=1):
            problems.add(_bad_utf8(raw, path, i))
    problems.raise_any()


def read_jsonl_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) for every non-blank line of a JSON-lines file; :class:`DataError` naming each line
    that is not UTF-8, not JSON, or not a JSON object."""
    rows, problems = [], _Problems()
    with open(path, "rb") as fh:
        for i, raw in enumerate(fh, start=1):
            why = _bad_utf8(raw, path, i)
            if why is None and raw.strip():
                try:
                    row = json.loads(raw.decode("utf-8"))
                except json.JSONDecodeError as exc:
                    why = f"{path}:{i}: not valid JSON ({exc.msg} at column {exc.colno})"
                else:
                    if isinstance(row, dict):
                        rows.append((i, row))
                    else:
                        why = f"{path}:{i}: a row must be a JSON object, got {type(row).__name__}"
            problems.add(why)
    problems.raise_any()
    return rows


def _cell_problem(row: dict, column: str, *, index: bool) -> str | None:
    if column not in row:
        return f"has no {column!r}"
    value = row[column]
    if value is None:
        return f"{column} is null"
    if index:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value not in (0, 1):
            return f"{column}={value!r}: a preference must be 0 or 1 (the index of the preferred response)"
        return None
    if not isinstance(value, str):
        return f"{column} must be text, got {type(value).__name__} {value!r}"[:200]
    if not value.strip():
        return f"{column} is empty"
    return None


def check_rows(rows, where, pref_columns: list[str]) -> None:
    """Check every row's text and preference cells; ``where(i)`` names row ``i`` (``file:line`` or ``row i``).
    Raises :class:`DataError` listing the first problems."""
    problems = _Problems()
    for i, row in enumerate(rows):
        for col in (*TEXT_COLUMNS, *pref_columns):
            why = _cell_problem(row, col, index=col in pref_columns)
            problems.add(f"{where(i)}: {why}" if why else None)
    problems.raise_any()
