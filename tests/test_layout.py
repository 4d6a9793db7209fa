"""The package's layout, read from its source (ast, nothing imported): the floors of DESIGN.md,
imports only pointing down them, no import circle, no private name or private module reached from
outside, and no module past about 500 lines."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rlhf_jax"
MAX_LINES = 500

# Each top-level part of the package (a subpackage or a module) on its floor; imports point to the
# same floor or one below.
FLOORS = {
    "experiments": ("stages", "frontier", "planner", "sweeps", "pairs"),
    "driver library": ("run",),
    "training": ("train", "eval", "lora"),
    "models and data": ("models", "sampling", "data", "bandit"),
    "base": (
        "losses",
        "sharding",
        "distributed",
        "checkpoint",
        "paths",
        "errors",
        "chunking",
        "plugins",
    ),
}
LEVEL = {part: -i for i, parts in enumerate(FLOORS.values()) for part in parts}
# What a part may import besides its own floor and the floors below, and what it must never.
ONLY = {
    "models": {"models", "sharding", "paths", "errors"},  # the base modules, nothing else
    "losses": {"losses", "errors"},
    "data": {"data", "paths", "errors", "chunking", "sharding"},
}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _owner(name: str) -> str:
    """The module that defines dotted `name` (a module, or a name inside one)."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def _imports(module: str) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) of every rlhf_jax import of `module`,
    function-level imports included."""
    tree = ast.parse(MODULES[module].read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "rlhf_jax":
                continue
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in MODULES:  # a submodule
                    out.append((full, "", node.lineno))
                else:
                    out.append((_owner(node.module), alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "rlhf_jax":
                    out.append((_owner(alias.name), "", node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in _imports(m) if t != m} for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_part_is_on_a_floor():
    parts = {_part(m) for m in MODULES if m != "rlhf_jax"}
    assert parts <= set(LEVEL), f"parts on no floor of DESIGN.md: {sorted(parts - set(LEVEL))}"


def test_no_import_circle_between_modules_or_parts():
    graph = _graph()
    assert _cycles(graph) == []
    parts = {}
    for m, targets in graph.items():
        parts.setdefault(_part(m), set()).update(_part(t) for t in targets if t != "rlhf_jax")
    parts = {p: ts - {p} for p, ts in parts.items()}
    assert _cycles(parts) == []


def test_imports_point_down_the_floors():
    wrong = []
    for m in MODULES:
        for target, _, line in _imports(m):
            src, dst = _part(m), _part(target)
            if target == "rlhf_jax" or src == dst:
                continue
            if LEVEL.get(dst, 0) > LEVEL.get(src, 0):
                wrong.append(f"{m}:{line} imports {target} (a floor above)")
            if src in ONLY and dst not in ONLY[src]:
                wrong.append(f"{m}:{line} imports {target} ({src}/ imports only {ONLY[src]})")
    assert wrong == []


def test_only_the_drivers_import_the_command_line():
    wrong = [
        f"{m}:{line}"
        for m in MODULES
        for target, _, line in _imports(m)
        if target == "rlhf_jax.run.cli" and m != "rlhf_jax.run.cli"
    ]
    assert wrong == [], "library modules importing rlhf_jax.run.cli"
    assert "rlhf_jax.run.cli" not in _graph()["rlhf_jax.run.handover"]


def test_no_private_name_or_private_module_is_reached_from_outside():
    """No `from x import _name` across modules; a private module (`losses/_common.py`) only from
    its own package; no `module._name` on an imported module of the package."""
    wrong = []
    for m, path in MODULES.items():
        aliases = {}
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    if full in MODULES:
                        aliases[alias.asname or alias.name] = full
        for target, name, line in _imports(m):
            if name.startswith("_") and target != m:
                wrong.append(f"{m}:{line} imports {target}.{name}")
            private = [p for p in target.split(".") if p.startswith("_")]
            if private and not m.startswith(target.rpartition(".")[0] + "."):
                wrong.append(f"{m}:{line} imports the private module {target}")
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                wrong.append(f"{m}:{node.lineno} reads {aliases[node.value.id]}.{node.attr}")
    assert wrong == []


def test_modules_hold_at_most_about_500_lines():
    sizes = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    assert {m: n for m, n in sizes.items() if n > MAX_LINES} == {}


def test_the_checks_see_what_they_check():
    """The checks above can fail: a circle, an upward import and a private name are found."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert ("rlhf_jax.losses._common", "", 0) not in _imports("rlhf_jax.losses.dpo")
    assert any(t == "rlhf_jax.losses._common" for t, _, _ in _imports("rlhf_jax.losses.dpo"))
    assert LEVEL["run"] > LEVEL["train"] > LEVEL["models"] > LEVEL["losses"]


def test_every_driver_ends_with_its_main_guard():
    """A script's `if __name__ == "__main__":` block is its last statement: a function defined
    after it does not exist yet when the command runs (in-process tests would not notice)."""
    late = []
    for path in sorted((ROOT / "experiments").glob("*.py")):
        body = ast.parse(path.read_text()).body
        guards = [
            i for i, node in enumerate(body)
            if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
        ]  # fmt: skip
        if guards and guards[-1] != len(body) - 1:
            late.append(f"{path.name}: {ast.unparse(body[guards[-1] + 1])[:60]}")
    assert not late, late
