"""The package's floors (docs/architecture.md): every import of vlaa_jax/ and data_pipeline/ (module-level or
inside a function) goes to the same floor or a lower one, there are no import circles, the package never
imports configs/ and configs/ never import the package."""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Module prefix -> floor, most specific prefix first (the table of docs/architecture.md).
FLOORS = (
    ("vlaa_jax.sharding", 1), ("vlaa_jax.distributed", 1),
    ("vlaa_jax.nn", 2), ("vlaa_jax.kernels", 2),
    ("vlaa_jax.models", 3), ("vlaa_jax.convert", 3),
    ("data_pipeline.construct.__main__", 6),  # an entry point, as vlaa_jax.main
    ("data_pipeline", 4), ("vlaa_jax.rollout", 4), ("vlaa_jax.rl", 4), ("vlaa_jax.rewards", 4),
    ("vlaa_jax.eval.behaviour", 4), ("vlaa_jax.eval.plots", 4), ("vlaa_jax.eval.benchmarks", 4), ("vlaa_jax.eval.scoring", 4),
    ("vlaa_jax.train", 5),
    ("vlaa_jax.eval", 6), ("vlaa_jax.main", 6), ("vlaa_jax.command_line", 6), ("vlaa_jax", 0),
)


def floor(module: str) -> int:
    for prefix, f in FLOORS:
        if module == prefix or module.startswith(prefix + "."):
            return f
    raise AssertionError(f"{module} has no floor in FLOORS (add it here and to docs/architecture.md)")


def modules(top: str) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(os.path.join(REPO, top)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                mod = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                out[mod[:-len(".__init__")] if mod.endswith(".__init__") else mod] = path
    return out


def imports(path: str, module: str) -> set[str]:
    """Every module `path` imports (absolute names; `from a import b` counts a.b when that is a module)."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


PACKAGE = {**modules("vlaa_jax"), **modules("data_pipeline")}


def _internal(name: str) -> str | None:
    """The package module `name` refers to (its longest known prefix), or None if it is outside."""
    while name and name not in PACKAGE:
        name = name.rpartition(".")[0]
    return name or None


GRAPH = {m: {t for t in map(_internal, imports(p, m)) if t and t != m} for m, p in PACKAGE.items()}


@pytest.mark.parametrize("module", sorted(PACKAGE))
def test_imports_go_down(module):
    up = sorted(t for t in GRAPH[module] if floor(t) > floor(module)
                and not module.startswith(t + "."))  # a module may import its own package's __init__
    assert not up, f"{module} (floor {floor(module)}) imports higher floors: {[(t, floor(t)) for t in up]}"
    configs = [n for n in imports(PACKAGE[module], module) if n == "configs" or n.startswith("configs.")]
    assert not configs, f"{module} imports {configs}: the package never imports configs/"


def test_no_import_circles():
    """Between modules (a package's __init__ re-exporting its own modules is not a circle)."""
    def edges(m):
        return {t for t in GRAPH[m] if not m.startswith(t + ".") and not t.startswith(m + ".")}

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(edges(m)):
            if state.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(PACKAGE):
        if m not in state:
            visit(m)


def test_configs_never_import_the_package():
    for name in sorted(os.listdir(os.path.join(REPO, "configs"))):
        if name.endswith(".py"):
            path = os.path.join(REPO, "configs", name)
            bad = [n for n in imports(path, f"configs.{name[:-3]}") if n.split(".")[0] in ("vlaa_jax", "data_pipeline")]
            assert not bad, f"configs/{name} imports {bad}"
