"""The package's structure bar: no private name imported across modules, no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import fanlens

PACKAGE = Path(fanlens.__file__).parent


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = (ast.parse(path.read_text()), path.name == "__init__.py")
    return out


def _target(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(tree: ast.Module, module: str, is_pkg: bool, top_level_only: bool):
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            yield _target(module, is_pkg, node), [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def test_no_private_name_is_imported_across_modules():
    found = []
    for module, (tree, is_pkg) in _modules().items():
        for target, names in _imports(tree, module, is_pkg, top_level_only=False):
            if not target.startswith("fanlens"):
                continue
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    found.append(f"{module} imports {target}.{n}")
    assert found == []


def test_no_import_cycle_at_module_level():
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for module, (tree, is_pkg) in mods.items():
        deps = set()
        for target, names in _imports(tree, module, is_pkg, top_level_only=True):
            for cand in [f"{target}.{n}" for n in names] + [target]:
                if cand in mods and cand != module:
                    deps.add(cand)
                    break
        graph[module] = deps
    # a package's __init__ imports its submodules by design; cycles through it are import order, not design
    graph = {m: {d for d in ds if not module_is_parent(d, m)} for m, ds in graph.items()}
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for d in sorted(graph[m]):
            visit(d)
        stack.pop()

    for m in sorted(graph):
        visit(m)
    assert cycles == []


def module_is_parent(candidate: str, module: str) -> bool:
    return module.startswith(candidate + ".")
