"""The shape of the `alpaca` package (issue 20): a few top-level modules beside one subpackage per
script, no module over 550 lines, and no import circle.

The import graph is read with `ast` from every `import alpaca...` / `from alpaca... import ...`
statement of every module: at module level (including `if TYPE_CHECKING:` blocks, which is where
the old `finetune_settings` <-> `checkpoints` circle hid) and inside functions. An edge goes to the
module named, or to the package (its `__init__.py`) when the name is not a module; importing a
submodule's parent packages is not counted as an edge, since every submodule does it.

Two checks, with separate failures:
- the module-level graph has no cycle: such a cycle makes the import order matter and breaks on a
  partly initialised module, and it is a design circle even when only a type annotation closes it;
- the whole graph, function-level imports included, has no cycle either: a lazy import avoids the
  import-time error but not the circle, and the rooms should depend one way (scripts -> rooms ->
  core). If a lazy cycle ever becomes necessary, the first check is the one that must hold.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "alpaca"
MAX_TOP_LEVEL_MODULES = 8
MAX_LINES = 550


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def resolve(name: str) -> str | None:
    """The module that `import name` runs: `name` itself, else its closest package."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported alpaca module, whether the import is at module level) for every import in `path`."""
    found = []

    def visit(node, module_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = module_level and not isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
            )
            if isinstance(child, ast.Import):
                found.extend(
                    (resolve(a.name), module_level) for a in child.names if a.name.startswith("alpaca")
                )
            elif (
                isinstance(child, ast.ImportFrom)
                and child.level == 0
                and (child.module or "").startswith("alpaca")
            ):
                for alias in child.names:
                    full = f"{child.module}.{alias.name}"
                    found.append((full if full in MODULES else resolve(child.module), module_level))
            visit(child, inside)

    visit(ast.parse(path.read_text(encoding="utf-8")), True)
    return [(target, level) for target, level in found if target]


def import_graph(module_level_only: bool) -> dict[str, set[str]]:
    return {
        name: {
            target for target, level in imports(path) if target != name and (level or not module_level_only)
        }
        for name, path in MODULES.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of `graph` as a path that ends where it starts, or []."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_at_most_eight_top_level_modules():
    top_level = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(top_level) <= MAX_TOP_LEVEL_MODULES, f"{len(top_level)} top-level modules: {top_level}"


def test_no_module_over_550_lines():
    lengths = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in MODULES.items()}
    too_long = {name: n for name, n in lengths.items() if n > MAX_LINES}
    assert not too_long, f"over {MAX_LINES} lines: {too_long}"


def test_every_package_says_what_it_holds():
    for name, path in MODULES.items():
        if path.name == "__init__.py":
            assert ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))), f"{name} has no docstring"


def test_the_graph_reader_sees_imports_at_every_level():
    graph = import_graph(module_level_only=False)
    assert "alpaca.core.log" in graph["alpaca.finetune.checkpoints"]  # module level
    assert "alpaca.weights.gguf_import" in graph["alpaca.modeling"]  # inside a function only
    assert "alpaca.weights.gguf_import" not in import_graph(module_level_only=True)["alpaca.modeling"]
    assert "alpaca.finetune.settings" in graph["alpaca.finetune.checkpoints"]  # under TYPE_CHECKING
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_circle_at_module_level():
    cycle = find_cycle(import_graph(module_level_only=True))
    assert not cycle, "module-level import circle: " + " -> ".join(cycle)


def test_no_import_circle_through_function_level_imports():
    cycle = find_cycle(import_graph(module_level_only=False))
    assert not cycle, "import circle (through a function-level import): " + " -> ".join(cycle)
