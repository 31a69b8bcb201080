"""protocol imports neither node nor client; node and client never import each other.

Imports are read with the ast and resolved as Python resolves them (relative levels against the
file's own package, ``from potluck import node`` naming a subpackage), and the resolver is itself
tested on the forms that an earlier, simpler check let through.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("protocol", "node", "client")
FORBIDDEN = {"protocol": {"node", "client"}, "node": {"client"}, "client": {"node"}}


def package_of(path: Path) -> list[str]:
    """['potluck', 'client', 'health'] for client/health/crawler.py (the repo root is ``potluck``)."""
    parts = ["potluck", *path.relative_to(ROOT).parts]
    return parts[:-1]


def imported_modules(source: str, package: list[str]) -> set[str]:
    """Every module an import statement may load, dotted and absolute."""
    found = set()
    for item in ast.walk(ast.parse(source)):
        if isinstance(item, ast.Import):
            found.update(alias.name for alias in item.names)
        elif isinstance(item, ast.ImportFrom):
            if item.level:
                base = package[:len(package) - item.level + 1] if item.level <= len(package) else []
                module = ".".join(base + ([item.module] if item.module else []))
            else:
                module = item.module
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in item.names)  # names may be submodules
    return found


def layers_used(modules: set[str]) -> set[str]:
    return {m.split(".")[1] for m in modules if m.startswith("potluck.") and m.split(".")[1] in LAYERS}


@pytest.mark.parametrize("source, package, layer", [
    ("from ...node.server import Node", ["potluck", "client", "health"], "node"),
    ("from potluck import node", ["potluck", "client"], "node"),
    ("from .. import node", ["potluck", "client"], "node"),
    ("from ..transport import SwarmConnection", ["potluck", "client", "health"], "client"),
    ("import potluck.client.model as m", ["potluck", "node"], "client"),
    ("from potluck.protocol.errors import BadRequest", ["potluck", "client"], "protocol"),
])
def test_the_resolver_sees_every_form(source, package, layer):
    assert layer in layers_used(imported_modules(source, package))


def test_a_sibling_module_is_not_a_layer():
    assert layers_used(imported_modules("from .transport import x", ["potluck", "client"])) == {"client"}
    assert layers_used(imported_modules("from . import hardware", ["potluck", "node"])) == {"node"}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_only_look_down(package):
    for path in (ROOT / package).rglob("*.py"):
        bad = layers_used(imported_modules(path.read_text(), package_of(path))) & FORBIDDEN[package]
        assert not bad, f"{path.relative_to(ROOT)} imports potluck.{bad.pop()}"
