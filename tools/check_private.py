"""Report private names used across module boundaries.

    python tools/check_private.py splicepool [more paths...]

A module may touch ``X._name`` only when ``_name`` is its own: a class attribute,
a ``__slots__`` entry, a ``self._name = ...`` assignment, a def, or a module-level
name of that same module. Accesses through ``self`` and ``cls`` are always fine,
and so are dunder names. ``from .mod import _name`` (a private name of another
module of the package) is reported too; importing a private *module*
(``from . import _native``) is not.

A line may opt out with a trailing ``# private-ok: <why>`` comment.
Prints ``path:line: X._name (defined elsewhere)`` per finding; exits 1 if any, else 0.
Standard library only.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

OPT_OUT = re.compile(r"#\s*private-ok:\s*\S")
SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def scope_names(body: list[ast.stmt]) -> set[str]:
    """Names assigned directly in a module or class body (not inside nested defs)."""
    names, stack = set(), list(body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        if not isinstance(node, SCOPES):
            stack.extend(ast.iter_child_nodes(node))
    return names


def slot_names(cls: ast.ClassDef) -> set[str]:
    names = set()
    for stmt in cls.body:
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and stmt.value is not None:
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            if any(isinstance(t, ast.Name) and t.id == "__slots__" for t in targets):
                for node in ast.walk(stmt.value):
                    if isinstance(node, ast.Constant) and isinstance(node.value, str):
                        names.add(node.value)
    return names


def defined_names(tree: ast.Module) -> set[str]:
    """Every name this module defines, in any of the ways listed in the docstring."""
    names = scope_names(tree.body)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= scope_names(node.body) | slot_names(node)
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("self", "cls")
        ):
            names.add(node.attr)
    return names


def is_own_package(node: ast.ImportFrom, package: str) -> bool:
    return node.level > 0 or (node.module or "").split(".")[0] == package


def check_file(path: Path, root: Path) -> list[str]:
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    tree = ast.parse(source, filename=str(path))
    own = defined_names(tree)
    findings: set[tuple[int, str]] = set()

    def report(lineno: int, what: str) -> None:
        if not OPT_OUT.search(lines[lineno - 1]):
            findings.add((lineno, what))

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            if node.attr not in own:
                report(node.lineno, f"{ast.unparse(node.value)}.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and is_own_package(node, root.name):
            # `from . import _native` names a private module, not a private name: fine.
            base = path.parents[node.level - 1] if node.level else root.parent
            target = base.joinpath(*node.module.split(".")) if node.module else base
            for alias in node.names:
                if is_private(alias.name) and not (
                    (target / f"{alias.name}.py").exists() or (target / alias.name).is_dir()
                ):
                    module = "." * node.level + (node.module or "")
                    report(node.lineno, f"from {module} import {alias.name}")
    return [f"{path}:{line}: {what} (defined elsewhere)" for line, what in sorted(findings)]


def python_files(target: Path) -> list[Path]:
    if target.is_file():
        return [target]
    return sorted(p for p in target.rglob("*.py") if "__pycache__" not in p.parts)


def main(argv: list[str]) -> int:
    if not argv or any(arg.startswith("-") for arg in argv):
        print("usage: python tools/check_private.py PACKAGE_DIR [PATH...]", file=sys.stderr)
        return 2
    findings = []
    for arg in argv:
        target = Path(arg)
        root = target if target.is_dir() else target.parent
        for path in python_files(target):
            findings += check_file(path, root)
    for finding in findings:
        print(finding)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
