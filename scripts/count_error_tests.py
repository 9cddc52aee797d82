"""Count the bad-input cases the Python tests check a named error for (the figure RELIABILITY asks).

    python scripts/count_error_tests.py [tests]

A case is a ``pytest.raises(...)`` in a test function that checks the message (``match=``, or an
``as`` name whose ``.value`` the test reads), or a check of the CLI's ``error: ...`` line, counted
once per parametrize case of the test (lists written in the decorator or as a module-level name).
``pytest.raises(pytest.fail.Exception)`` and the like are not bad input and are left out. Prints
the total, the number of sites, and the count per file.
"""

from __future__ import annotations

import ast
import collections
import sys
from pathlib import Path


def _module_lists(tree: ast.Module) -> dict[str, int]:
    sizes = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = node.value
            if isinstance(value, (ast.List, ast.Tuple)):
                sizes[node.targets[0].id] = len(value.elts)
            elif isinstance(value, ast.Dict):
                sizes[node.targets[0].id] = len(value.keys)
    return sizes


def _cases(fn: ast.FunctionDef, lists: dict[str, int]) -> int:
    n = 1
    for deco in fn.decorator_list:
        if not (isinstance(deco, ast.Call) and getattr(deco.func, "attr", "") == "parametrize" and len(deco.args) > 1):
            continue
        values = deco.args[1]
        if isinstance(values, ast.Call) and getattr(values.func, "id", "") in ("sorted", "list") and values.args:
            values = values.args[0]
        if isinstance(values, (ast.List, ast.Tuple)):
            n *= len(values.elts)
        elif isinstance(values, ast.Name) and values.id in lists:
            n *= lists[values.id]
    return n


def _checks(fn: ast.FunctionDef) -> int:
    source = ast.unparse(fn)
    found = 0
    for node in ast.walk(fn):
        if not (isinstance(node, ast.withitem) and isinstance(node.context_expr, ast.Call)):
            continue
        call = node.context_expr
        if getattr(call.func, "attr", "") != "raises" or (
            call.args and ast.unparse(call.args[0]).startswith("pytest.")
        ):
            continue
        checked = any(kw.arg == "match" for kw in call.keywords)
        if not checked and node.optional_vars is not None:
            checked = f"{ast.unparse(node.optional_vars)}.value" in source
        found += checked
    return found + source.count("'error: ") + source.count('"error: ')


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "tests")
    per_file: collections.Counter[str] = collections.Counter()
    sites = 0
    for path in sorted(root.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        lists = _module_lists(tree)
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef) and fn.name.startswith("test"):
                k = _checks(fn)
                sites += k
                per_file[path.name] += k * _cases(fn, lists)
    print(f"{sum(per_file.values())} named-error cases ({sites} sites) in {len(+per_file)} test files")
    for name, n in per_file.most_common():
        if n:
            print(f"  {n:4d}  {name}")


if __name__ == "__main__":
    main()
