"""The module map's rules, checked on the source: leaves stay leaves; the core asks transports through the contract."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "hedwig_tasks"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_message_is_a_leaf() -> None:
    assert {name for name in _imports(PACKAGE / "message.py") if name.startswith("hedwig_tasks")} == set()


def test_instrumentation_does_not_import_the_package_root() -> None:
    assert "hedwig_tasks" not in _imports(PACKAGE / "instrumentation.py")


def test_the_core_asks_a_transport_only_through_the_contract() -> None:
    core = [p for p in PACKAGE.rglob("*.py") if "transports" not in p.parts and "testing" not in p.parts]
    duck = re.compile(r"getattr\(\s*[\w.]*transport\b|\bscheme\b[^\n]*(==|!=|\bin\b)\s*[(\[{\"']")
    offenders = [
        f"{p.name}:{n}" for p in core for n, line in enumerate(p.read_text().splitlines(), 1) if duck.search(line)
    ]
    assert offenders == []
