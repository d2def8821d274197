"""The package's shape: no import cycle (function-level imports included), files small enough to read, training mains
on about one screen, and benchmarks that use the library, never a command module or a training script."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "cm_diffusers"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set) -> set:
    """Every package module `path` imports, at any depth of the file, with the packages a dotted import runs."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        for candidate in candidates:
            if candidate not in modules or candidate == name:
                continue
            found.add(candidate)
            parts = candidate.split(".")
            for k in range(1, len(parts)):  # importing a.b.c runs a.b's __init__ first, unless we are inside a.b
                ancestor = ".".join(parts[:k])
                if ancestor in modules and not (name == ancestor or name.startswith(ancestor + ".")):
                    found.add(ancestor)
    return found


def test_no_import_cycles():
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    graph = {module_name(path): imported_modules(path, modules) for path in paths}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for neighbour in sorted(graph[node]):
            if state.get(neighbour) == "open":
                cycles.append(stack[stack.index(neighbour):] + [neighbour])
            elif neighbour not in state:
                visit(neighbour, stack + [neighbour])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("folder", ["cm_diffusers", "training", "benchmarks"])
def test_files_stay_readable(folder):
    long = {str(path.relative_to(REPO)): n for path in (REPO / folder).rglob("*.py")
            if (n := len(path.read_text().splitlines())) > 600}  # fmt: skip
    assert not long, f"files over 600 lines: {long}"


@pytest.mark.parametrize("script", ["train_consistency.py", "train_diffusion.py"])
def test_training_main_fits_on_a_screen(script):
    tree = ast.parse((REPO / "training" / script).read_text())
    main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
    assert main.end_lineno - main.lineno + 1 <= 120


def test_benchmarks_import_no_command_or_script():
    for path in (REPO / "benchmarks").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])  # fmt: skip
            for name in names:
                assert not name.startswith(("cm_diffusers.commands", "training")), f"{path.name} imports {name}"


def test_sampling_imports_no_teacher_code():
    """The scheduler and the pipeline's sampling path stand alone: no teacher sampler or adapter is imported."""
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    graph = {module_name(path): imported_modules(path, modules) for path in paths}
    for start in ("cm_diffusers.sampling", "cm_diffusers.scheduling_consistency"):
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo.extend(graph[node])
        assert not seen & {"cm_diffusers.teacher_sampling", "cm_diffusers.teachers"}, (start, sorted(seen))
