"""The core is Sans-IO: no event loop, socket, TLS, clock or thread module is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import gaia_gateway.core

CORE = Path(gaia_gateway.core.__file__).resolve().parent
FORBIDDEN = {"asyncio", "uvloop", "socket", "ssl", "time", "selectors", "threading"}
FILES = sorted(CORE.glob("*.py"))


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):  # also catches imports inside functions
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id == "__import__" and node.args
              and isinstance(node.args[0], ast.Constant)) or (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant)):
            found.add(str(node.args[0].value))
    return found


def test_the_core_has_its_six_modules() -> None:
    names = {p.name for p in FILES}
    assert {"_frames.py", "_session.py", "_http.py", "_auth.py", "_limits.py",
            "_actions.py", "__init__.py"} <= names


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_no_io_or_clock_imports(path: Path) -> None:
    bad = {m for m in imported_modules(path) if m.split(".")[0] in FORBIDDEN}
    assert not bad, f"{path.name} imports {sorted(bad)}"


def test_the_checker_sees_every_import_form(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import time\nfrom asyncio import sleep\nimport ssl as s\n"
        "def f():\n    import socket\n    __import__('threading')\n"
        "    importlib.import_module('selectors')\nfrom . import _frames\n"
    )
    assert imported_modules(probe) == {"time", "asyncio", "ssl", "socket", "threading",
                                       "selectors"}
