"""Size limits that keep each part of the package readable in one sitting (issue 25).

* every module of the package at or under 500 lines;
* every function at or under 60 lines (``def`` to its last line);
* an import inside a function only for an optional dependency or a measured start-up cost, said in a
  ``# deferred: <reason>`` comment on the import's line.
"""

import ast
import io
import tokenize
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cctuning"
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60
REASON = "# deferred:"


def package_files() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if "resources" not in p.parts]


def long_files(files, root: Path = PACKAGE.parent) -> list[str]:
    found = []
    for path in files:
        lines = path.read_text(encoding="utf-8").count("\n")
        if lines > MAX_FILE_LINES:
            found.append(f"{path.relative_to(root)}: {lines} lines")
    return found


def long_functions(source: str, name: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    return found


def _comments(source: str) -> dict[int, str]:
    return {
        tok.start[0]: tok.string
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }


def unexplained_deferred_imports(source: str, name: str) -> list[str]:
    """Imports inside a function without a ``# deferred: reason`` comment on their first or last line."""
    comments = _comments(source)
    found = []
    for node in ast.walk(ast.parse(source, name)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, (ast.Import, ast.ImportFrom)):
                said = [comments.get(line, "") for line in {inner.lineno, inner.end_lineno}]
                if not any(c.startswith(REASON) and c[len(REASON) :].strip() for c in said):
                    found.append(f"{name}:{inner.lineno} {ast.unparse(inner)}")
    return sorted(set(found))


def test_no_package_file_is_over_the_limit():
    assert long_files(package_files()) == []


@pytest.mark.parametrize("path", package_files(), ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_functions_are_short_and_deferred_imports_say_why(path):
    source = path.read_text(encoding="utf-8")
    name = str(path.relative_to(PACKAGE.parent))
    assert long_functions(source, name) == []
    assert unexplained_deferred_imports(source, name) == []


def test_the_checks_find_what_they_look_for(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    source = (
        f"def long():\n{body}\n\n"
        "def short():\n"
        "    import json\n"
        "    import os  # deferred: a reason\n"
        "    import sys  # deferred:\n"
        "    from math import (  # deferred: start-up cost\n"
        "        pi,\n"
        "    )\n"
        "    return json, os, sys, pi\n"
    )
    assert long_functions(source, "m.py") == [f"m.py:1 long: {MAX_FUNCTION_LINES + 1} lines"]
    assert unexplained_deferred_imports(source, "m.py") == ["m.py:64 import json", "m.py:66 import sys"]
    big = tmp_path / "big.py"
    big.write_text("x = 1\n" * (MAX_FILE_LINES + 1))
    small = tmp_path / "small.py"
    small.write_text("x = 1\n" * MAX_FILE_LINES)
    assert long_files([big, small], root=tmp_path) == [f"big.py: {MAX_FILE_LINES + 1} lines"]
