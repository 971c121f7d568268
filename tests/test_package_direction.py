"""Package direction (issue #9, seam 7): which part of solotune may import which.

Read from the source with ``ast`` -- every ``import`` / ``from ... import`` anywhere in a module,
the lazy ones inside functions included (a lazy import is still a dependency; it only moves the
failure to run time). A node of the package graph is a subpackage (``train``, ``bench``,
``parallel``, ``peft``, ``checkpoint``, ``data``) or a top-level module (``api``, ``model``, ...).
"""

from __future__ import annotations

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1] / "solotune"


def _modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """dotted module name -> (file, is a package ``__init__``)."""
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return out


MODULES = _modules(ROOT)


def imports_of(name: str, modules: dict[str, tuple[Path, bool]] = MODULES) -> set[str]:
    """The solotune modules that module ``name`` imports (``from pkg import sub`` counts as
    ``pkg.sub`` when ``sub`` is a module, else as ``pkg``)."""
    path, is_pkg = modules[name]
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                found.add(sub if sub in modules else mod)
    return {m for m in found if m in modules and m != name}


def node_of(module: str) -> str:
    """``solotune.train.state`` -> ``train``; ``solotune.api`` -> ``api``; ``solotune`` -> ``solotune``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _edges(modules: dict[str, tuple[Path, bool]] = MODULES) -> dict[tuple[str, str], list[str]]:
    """(node, node) -> the module imports that make the edge."""
    edges: dict[tuple[str, str], list[str]] = {}
    for m in modules:
        for t in imports_of(m, modules):
            a, b = node_of(m), node_of(t)
            if a != b:
                edges.setdefault((a, b), []).append(f"{m} -> {t}")
    return edges


def _graph(pairs) -> dict[str, set[str]]:
    g: dict[str, set[str]] = {}
    for a, b in pairs:
        g.setdefault(a, set()).add(b)
    return g


# ---------------------------------------------------------------------------- the checker
def test_the_checker_sees_lazy_relative_and_cyclic_imports(tmp_path):
    """The parser finds a function-level relative import, and the cycle finder reports a cycle."""
    pkg = tmp_path / "solotune"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("from .x import f\n")
    (pkg / "a" / "x.py").write_text("def f():\n    from ..b import g\n    return g\n")
    (pkg / "b.py").write_text("from .a import x\n")
    mods = _modules(pkg)
    assert imports_of("solotune.a.x", mods) == {"solotune.b"}
    assert imports_of("solotune.b", mods) == {"solotune.a.x"}
    assert cycles(_graph(_edges(mods))) == [["a", "b"]]
    assert cycles({"p": {"q"}, "q": {"r"}, "r": set()}) == []


# ------------------------------------------------------------------------------- solotune
def test_parallel_package_exists_and_dist_is_gone():
    assert (ROOT / "parallel" / "__init__.py").is_file()
    assert not (ROOT / "dist").exists()  # tools read dist/ as build output


def test_no_import_cycle_between_packages():
    edges = _edges()
    found = cycles(_graph(edges))
    detail = {c: [e for (a, b), es in edges.items() if a in c and b in c for e in es] for c in map(tuple, found)}
    assert not found, f"import cycles between packages: {detail}"


def test_parallel_imports_neither_train_nor_bench():
    bad = [f"{m} -> {t}" for m in MODULES if node_of(m) == "parallel"
           for t in imports_of(m) if node_of(t) in ("train", "bench")]
    assert not bad, f"solotune/parallel must offer primitives that train/ calls, not call back: {bad}"


def test_bench_cell_and_hf_cell_do_not_import_each_other_both_ways():
    cell, hf = "solotune.bench.cell", "solotune.bench.hf_cell"
    assert not (hf in imports_of(cell) and cell in imports_of(hf))


def test_no_import_cycle_between_modules():
    found = cycles({m: imports_of(m) for m in MODULES})
    assert not found, f"modules that import each other (directly or around a loop): {found}"
