"""The package's layers import one way (README "Layout"): a module may import its own layer and the layers
below it, never one above. Every import statement counts, the ones inside functions included (most of the
package's imports are lazy, so an upward one would fail only at run time, if ever).

Order, bottom to top: kernels < _ext < ops < {data, models, scoring, merging, distributed} < kv < decoding <
training < eval < pipeline < cli. ``kernels`` (the Triton kernels) imports nothing of sipo_fast at all. The
package's own ``__init__`` (lazy re-exports of the public names) and ``env_report`` (which reports on every
layer) stand outside the order.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORDER = [["kernels"], ["_ext", "_C"], ["ops"], ["data", "models", "scoring", "merging", "distributed"], ["kv"],
         ["decoding"], ["training"], ["eval"], ["pipeline"], ["cli"]]
RANK = {name: i for i, names in enumerate(ORDER) for name in names}
OUTSIDE = {"__init__", "env_report"}


def layer_of(module: str) -> str | None:
    """'kernels' for kernels.*, the first component under sipo_fast otherwise; None outside the project."""
    parts = module.split(".")
    if parts[0] == "kernels":
        return "kernels"
    if parts[0] != "sipo_fast":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    mod = module_name(path)
    package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                if node.module:
                    out.append((node.lineno, ".".join(base + [node.module])))
                else:  # from . import x: x is a module of that package
                    out += [(node.lineno, ".".join(base + [a.name])) for a in node.names]
            else:
                out.append((node.lineno, node.module))
                # from sipo_fast import pipeline: the named submodules count too
                if node.module == "sipo_fast":
                    out += [(node.lineno, f"sipo_fast.{a.name}") for a in node.names]
    return out


def project_files() -> list[Path]:
    return sorted((ROOT / "sipo_fast").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))


def violations(files) -> list[str]:
    bad = []
    for path in files:
        src = layer_of(module_name(path))
        for line, target in imported_modules(path):
            dst = layer_of(target)
            where = f"{path.relative_to(ROOT)}:{line} imports {target}"
            if src == "kernels" and target.split(".")[0] == "sipo_fast":
                bad.append(f"{where} (kernels import nothing of sipo_fast)")
            elif src in OUTSIDE or dst is None or dst in OUTSIDE or dst == "kernels":
                continue
            elif src not in RANK or dst not in RANK:
                bad.append(f"{where}: layer {src if src not in RANK else dst!r} is not in the order; add it to ORDER")
            elif RANK[dst] > RANK[src]:
                bad.append(f"{where}: {src} may not import {dst}, a higher layer")
    return bad


def test_no_upward_imports():
    assert violations(project_files()) == []


def test_every_layer_is_in_the_order():
    names = {layer_of(module_name(p)) for p in project_files()}
    assert names - OUTSIDE <= set(RANK), f"unordered layers: {sorted(names - OUTSIDE - set(RANK))}"


@pytest.mark.parametrize("source, expected", [
    ("def f():\n    from sipo_fast.pipeline.rundir import RunDir\n", "eval may not import pipeline"),
    ("from ..pipeline import compare\n", "eval may not import pipeline"),
    ("import sipo_fast.cli\n", "eval may not import cli"),
    ("from sipo_fast import pipeline\n", "eval may not import pipeline"),
])
def test_the_checker_catches_an_upward_import(tmp_path, monkeypatch, source, expected):
    """The check itself can fail: an upward import planted in an eval module (at module level, inside a
    function, relative, or as a submodule name) is reported."""
    fake = ROOT / "sipo_fast" / "eval" / "_planted_for_test.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source if self == fake else _read(self))
    (found,) = violations([fake])
    assert expected in found and "_planted_for_test.py:" in found


def test_the_checker_catches_a_kernel_importing_the_package(monkeypatch):
    fake = ROOT / "kernels" / "_planted_for_test.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "def f():\n    import sipo_fast.ops.mod\n"
                        if self == fake else _read(self))
    (found,) = violations([fake])
    assert "kernels import nothing of sipo_fast" in found


_read = Path.read_text
