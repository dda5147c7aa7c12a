"""The one place that loads the compiled extension ``sipo_fast._C``.

``import sipo_fast`` never fails because the extension is missing; an op that needs it calls
:func:`require`, which raises with the reason the load failed and the command that builds it.
"""
from __future__ import annotations

import importlib
from typing import Any

_module: Any = None
_error: str | None = None
_tried = False

BUILD_HINT = (
    "Build it with `pip install --no-build-isolation -e .` from the repository root "
    "(needs g++ and the torch you run with), or run `make setup`. "
    "SIPO_FAST_SKIP_EXT=1 at build time skips it on purpose."
)


def load() -> Any | None:
    """Import ``sipo_fast._C`` once; return it, or None (the reason is kept for :func:`error`)."""
    global _module, _error, _tried
    if not _tried:
        _tried = True
        try:
            import torch  # noqa: F401  (the extension links libtorch; load it first)

            _module = importlib.import_module("sipo_fast._C")
        except Exception as exc:  # ImportError, or an ABI mismatch surfacing as OSError
            _error = f"{type(exc).__name__}: {exc}"
    return _module


def available() -> bool:
    return load() is not None


def error() -> str | None:
    """Why the extension did not load (None if it did)."""
    load()
    return _error


def require(feature: str) -> Any:
    """Return the extension or raise a RuntimeError that says how to get it."""
    mod = load()
    if mod is None:
        raise RuntimeError(
            f"{feature} needs the compiled extension sipo_fast._C, which did not load ({_error}). {BUILD_HINT}"
        )
    return mod
