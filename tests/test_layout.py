"""The package layout is the architecture: stages import downwards only, and nothing imports in a circle.

Parses every module of ovfast/ and kernels/ (no import needed) and checks the rules the
subpackage docstrings state.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ovfast

ROOT = Path(__file__).resolve().parents[1]

# Stage of each top-level room; a module may import its own stage or lower ones.
STAGES = {
    "errors": 0, "_C": 0, "terminal": 0,  # terminal: progress bars and argparse helpers, no ovfast imports
    "settings": 0,  # environment variables, read in one place; imports only errors
    "checkpoint": 1,
    "ops": 2, "kernels": 2,  # ops dispatches to the kernels lazily; the kernels call ops' references
    "distributed": 2,  # the tensor-parallel plan and collectives the sharded decoder calls
    "models": 3, "inputs": 3,  # siblings: neither imports the other
    "runtime": 4, "testing": 4,  # siblings too: the engine never imports the test support
    "api": 5,
    "tools": 6,  # bench and demo use the public API
    "server": 6,  # `ovfast serve`: the HTTP layer over the runtime
    "integrations": 6,  # adapters for other tools (lmms-eval) over the runtime
    "cli": 7, "__init__": 7, "__main__": 7,
}
SIBLINGS_APART = [("models", "inputs"), ("runtime", "testing")]
# The device-tiling kernels reuse two pure geometry leaves of inputs (they import nothing from ovfast).
KERNEL_LEAVES = {"ovfast.inputs.anyres", "ovfast.inputs.resample"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / "ovfast").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        name = "ovfast.kernels" + ("" if path.stem == "__init__" else f".{path.stem}")
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """(imported ovfast module, at module level?) for every import statement of the module."""
    is_pkg = path.stem == "__init__"
    package = name if is_pkg else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # "from pkg import sub" imports the submodule when there is one
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        else:
            continue
        for t in targets:
            if t == "ovfast" or t.startswith("ovfast."):
                found.append((t, id(node) in top))
    return found


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_top_level_is_only_the_public_face():
    top = sorted(p.name for p in (ROOT / "ovfast").glob("*.py"))
    assert len(top) <= 6, top
    assert set(top) <= {"__init__.py", "__main__.py", "api.py", "errors.py", "cli.py"}, top
    for name in ovfast.__all__:
        assert hasattr(ovfast, name), name


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_go_down(name):
    room = _room(name)
    for target, _ in _imports(name, MODULES[name]):
        if target not in MODULES and target != "ovfast._C":
            raise AssertionError(f"{name} imports {target}, which does not exist")
        other = _room(target)
        if room == "kernels" and target in KERNEL_LEAVES:
            continue
        assert STAGES[other] <= STAGES[room], f"{name} ({room}) imports {target} from the higher stage {other}"
        for a, b in SIBLINGS_APART:
            assert {room, other} != {a, b}, f"{name} imports {target}: {a} and {b} stay apart"


def test_kernel_leaves_import_nothing_from_ovfast():
    for leaf in KERNEL_LEAVES:
        assert [t for t, _ in _imports(leaf, MODULES[leaf]) if t != "ovfast.errors"] == [], leaf


def test_no_import_cycle():
    graph = {n: {t for t, top in _imports(n, p) if top and t in MODULES and t != n} for n, p in MODULES.items()}
    state: dict[str, int] = {}

    def visit(n, stack):
        state[n] = 1
        for m in graph[n]:
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
