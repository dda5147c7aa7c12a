"""Field checks shared by the config sections (:mod:`.sections`): types from the field annotations, positive
numbers, weights, and the :class:`Section` base that runs them.

YAML and ``section.key=value`` overrides hand the config whatever the user typed, so every field is checked
against its annotation before a section's own rules run (``check_types``):

- ``bool`` takes only true/false: ``use_lora: "no"`` is a string, and Python's truthiness would read it as True;
- ``int`` takes whole numbers only (``8.0`` becomes 8; ``1.5`` is an error: a count cannot be fractional);
- ``float`` takes any finite number; ``str`` a string; ``list`` a list (``target_modules: q_proj`` is a
  string, which PEFT would read as a regular expression, so it is refused);
- ``X | None`` also takes null.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import fields

_KINDS = {"bool": "true or false", "int": "a whole number", "float": "a number", "str": "a string",
          "list": "a list, e.g. [a, b]"}


_YAML11_EXPONENT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def coerce(name: str, kind: str, value):
    """``value`` checked against one annotation (``"int"``, ``"list | None"``, ...); returns it, with a whole
    float turned into an int for ``int``. Raises ValueError naming the field, the value and what it needs."""
    kinds = [k.strip() for k in kind.split("|")]
    if value is None and "None" in kinds:
        return None
    base = next((k for k in kinds if k != "None"), kind)
    if base == "bool" and isinstance(value, bool):
        return value
    if base == "int" and _is_number(value) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    if base == "float" and _is_number(value) and math.isfinite(value):
        return value
    if base == "float" and isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 (PyYAML) reads 1e-4, without a dot, as a string
    if base == "str" and isinstance(value, str):
        return value
    if base == "list" and isinstance(value, (list, tuple)):
        return list(value)
    if base not in _KINDS:
        return value  # a type this module does not know: the section's own rules check it
    need = _KINDS[base] + (" or null" if "None" in kinds else "")
    hint = f" (quoted strings such as {value!r} are not booleans)" if base == "bool" and isinstance(value, str) else ""
    raise ValueError(f"{name} must be {need}, got {value!r}{hint}")


def check_types(section, where: str) -> None:
    """Check (and normalise in place) every field of a section dataclass against its annotation."""
    for f in fields(section):
        setattr(section, f.name, coerce(f"{where}.{f.name}", str(f.type), getattr(section, f.name)))


def check_str_list(name: str, value, *, allow_none: bool = False, allow_empty: bool = False) -> None:
    """A list of non-empty strings (module names, scorer specs, paths)."""
    if value is None and allow_none:
        return
    if not isinstance(value, list) or (not value and not allow_empty) \
            or not all(isinstance(x, str) and x.strip() for x in value):
        raise ValueError(f"{name} must be a {'' if allow_empty else 'non-empty '}list of non-empty strings, "
                         f"got {value!r}")


def check_max_steps(name: str, value: int) -> None:
    """-1 (train the configured epochs) or a positive step count; 0 would train nothing and look done."""
    if value == 0 or value < -1:
        raise ValueError(f"{name}={value}: use -1 to train for the configured epochs, or a positive number of "
                         "optimiser steps (0 would train nothing and leave the policies unchanged)")


def positive(name: str, value, *, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = _is_number(value) and (value > 0 or (allow_zero and value == 0))
    if not ok:
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")


def resolve_weights(weights: list, n_objectives: int, where: str) -> list[list[float]]:
    """Turn ``weights`` (numbers for N=2, or vectors of length N) into a list of simplex vectors.

    Raises ValueError for an empty list, a vector of the wrong length, or one off the simplex (the MOD ops'
    :func:`sipo_fast.ops.mod.check_weights`: entries >= 0 summing to 1 within its ``WEIGHT_TOL``), naming the
    offending entry and ``where`` it came from.
    """
    from sipo_fast.ops.mod import check_weights

    if not isinstance(weights, (list, tuple)) or len(weights) == 0:
        raise ValueError(f"{where}: give a non-empty list of weights, e.g. [0.2, 0.4, 0.6, 0.8] for two objectives")
    out = []
    for w in weights:
        if _is_number(w):
            if n_objectives != 2:
                raise ValueError(f"{where}: the bare weight {w} is shorthand for [w, 1-w], which only works with two "
                                 f"objectives; with {n_objectives} objectives give vectors of length {n_objectives}")
            vec = [float(w), round(1.0 - float(w), 12)]  # round: 1 - 0.7 is 0.30000000000000004
        elif isinstance(w, (list, tuple)) and all(_is_number(x) for x in w):
            vec = [float(x) for x in w]
        else:
            raise ValueError(f"{where}: weight {w!r} is neither a number nor a list of numbers")
        if len(vec) != n_objectives:
            raise ValueError(f"{where}: weight {list(w)} has {len(vec)} entries but there are {n_objectives} "
                             "objectives")
        try:
            check_weights(vec, n_objectives)
        except ValueError as exc:
            raise ValueError(f"{where}: weight {w!r} -> {vec} is off the simplex: {exc}") from None
        out.append([x + 0.0 for x in vec])  # -0.0 -> 0.0, so that equal weights hash equal
    return out


# Class name -> section name ("AlignConfig" -> "align"), filled by sections.py; error messages name the section.
SECTION_NAMES: dict[str, str] = {}


class Section:
    """Shared dict conversion for the section dataclasses (strict about unknown keys), and type checks: every
    section's ``__post_init__`` is wrapped so that the fields are checked against their annotations first
    (:func:`check_types`), whether the section comes from YAML, an override or Python."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")

        def __post_init__(self):
            check_types(self, SECTION_NAMES.get(type(self).__name__, type(self).__name__))
            if own is not None:
                own(self)
        cls.__post_init__ = __post_init__

    @classmethod
    def from_dict(cls, data: dict | None, where: str):
        if data is not None and not isinstance(data, dict):
            raise ValueError(f"section '{where}' must be a mapping of keys to values, got {data!r}")
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in section '{where}'; valid keys: {sorted(known)}")
        return cls(**data)

    def check_positive(self, *names: str, allow_none: bool = False, allow_zero: bool = False) -> None:
        """:func:`positive` on each named field, the error naming it ``<section>.<field>``."""
        section = SECTION_NAMES.get(type(self).__name__, type(self).__name__)
        for name in names:
            positive(f"{section}.{name}", getattr(self, name), allow_none=allow_none, allow_zero=allow_zero)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
