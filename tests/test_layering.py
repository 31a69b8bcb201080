"""protocol imports neither node nor client; node and client never import each other."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"protocol": {"node", "client"}, "node": {"client"}, "client": {"node"}}


def imported_packages(path: Path) -> set[str]:
    found = set()
    for item in ast.walk(ast.parse(path.read_text())):
        if isinstance(item, ast.ImportFrom) and item.module:
            names = [item.module] if item.level == 0 else ([f"potluck.{item.module}"] if item.level == 2 else [])
        elif isinstance(item, ast.Import):
            names = [alias.name for alias in item.names]
        else:
            continue
        found.update(n.split(".")[1] for n in names if n.startswith("potluck.") and n.count(".") >= 1)
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_only_look_down(package):
    for path in (ROOT / package).rglob("*.py"):
        bad = imported_packages(path) & FORBIDDEN[package]
        assert not bad, f"{path.relative_to(ROOT)} imports potluck.{bad.pop()}"
