"""Size limits that keep the code reviewable (issue #13): no library module over 450 lines, and no
function of the training loop's package over 90 lines. Split by area, never by line count alone."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "shardtune"
MAX_MODULE_LINES = 450
MAX_TRAIN_FUNCTION_LINES = 90


def long_modules(root: Path, limit: int) -> list[str]:
    """'path: n lines' for each module under ``root`` over ``limit``, paths from root's parent."""
    found = []
    for path in sorted(root.rglob("*.py")):
        lines = len(path.read_text().splitlines())
        if lines > limit:
            found.append(f"{path.relative_to(root.parent)}: {lines} lines")
    return found


def long_functions(root: Path, limit: int, top: Path) -> list[str]:
    """'path:function: n lines' for each function under ``root`` over ``limit``, paths from ``top``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append(f"{path.relative_to(top)}:{node.name}: {length} lines")
    return found


def test_no_module_over_the_limit():
    offenders = long_modules(PACKAGE, MAX_MODULE_LINES)
    assert not offenders, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(offenders)


def test_no_train_function_over_the_limit():
    offenders = long_functions(PACKAGE / "train", MAX_TRAIN_FUNCTION_LINES, PACKAGE.parent)
    assert not offenders, f"functions in shardtune/train/ over {MAX_TRAIN_FUNCTION_LINES} lines:\n" + \
        "\n".join(offenders)


def test_the_checkers_see_what_is_too_long(tmp_path):
    # The guards themselves: a file one line over and a function one line over must register.
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "big.py").write_text("x = 0\n" * 451)
    body = "".join("    y = 0\n" for _ in range(90))
    (pkg / "long.py").write_text(f"def f():\n{body}\n\nasync def g():\n    pass\n")
    assert long_modules(pkg, MAX_MODULE_LINES) == ["pkg/big.py: 451 lines"]
    assert long_functions(pkg, MAX_TRAIN_FUNCTION_LINES, tmp_path) == ["pkg/long.py:f: 91 lines"]
