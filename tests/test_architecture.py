"""The shape of the code base, checked from its syntax trees.

The core (`distill/`) never imports Prefect or the orchestration layer, its
modules import each other without cycles (deferred imports included: a cycle
hidden inside a function is still a cycle), and no function grows past about
80 lines without a reason written beside it.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "distill"
MAX_LINES = 80
LONG_OK = "long:"  # a function may exceed MAX_LINES when a comment on its def line says why


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def core_modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(CORE.rglob("*.py"))}


def imported(tree: ast.Module, known: set[str]) -> set[str]:
    """Every module of `known` that `tree` imports anywhere (top level or inside functions)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known}
    return out


def test_core_imports_no_prefect_and_no_orchestration_layer():
    offenders = []
    for name, tree in core_modules().items():
        for node in ast.walk(tree):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{name}: {m}" for m in mods
                          if m.split(".")[0] in ("prefect", "distill_flows", "distill_tasks", "flows", "tasks")]
    assert offenders == []


def test_core_has_no_import_cycle():
    trees = core_modules()
    known = set(trees)
    graph = {name: imported(tree, known) - {name} for name, tree in trees.items()}
    # A package's __init__ is imported by its submodules implicitly; ours hold docstrings only.
    for name, tree in trees.items():
        if (CORE / Path(*name.split(".")[1:]) / "__init__.py").exists():
            assert not imported(tree, known), f"{name}/__init__.py should not import modules"
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_a_cycle_is_found_when_there_is_one():
    a = ast.parse("from distill.b import x")
    b = ast.parse("def f():\n    from distill.a import y")
    known = {"distill.a", "distill.b"}
    assert imported(a, known) == {"distill.b"} and imported(b, known) == {"distill.a"}


def test_no_function_is_longer_than_80_lines_without_a_reason():
    long = []
    for path in [*CORE.rglob("*.py"), *(ROOT / "tasks").glob("*.py"), *(ROOT / "flows").glob("*.py")]:
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                header = "\n".join(lines[node.lineno - 1:node.body[0].lineno])
                if n > MAX_LINES and LONG_OK not in header:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert long == []


def test_every_stage_package_says_what_goes_in_and_out():
    for pkg in ("teacher", "filter", "train", "evaluate", "serve", "drift", "models"):
        doc = ast.get_docstring(ast.parse((CORE / pkg / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()) >= 3, pkg
