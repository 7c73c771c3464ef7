"""The package's layer rules, read from the code's own imports (docs/architecture.md).

- Only the store layer imports MLflow.
- The engine imports only torch(vision), numpy, the standard library and the study's own engine (plus
  `study.protocol.plan`, whose schema imports are for annotations only), and the Ray backend
  Ray itself: a bare GPU machine runs it. Checked twice: statically on the source, and by importing each engine module in a fresh
  interpreter and looking at `sys.modules`.
- No import cycle between study modules, counting imports inside functions (a lazy import hides
  a cycle, it does not remove it) but not `if TYPE_CHECKING:` blocks, which never run.
- No `_private` name imported from another module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "study"
ENGINE_MAY_IMPORT = {"torch", "torchvision", "numpy", "study"}
# A backend module is the engine's door to its scheduler, so it may import it; the GPU check
# never loads it.
BACKEND_MAY_IMPORT = {"study.engine.backend_ray": {"ray"}}
ENGINE_STUDY_IMPORTS = ("study.engine", "study.protocol.plan")
NOT_IN_ENGINE = ("pandas", "scipy", "mlflow", "pydantic", "yaml")


@dataclass(frozen=True)
class Import:
    module: str      # the importing module, e.g. study.engine.train
    target: str      # the imported module, e.g. study.protocol.plan
    names: tuple[str, ...]  # names taken from it (from-imports only)
    line: int


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def imports_of(name: str, path: Path, known: set[str]) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    found = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [Import(name, a.name, (), node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                # `from study.engine import data` imports the module study.engine.data.
                sub = f"{node.module}.{a.name}"
                target = sub if sub in known else node.module
                found.append(Import(name, target, (a.name,), node.lineno))
    return found


def all_imports() -> list[Import]:
    mods = modules()
    known = set(mods)
    return [i for name, path in mods.items() for i in imports_of(name, path, known)]


def test_the_layers_exist_and_the_package_top_is_small():
    layers = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert {"protocol", "engine", "store", "analysis", "results", "report", "tools"} <= layers
    top = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in {"__init__.py", "__main__.py"})
    assert len(top) <= 4, top


def test_only_the_store_imports_mlflow():
    leaks = [f"{i.module}:{i.line}" for i in all_imports()
             if i.target.split(".")[0] == "mlflow" and not i.module.startswith("study.store")]
    assert not leaks, f"mlflow imported outside study/store: {leaks}"


def test_the_engine_imports_only_torch_numpy_and_the_standard_library():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    bad = []
    for i in all_imports():
        if not i.module.startswith("study.engine"):
            continue
        top = i.target.split(".")[0]
        if top in stdlib or top in BACKEND_MAY_IMPORT.get(i.module, ()):
            continue
        if top not in ENGINE_MAY_IMPORT or (top == "study"
                                            and not i.target.startswith(ENGINE_STUDY_IMPORTS)):
            bad.append(f"{i.module}:{i.line} imports {i.target}")
    assert not bad, bad


@pytest.mark.parametrize("module", sorted(m for m in modules() if m.startswith("study.engine")))
def test_importing_an_engine_module_loads_none_of_the_heavy_libraries(module):
    # What the backend's own scheduler loads (Ray loads yaml) is loaded first and not counted.
    before = "".join(f"import {m}\n" for m in sorted(BACKEND_MAY_IMPORT.get(module, ())))
    code = (f"import sys\n{before}had = set(sys.modules)\nimport {module}\n"
            f"print(','.join(m for m in {NOT_IN_ENGINE!r} if m in set(sys.modules) - had))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "", f"importing {module} loaded {out}"


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle in a directed graph as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_finds_a_planted_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_study_modules():
    mods = set(modules())
    edges: dict[str, set[str]] = {}
    for i in all_imports():
        if i.target in mods and i.target != i.module:
            edges.setdefault(i.module, set()).add(i.target)
    # A package's __init__ imported on the way to a submodule is not an edge worth a cycle:
    # only the modules named in the import statements count.
    assert find_cycle(edges) is None, f"import cycle: {' -> '.join(find_cycle(edges))}"


def test_no_private_name_crosses_modules():
    crossings = [f"{i.module}:{i.line} imports {i.target}.{n}" for i in all_imports()
                 for n in i.names if n.startswith("_") and i.target.startswith("study")]
    assert not crossings, crossings
