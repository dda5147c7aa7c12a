"""The package's layers import one way (README "Layout"): a module may import its own layer and the layers
below it, never one above. Every import statement counts, the ones inside functions included (most of the
package's imports are lazy, so an upward one would fail only at run time, if ever).

Order, bottom to top: kernels < _ext < ops < {data, models, scoring, merging, distributed} < kv < decoding <
training < eval < pipeline < cli. ``kernels`` (the Triton kernels) imports nothing of sipo_fast at all. The
package's own ``__init__`` (lazy re-exports of the public names) and ``env_report`` (which reports on every
layer) stand outside the order.

Inside the pipeline the rooms have an order of their own: {config, datacheck} < rundir < context < policies <
baselines < stages < preflight < runner (the evaluation stage runs the baselines' comparison, so the baselines
come before the stages); ``pipeline/__init__`` (the public names) stands outside it. And no module of the
project imports itself back through others: the import graph, function-level imports included, has no circle.
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
PIPELINE_ORDER = [["config", "datacheck"], ["rundir"], ["context"], ["policies"], ["baselines"], ["stages"],
                  ["preflight"], ["runner"]]
PIPELINE_RANK = {name: i for i, names in enumerate(PIPELINE_ORDER) for name in names}


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


def pipeline_room(module: str) -> str | None:
    """'stages' for sipo_fast.pipeline.stages.*, 'context' for sipo_fast.pipeline.context; None outside the
    pipeline and for the pipeline package itself."""
    parts = module.split(".")
    return parts[2] if parts[:2] == ["sipo_fast", "pipeline"] and len(parts) > 2 else None


def pipeline_violations(files) -> list[str]:
    bad = []
    for path in files:
        src = pipeline_room(module_name(path))
        if src is None:
            continue
        for line, target in imported_modules(path):
            dst = pipeline_room(target)
            where = f"{path.relative_to(ROOT)}:{line} imports {target}"
            if dst is None or dst == src:
                continue
            if src not in PIPELINE_RANK or dst not in PIPELINE_RANK:
                bad.append(f"{where}: pipeline room {src if src not in PIPELINE_RANK else dst!r} is not in "
                           "PIPELINE_ORDER; add it")
            elif PIPELINE_RANK[dst] > PIPELINE_RANK[src]:
                bad.append(f"{where}: pipeline/{src} may not import pipeline/{dst}, a later room")
    return bad


def import_graph(files) -> dict[str, set[str]]:
    """{module: modules of the project it imports}, every import statement counted; ``from pkg import name``
    points at the submodule pkg.name when there is one, else at pkg."""
    modules = {module_name(p) for p in files}
    graph = {}
    for path in files:
        mod = module_name(path)
        out = set()
        for _, target in imported_modules(path):
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]  # sipo_fast.pipeline.rundir.RunDir -> ...rundir (a package)
            if target in modules and target != mod:
                out.add(target)
        graph[mod] = out
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_no_upward_imports():
    assert violations(project_files()) == []


def test_pipeline_rooms_import_in_order():
    assert pipeline_violations(project_files()) == []


def test_no_import_circles():
    assert circles(import_graph(project_files())) == []


def test_every_layer_is_in_the_order():
    names = {layer_of(module_name(p)) for p in project_files()}
    assert names - OUTSIDE <= set(RANK), f"unordered layers: {sorted(names - OUTSIDE - set(RANK))}"
    rooms = {pipeline_room(module_name(p)) for p in project_files()} - {None}
    assert rooms <= set(PIPELINE_RANK), f"unordered pipeline rooms: {sorted(rooms - set(PIPELINE_RANK))}"


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


@pytest.mark.parametrize("room, source, expected", [
    ("context.py", "def f():\n    from .preflight import check_inputs\n",
     "pipeline/context may not import pipeline/preflight"),
    ("stages/filter.py", "from ..runner import SIPOPipeline\n", "pipeline/stages may not import pipeline/runner"),
    ("config/sections.py", "def f():\n    from ..stages.refine_prompts import TEMPLATE_SETS\n",
     "pipeline/config may not import pipeline/stages"),
])
def test_the_checker_catches_a_pipeline_room_importing_a_later_one(monkeypatch, room, source, expected):
    fake = ROOT / "sipo_fast" / "pipeline" / room
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source if self == fake else _read(self))
    (found,) = pipeline_violations([fake])
    assert expected in found


def test_the_checker_finds_a_circle(monkeypatch):
    """shared_prompt importing logprobs back (inside a function), as it once did, is a circle of the two."""
    target = ROOT / "sipo_fast" / "training" / "shared_prompt.py"
    planted = _read(target) + "\n\ndef _planted():\n    from .logprobs import policy_logprobs\n"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: planted if self == target else _read(self))
    assert circles(import_graph(project_files())) == [["sipo_fast.training.logprobs",
                                                       "sipo_fast.training.shared_prompt"]]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_checker_catches_a_kernel_importing_the_package(monkeypatch):
    fake = ROOT / "kernels" / "_planted_for_test.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "def f():\n    import sipo_fast.ops.mod\n"
                        if self == fake else _read(self))
    (found,) = violations([fake])
    assert "kernels import nothing of sipo_fast" in found


_read = Path.read_text
