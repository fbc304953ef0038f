"""The shape of the code base, checked from its syntax trees.

The core (`distill/`) never imports Prefect or the orchestration layer, its
modules import each other without cycles (deferred imports included: a cycle
hidden inside a function is still a cycle), and no function grows past about
80 lines without a reason written beside it.
"""

import ast
import functools
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


# --- one home for the offline environment -----------------------------------------------------

OFFLINE_HOME = CORE / "offline.py"
PYTHON_TREES = ("distill", "tasks", "flows", "tests", "bench", "scripts", "deployments", "docker")


@functools.cache
def python_trees() -> dict[Path, ast.Module]:
    """Every Python file of the project, parsed (the distill_flows/distill_tasks links are the same files)."""
    paths = sorted(p for top in PYTHON_TREES if (ROOT / top).is_dir() for p in (ROOT / top).rglob("*.py"))
    return {p: ast.parse(p.read_text(), str(p)) for p in paths}


def offline_settings(tree: ast.AST, names: set[str]) -> list[int]:
    """Lines that name one of the offline variables, as a string (an environ key, a dict key) or a keyword."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value in names:
            found.append(node.lineno)
        elif isinstance(node, ast.keyword) and node.arg in names:
            found.append(node.value.lineno)
    return found


def test_offline_variables_are_set_only_in_distill_offline():
    from distill.offline import OFFLINE_ENV

    names = set(OFFLINE_ENV)
    offenders = [f"{p.relative_to(ROOT)}:{line}" for p, tree in python_trees().items() if p != OFFLINE_HOME
                 for line in offline_settings(tree, names)]
    assert offenders == [], "use distill.offline (apply_offline_env or OFFLINE_ENV) instead"


def test_an_offline_variable_set_elsewhere_is_found():
    names = {"SOME_HUB_OFFLINE", "SOME_TELEMETRY"}  # stand-ins: the real names would trip the check above
    tree = ast.parse('import os\nos.environ["SOME_HUB_OFFLINE"] = "1"\nenv = dict(os.environ, SOME_TELEMETRY="1")\n'
                     'os.environ.setdefault("PATH", "/bin")')
    assert offline_settings(tree, names) == [2, 3]


def _assignments(text: str, pattern: str) -> dict[str, str]:
    import re

    return {k: v.strip('"\'') for k, v in re.findall(pattern, text)}


def test_shell_and_image_settings_agree_with_distill_offline():
    """Processes that start before Python (the shell's, the images', the pools') get the same values."""
    import yaml

    from distill.offline import OFFLINE_ENV

    for path in ("scripts/venv.sh", "docker/Dockerfile.cpu", "docker/Dockerfile.cuda"):
        found = _assignments((ROOT / path).read_text(), r"\b([A-Z_]+)=(\S+?)(?=\s|\\|$)")
        assert {k: found.get(k) for k in OFFLINE_ENV} == OFFLINE_ENV, path
    pools = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())["definitions"]["work_pools"]
    for name, pool in pools.items():
        env = pool["job_variables"].get("env", {})
        assert {k: v for k, v in env.items() if k in OFFLINE_ENV} == {k: OFFLINE_ENV[k] for k in env
                                                                     if k in OFFLINE_ENV}, name


# --- the orchestration layer installs under names of its own --------------------------------------

def test_flows_and_tasks_do_not_claim_generic_top_level_names():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setup = project["tool"]["setuptools"]
    assert not {"flows", "tasks"} & {p.split(".")[0] for p in setup["packages"]}
    assert setup["package-dir"] == {"distill_flows": "flows", "distill_tasks": "tasks"}
    assert project["project"]["scripts"] == {"distill": "distill_flows.cli:app"}
    # Code reaches the layer by its installed names only, so nothing depends on the folder names.
    offenders = []
    for path, tree in python_trees().items():
        for node in ast.walk(tree):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{path.relative_to(ROOT)}: {m}" for m in mods if m.split(".")[0] in ("flows", "tasks")]
    assert offenders == []


def test_each_shared_piece_is_defined_in_its_one_home():
    homes = {"ApiError": "distill.chat", "MIN_LOGPROB": "distill.chat", "token_logprob": "distill.chat",
             "safe_log": "distill.chat", "OFFLINE_ENV": "distill.offline", "apply_offline_env": "distill.offline",
             "start_in_thread": "distill.httpserver", "free_port": "distill.httpserver",
             "minimal_chat_app": "distill.httpserver", "wait_for_health": "distill.httpserver",
             "stop_process": "distill.httpserver"}
    defined: dict[str, list[str]] = {}
    for name, tree in core_modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [node.name]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t.id for t in targets if isinstance(t, ast.Name)]
            else:
                continue
            for n in names:
                if n in homes:
                    defined.setdefault(n, []).append(name)
    assert defined == {n: [home] for n, home in homes.items()}


def test_no_task_between_the_cycles_stages_takes_rows_as_an_argument():
    """Rows move between the cycle's stages as files: a task argument of rows would be walked by Prefect
    and shipped whole to a distributed worker. Only the filter's inner stages take lists, quote()d, in the
    flow's own process (distill_tasks.filter.filter_rows), because they need every row at once.
    (drift-watch, not checked here, hands its tasks one bounded window of logged traffic.)"""
    import importlib
    import inspect

    from prefect import Task

    offenders = []
    for path in [ROOT / "tasks" / f"{m}.py" for m in ("preflight", "generate", "filter", "train", "evaluate")]:
        module = importlib.import_module(f"distill_tasks.{path.stem}")
        for name, obj in vars(module).items():
            if not isinstance(obj, Task) or obj.fn.__module__ != module.__name__ or obj.name.startswith("filter-"):
                continue
            for param in inspect.signature(obj.fn).parameters.values():
                if "list[dict]" in str(param.annotation):
                    offenders.append(f"tasks/{path.name}: {name}({param.name}: {param.annotation})")
    assert offenders == []
