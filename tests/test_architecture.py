"""The package's declared layering holds: no import cycles, each module imports only from its
own layer or those below, the pure layer imports no TensorFlow, and modules and functions stay
small. docs/architecture.md draws these layers (`python tools/draw_architecture.py`) and lists
every module (`python -m tests.test_architecture` prints the table).

Imports are read from the source (every `import` statement, also those inside functions), so a
lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tfpipe"

# Bottom first. A module may import modules of its own layer and of the layers below it.
LAYERS: list[tuple[str, str, list[str]]] = [
    ("pure", "plain Python data and logic, no TensorFlow or Keras: errors, schedules as data, "
     "the passes over action lists, the partition solver, the options, the cost model",
     ["tfpipe.errors", "tfpipe.schedules", "tfpipe.schedules.*", "tfpipe.executor.program",
      "tfpipe.balance.solve", "tfpipe.options", "tfpipe.planner.costs", "tfpipe.planner.records",
      "tfpipe.processes", "tfpipe.report", "tfpipe.health", "tfpipe.memory_cgroup",
      "tfpipe.oom_report", "tfpipe.sentinel"]),
    ("runtime", "TensorFlow and Keras basics: devices, allocator statistics, data, atomic saves, "
     "building without storage",
     ["tfpipe.devices", "tfpipe.allocator", "tfpipe.data", "tfpipe.atomic", "tfpipe._keras",
      "tfpipe._keras.*", "tfpipe.build"]),
    ("graph", "the model as a graph of layer calls, its stages and where variables live; "
     "measuring them",
     ["tfpipe.partition", "tfpipe.partition.*", "tfpipe.placement", "tfpipe.measure",
      "tfpipe.balance", "tfpipe.balance.*", "tfpipe.traffic", "tfpipe.cut_traffic"]),
    ("executor", "interprets a schedule's action lists as Keras train / test / predict steps",
     ["tfpipe.executor", "tfpipe.executor.*"]),
    ("pipeline", "a model split, placed and lent the executor's steps for Keras's fit",
     ["tfpipe.pipeline", "tfpipe.oom"]),
    ("front", "what users call: fit, the planner, workers, the watchdog, callbacks",
     ["tfpipe.trainer", "tfpipe.planner", "tfpipe.planner.*", "tfpipe.cluster",
      "tfpipe.watchdog", "tfpipe.callbacks"]),
    ("entry", "the package's public surface and the command line",
     ["tfpipe", "tfpipe.cli", "tfpipe.cli_plan", "tfpipe.cli_worker", "tfpipe.__main__"]),
]
PURE = "pure"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60  # code lines, docstring excluded; more needs a "# long:" comment why


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """Every module name that module `name` imports anywhere in its source."""
    path = MODULES[name]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: None if path.name == "__init__.py" else -1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found |= {f"{module}.{a.name}" for a in node.names}
    return found


def tfpipe_imports(name: str) -> set[str]:
    """The tfpipe modules `name` imports, without the package itself (which importing any
    submodule runs first, whoever imports it)."""
    return {m for m in imports(name) if m in MODULES and m not in (name, "tfpipe")}


def layer_of(name: str) -> int:
    """The lowest layer with a pattern that matches the module (`balance.solve` is pure, the
    rest of `balance.*` is not)."""
    matches = [i for i, (_, _, patterns) in enumerate(LAYERS)
               if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    assert matches, f"{name} is in no layer: declare it in LAYERS"
    return matches[0]


def test_every_module_is_in_one_layer():
    for name in MODULES:
        layer_of(name)


def test_no_import_cycles():
    graph = {name: tfpipe_imports(name) for name in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [name, dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_modules_import_only_their_layer_and_below():
    wrong = [f"{name} ({LAYERS[layer_of(name)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})"
             for name in MODULES for dep in sorted(tfpipe_imports(name))
             if layer_of(dep) > layer_of(name)]
    assert not wrong, "\n".join(wrong)


def test_pure_layer_imports_no_tensorflow():
    pure = [name for name in MODULES if LAYERS[layer_of(name)][0] == PURE]
    assert "tfpipe.schedules" in pure and "tfpipe.executor.program" in pure
    for name in pure:
        heavy = {m for m in imports(name) if m.split(".")[0] in ("tensorflow", "keras")}
        assert not heavy, f"{name} is declared pure but imports {sorted(heavy)}"


def test_modules_and_functions_stay_small():
    long_modules, long_functions = [], []
    for name, path in MODULES.items():
        source = path.read_text()
        lines = source.splitlines()
        if len(lines) > MAX_MODULE_LINES:
            long_modules.append(f"{name}: {len(lines)} lines")
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = node.body
            docstring = (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                         and isinstance(body[0].value.value, str))
            start = body[1].lineno if docstring and len(body) > 1 else body[0].lineno
            code = node.end_lineno - start + 1
            said = any("# long:" in line for line in lines[node.lineno - 1:node.end_lineno])
            if code > MAX_FUNCTION_LINES and not said:
                long_functions.append(f"{name}.{node.name}: {code} lines")
    assert not long_modules, long_modules
    assert not long_functions, long_functions


def table() -> str:
    """docs/architecture.md's tables: the layers, then every module with its docstring's first
    line."""
    rows = ["| layer | may import | owns |", "|---|---|---|"]
    for i in reversed(range(len(LAYERS))):
        below = ", ".join(name for name, _, _ in reversed(LAYERS[:i]))
        rows.append(f"| {LAYERS[i][0]} | itself{', ' + below if below else ' only'} | "
                    f"{LAYERS[i][1]} |")
    rows += ["", "| layer | module | what it owns |", "|---|---|---|"]
    for i in reversed(range(len(LAYERS))):
        for name in sorted(n for n in MODULES if layer_of(n) == i):
            doc = ast.get_docstring(ast.parse(MODULES[name].read_text())) or ""
            first = doc.splitlines()[0].replace("|", "\\|") if doc else ""
            rows.append(f"| {LAYERS[i][0]} | `{name}` | {first} |")
    return "\n".join(rows)


def test_docs_show_the_current_table():
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    assert table() in text, "docs/architecture.md: paste `python -m tests.test_architecture`"


if __name__ == "__main__":
    print(table())
