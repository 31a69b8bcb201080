"""Test helpers: the package's tiny checkpoints and local swarms of real `potluck` processes, and the CLI."""
from __future__ import annotations

import sys

from potluck.node.local_swarm import LocalSwarm, make_tiny_checkpoint  # noqa: F401  (the tests' launcher)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def potluck_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "potluck", *args]
