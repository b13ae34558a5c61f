"""The package layout is the architecture: every import (function-level ones included) goes to the same layer or a
lower one, and no two modules import each other, directly or round a loop. Read from the source with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

import pdray

ROOT = Path(pdray.__file__).parent
CLI = ROOT.parent / "cli"  # installed as pdray.cli

LAYERS = [  # lowest first: a module may import from its own layer and those before it
    (
        "basics",
        ("pdray.types", "pdray.rng", "pdray.files", "pdray.imaging", "pdray.prompts", "pdray.backends", "pdray.memory"),
    ),
    ("geometry and rendering", ("pdray.geometry", "pdray.render")),
    ("config", ("pdray.config",)),
    ("priors", ("pdray.priors",)),
    ("distillation core", ("pdray.vsd",)),
    ("evaluation and pages", ("pdray.evaluation",)),
    ("run loop and executors", ("pdray.run",)),
    ("cluster", ("pdray.cluster",)),
    ("studies", ("pdray.study",)),
    ("command line", ("pdray.cli",)),
]


def layer_of(module: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer: add it to a package of LAYERS")


def modules() -> dict[str, Path]:
    found = {}
    for base, name in ((ROOT, "pdray"), (CLI, "pdray.cli")):
        for path in base.rglob("*.py"):
            parts = path.relative_to(base).with_suffix("").parts
            found[".".join((name, *parts)).removesuffix(".__init__")] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported pdray module, line, inside a function) for every import in the file."""
    tree = ast.parse(path.read_text())
    functions = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)]
    inside = {id(n) for f in functions for n in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pdray"):
            full = [f"{node.module}.{a.name}" for a in node.names]
            names = [name if name in known else node.module for name in full]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("pdray")]
        out += [(name, node.lineno, id(node) in inside) for name in names]
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: {name for name, _, _ in imports(p, known) if name != m and name != "pdray"} for m, p in known.items()}


def test_every_module_imports_only_from_its_layer_or_below():
    known = modules()
    wrong = []
    for module, path in known.items():
        if module == "pdray":
            continue
        for name, line, _ in imports(path, known):
            if name != "pdray" and layer_of(name) > layer_of(module):
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line} {module} -> {name}")
    assert not wrong, "imports from a higher layer:\n" + "\n".join(wrong)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import loop of the graph (a list of modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for dep in sorted(edges.get(module, ())):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], module, dep] if dep in path else [module, dep]
            if dep not in state and (loop := visit(dep, [*path, module])):
                return loop
        state[module] = 2
        return None

    for module in sorted(edges):
        if module not in state and (loop := visit(module, [])):
            return loop
    return None


def test_no_import_cycle():
    loop = find_cycle(graph())
    assert loop is None, "import cycle: " + " -> ".join(loop or [])


def test_library_code_imports_pdray_at_the_top():
    """Imports inside functions hide cycles; only the command line defers them (its startup time)."""
    known = modules()
    hidden = [
        f"{path.relative_to(ROOT.parent)}:{line} -> {name}"
        for module, path in known.items()
        if module != "pdray" and layer_of(module) < layer_of("pdray.cli")
        for name, line, in_function in imports(path, known)
        if in_function
    ]
    assert not hidden, "pdray imports inside functions:\n" + "\n".join(hidden)


def test_the_checks_see_a_cycle_and_a_climb(tmp_path):
    """The checks above can fail: a loop of three, a function-level import from a higher layer."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    lower = tmp_path / "lower.py"
    lower.write_text("def f():\n    from pdray.cluster.driver import RayExecutor\n")
    assert imports(lower, modules()) == [("pdray.cluster.driver", 2, True)]
    assert layer_of("pdray.cluster.driver") > layer_of("pdray.vsd.score")
