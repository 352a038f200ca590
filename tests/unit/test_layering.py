"""The package's imports run one way: each module imports only from its own layer or below, and no
two modules import each other, directly or around a circle (function-local imports included: a
circle hidden inside a function is still a circle).

The layers, bottom to top (docs/architecture.md draws them):

  L0  config/, errors, faults, integrity, run_dirs
  L1  distributed/{environment, process_group, collectives, watchdog, ...}, optim, data/tokenizer
  L2  data/, distributed/strategies/, checkpoint/, models/, tasks, preference
  L3  eval/, train/
  L4  commands/, launch/, sweep, plan, cli, __main__
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "shardtune"

# Most specific prefix first; a module's layer is the first prefix it starts with.
LAYERS: list[tuple[str, int]] = [
    ("shardtune.config", 0), ("shardtune.errors", 0), ("shardtune.faults", 0),
    ("shardtune.integrity", 0), ("shardtune.run_dirs", 0),
    ("shardtune.distributed.strategies", 2), ("shardtune.distributed", 1),
    ("shardtune.optim", 1), ("shardtune.data.tokenizer", 1),
    ("shardtune.data", 2), ("shardtune.checkpoint", 2), ("shardtune.models", 2), ("shardtune.tasks", 2),
    ("shardtune.preference", 2),
    ("shardtune.eval", 3), ("shardtune.train", 3),
    ("shardtune.commands", 4), ("shardtune.launch", 4), ("shardtune.sweep", 4), ("shardtune.plan", 4),
    ("shardtune.cli", 4), ("shardtune.__main__", 4),
]


def layer_of(module: str) -> int:
    if module == "shardtune":
        return 0
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to the docstring)")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported shardtune module, line) for every import in the file, local ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.startswith("shardtune")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("shardtune"):
            for alias in node.names:
                # ``from shardtune import faults`` imports the module shardtune.faults.
                sub = f"{node.module}.{alias.name}"
                found.append((sub if sub in known else node.module, node.lineno))
    return found


def import_graph() -> dict[str, list[tuple[str, int]]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(files)) for name, path in files.items()}


def test_every_import_runs_down_the_layers():
    upward = [
        f"{source} (L{layer_of(source)}) line {line} imports {target} (L{layer_of(target)})"
        for source, edges in import_graph().items()
        for target, line in edges
        if layer_of(target) > layer_of(source)
    ]
    assert not upward, "imports that run up the layering:\n" + "\n".join(upward)


def test_nothing_below_train_imports_train():
    below = ("shardtune.data", "shardtune.distributed", "shardtune.checkpoint", "shardtune.eval",
             "shardtune.launch", "shardtune.models")
    offenders = [f"{source} imports {target}" for source, edges in import_graph().items()
                 if source.startswith(below) for target, _ in edges if target.startswith("shardtune.train")]
    assert not offenders, offenders


def test_no_import_circles():
    graph = {src: sorted({t for t, _ in edges if t != src and t != "shardtune"})
             for src, edges in import_graph().items()}
    circles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_checker_sees_an_upward_import(tmp_path):
    # The guard itself: a lower module importing the loop must register as upward.
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from shardtune.train.loop import train\n")
    [(target, line)] = imports_of(probe, {"shardtune.train.loop"})
    assert (target, line) == ("shardtune.train.loop", 2)
    assert layer_of(target) > layer_of("shardtune.data.prepare")
