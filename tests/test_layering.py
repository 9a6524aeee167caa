"""The package's module layering: the import contracts in pyproject.toml, and no module
using another module's private names (tools/check_private.py).

Both run as subprocesses from the repository's root, so that they check this tree's
``splicepool`` whatever copy of it is installed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# importlinter has no __main__, and `python -m importlinter.cli` exits 0 without checking
# anything: call the function behind the `lint-imports` script instead.
LINT_IMPORTS = "from importlinter.cli import lint_imports_command; lint_imports_command()"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}  # rich: no wrapping, no colour
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=50
    )


def test_import_contracts_are_kept():
    if importlib.util.find_spec("importlinter") is None:
        pytest.skip("pip install import-linter")
    result = run("-c", LINT_IMPORTS, "--no-cache", "--no-logo", str(ROOT / "pyproject.toml"))
    report = result.stdout + result.stderr
    assert result.returncode == 0, f"lint-imports failed:\n{report}"
    assert " 0 broken" in report, f"lint-imports checked no contract:\n{report}"


def test_no_private_names_used_across_modules():
    result = run(str(ROOT / "tools" / "check_private.py"), "splicepool")
    assert result.returncode == 0, (
        "private names used outside the module that defines them "
        f"(mark a deliberate one with '# private-ok: <why>'):\n{result.stdout}{result.stderr}"
    )
