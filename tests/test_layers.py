"""The package layers import downwards only: utils < models, datasets < engine < tricks < reporting < scripts.
Library code never imports `config` (flags stay at the edge: train.py and the other scripts)."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBRARY = ("utils", "models", "datasets", "engine", "tricks", "reporting")
# a package may import the packages listed for it, and nothing else of this repository's
ALLOWED = {
    "utils": set(),
    "models": {"utils"},
    "datasets": {"utils"},
    "engine": {"utils", "models", "datasets"},
    "tricks": {"utils", "models", "datasets", "engine"},
    "reporting": {"utils", "models", "datasets", "engine", "tricks"},
}
TOP_LEVEL = {p.stem for p in ROOT.glob("*.py")} | {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}


def _imports(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def test_library_imports_go_downwards_only():
    wrong = []
    for pkg in LIBRARY:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for name in _imports(path):
                if name in TOP_LEVEL and name != pkg and name not in ALLOWED[pkg]:
                    wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_allowed_graph_has_no_cycle():
    seen = set()

    def visit(pkg, stack):
        assert pkg not in stack, f"cycle: {' -> '.join(stack + (pkg,))}"
        if pkg not in seen:
            for dep in ALLOWED[pkg]:
                visit(dep, stack + (pkg,))
            seen.add(pkg)
    for pkg in ALLOWED:
        visit(pkg, ())


def test_the_loop_reads_in_one_place():
    """train_one_epoch takes at most 10 parameters and main fits in about two screens (at most 150 lines)."""
    import inspect

    import train
    assert len(inspect.signature(train.train_one_epoch).parameters) <= 10
    src = inspect.getsource(train.main).splitlines()
    assert len(src) <= 150, len(src)
