"""The layer rule, read from the import graph: lower layers never import higher ones, no module
imports itself back through a cycle, and no module imports another module's private names.

The layers, lowest first, are listed in ARCHITECTURE.md; :data:`LAYERS` is their one definition.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"advedge": ROOT / "advedge", "advedge.export": ROOT / "export"}
PACKAGES["advedge.calibration"] = ROOT / "calibration"

# (layer name, module prefixes). A module belongs to the layer of its longest matching prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "base",
        (
            "advedge",
            "advedge.errors",
            "advedge.utils",
            "advedge.config",
            "advedge.registry",
            "advedge.stats",
            "advedge.locks",
            "advedge.outputs",
            "advedge.distributed",
        ),
    ),
    ("data", ("advedge.data",)),
    (
        "models",
        (
            "advedge.models",
            "advedge.checkpoint",
            "advedge.purifier.networks",
            "advedge.purifier.checkpoint",
        ),
    ),
    ("attacks", ("advedge.attacks",)),
    ("training", ("advedge.training", "advedge.purifier", "advedge.purifier.losses")),
    ("evaluation", ("advedge.evaluation", "advedge.purifier.evaluate")),
    ("export", ("advedge.export",)),
    ("calibration", ("advedge.calibration",)),
    ("runtime", ("advedge.export.runtime", "advedge.export.tensorrt")),
    (
        "exporter",
        (
            "advedge.export.exporter",
            "advedge.export.precisions",
            "advedge.export.targets",
            "advedge.export.gates",
            "advedge.export.artifacts",
        ),
    ),
    ("qat", ("advedge.qat",)),
    ("report", ("advedge.report",)),
    ("workflow", ("advedge.workflow",)),
    ("cli", ("advedge.cli", "advedge.__main__")),
]


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join((pkg, *parts))
            if name.startswith("advedge.export") and pkg == "advedge":
                continue  # the folders are separate on disk
            mods[name] = path
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(target module, imported names, line) for each import of a project module."""
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "advedge":
                    found.append((alias.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "advedge":
                continue
            names = []
            for alias in node.names:
                if f"{target}.{alias.name}" in MODULES:
                    found.append((f"{target}.{alias.name}", [], node.lineno))
                else:
                    names.append(alias.name)
            if names:
                found.append((target, names, node.lineno))
    return found


def _layer(name: str) -> int:
    best, best_len = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    return best


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_every_module_has_a_layer() -> None:
    assert [m for m in MODULES if _layer(m) < 0] == []
    assert len(MODULES) > 50  # the graph was really read


def test_no_upward_import() -> None:
    upward = [
        f"{MODULES[src].relative_to(ROOT)}:{line}: {src} ({LAYERS[_layer(src)][0]}) imports "
        f"{dst} ({LAYERS[_layer(dst)][0]})"
        for src, edges in GRAPH.items()
        for dst, _, line in edges
        if dst in MODULES and _layer(dst) > _layer(src)
    ]
    assert upward == []


def test_no_import_cycle() -> None:
    edges = {src: {d for d, _, _ in e if d in MODULES and d != src} for src, e in GRAPH.items()}
    # a package's __init__ re-exporting its own submodules is not a cycle through them
    for src in edges:
        edges[src] = {d for d in edges[src] if not d.startswith(src + ".")}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert cycles == []


def test_no_private_import_across_modules() -> None:
    private = [
        f"{MODULES[src].relative_to(ROOT)}:{line}: {dst}.{n}"
        for src, edges in GRAPH.items()
        for dst, names, line in edges
        for n in names
        if n.startswith("_") and not n.startswith("__") and dst != src
    ]
    assert private == []


@pytest.mark.parametrize(
    ("src", "dst"),
    [("advedge.data", "advedge.models"), ("advedge.export.graph", "advedge.export.exporter")],
)
def test_the_checks_see_an_upward_edge(src: str, dst: str) -> None:
    assert _layer(dst) > _layer(src)


MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
REASON = ("# long:", "# one long function")  # a reason, written on the def line or just below


def _long_functions(path: Path, root: Path = ROOT) -> list[str]:
    lines = path.read_text().splitlines()
    found = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if node.end_lineno - node.lineno + 1 <= MAX_FUNCTION_LINES:
            continue
        first = node.body[0]
        doc_end = first.end_lineno if isinstance(first, ast.Expr) else node.lineno
        head = lines[node.lineno - 1 : doc_end + 2]
        if not any(marker in line for line in head for marker in REASON):
            found.append(f"{path.relative_to(root)}:{node.lineno} {node.name}")
    return found


def test_modules_and_functions_stay_short() -> None:
    long_modules = [
        f"{p.relative_to(ROOT)} ({n} lines)"
        for p in MODULES.values()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    assert long_modules == []
    assert [f for p in MODULES.values() for f in _long_functions(p)] == []


def test_the_length_check_sees_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    src = tmp_path / "m.py"
    src.write_text(f"def f():\n{body}\n")
    assert _long_functions(src, tmp_path) == ["m.py:1 f"]
    src.write_text(f"def f():  # long: a reason\n{body}\n")
    assert _long_functions(src, tmp_path) == []
