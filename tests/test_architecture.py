"""The architecture's directions, read off the source (docs/architecture.md): the import graph of `hf_distill/` has no
cycle, the trainer imports the `teachers` package's API and never one of its modules, `teachers/` holds only sources,
`losses/` imports nothing of ours above it, no library module imports `cli/`, and no file is over 600 lines.

`python tests/test_architecture.py` prints the graph (every module and what it imports of ours, function-level
imports included).
"""

import ast
import importlib
import inspect
import sys
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "hf_distill"
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name | ast.Attribute) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The `hf_distill` modules `name` imports, anywhere in the file (module level or inside functions), outside
    `if TYPE_CHECKING:` blocks. `from pkg import sub` counts as an import of the submodule `pkg.sub`."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
               for n in ast.walk(node)}  # fmt: skip
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("hf_distill"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("hf_distill"):
                continue
            subs = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in known]
            found.update(subs)
            if len(subs) < len(node.names):
                found.add(target)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    """`module -> the hf_distill modules it imports`."""
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycle():
    found = cycles(import_graph())
    assert not found, f"import cycles: {found}"


def test_the_trainer_imports_the_teachers_package_api_only():
    graph = import_graph()
    submodules = sorted(m for m in graph["hf_distill.trainer"] if m.startswith("hf_distill.teachers."))
    assert "hf_distill.teachers" in graph["hf_distill.trainer"]
    assert not submodules, f"trainer.py imports teachers submodules: {submodules}"


def test_teachers_holds_only_sources():
    from hf_distill.teachers import SOURCES, TeacherSource

    registered = set(SOURCES.values())
    for path in sorted((PACKAGE / "teachers").glob("*.py")):
        if path.name in ("__init__.py", "base.py"):
            continue
        module = importlib.import_module(module_name(path))
        own = [c for _, c in inspect.getmembers(module, inspect.isclass)
               if c.__module__ == module.__name__ and issubclass(c, TeacherSource)]  # fmt: skip
        assert own, f"{path.name} defines no TeacherSource: teachers/ holds sources only"
        assert any(c in registered or any(base in registered for base in c.__mro__) for c in own), path.name


def test_layer_directions():
    graph = import_graph()
    for name, imported in graph.items():
        if name.startswith("hf_distill.losses"):
            above = sorted(m for m in imported if not m.startswith("hf_distill.losses"))
            assert not above, f"{name} (losses/) imports {above}"
        if not name.startswith("hf_distill.cli"):
            cli = sorted(m for m in imported if m.startswith("hf_distill.cli"))
            assert not cli, f"{name} imports {cli}"


def test_no_library_file_is_over_600_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


if __name__ == "__main__":
    graph = import_graph()
    for module in sorted(graph):
        lines = len(modules()[module].read_text().splitlines())
        print(f"{module} ({lines} lines)")
        for target in sorted(graph[module]):
            print(f"    -> {target}")
    print(f"\n{len(graph)} modules; cycles: {cycles(graph) or 'none'}")
