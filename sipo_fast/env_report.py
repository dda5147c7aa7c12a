"""``python -m sipo_fast.env_report`` / ``sipo-fast env``: versions and build facts for bug reports."""
from __future__ import annotations

import importlib
import platform


def _version(name: str) -> str:
    try:
        return getattr(importlib.import_module(name), "__version__", "installed")
    except Exception as exc:
        return f"not available ({type(exc).__name__})"


def collect() -> dict:
    import torch

    from sipo_fast import _ext

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "sipo_fast": _version("sipo_fast"),
        "torch": torch.__version__,
        "torch.cuda (build)": torch.version.cuda or "none (CPU build)",
        "cuda available": torch.cuda.is_available(),
        "cuda device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "torch threads": torch.get_num_threads(),
    }
    for name in ("triton", "transformers", "trl", "peft", "datasets", "accelerate", "flash_attn"):
        info[name] = _version(name)
    ext = _ext.load()
    info["extension sipo_fast._C"] = "loaded" if ext is not None else f"NOT loaded: {_ext.error()}"
    if ext is not None:
        info["extension build"] = dict(ext.build_info())
    return info


def report() -> str:
    return "\n".join(f"{k:<24} {v}" for k, v in collect().items())


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
