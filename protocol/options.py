"""Command-line values checked as they are parsed, so a bad one is one line naming its option.

``number(...)`` makes an argparse ``type`` for a finite number within bounds; ``PORT`` is a TCP
port (0: any free one). ``OneLineParser`` reports a bad option in one line instead of argparse's
usage block (20 lines for ``potluck node``), pointing to ``--help``.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def number(kind: type = float, above: float | None = None, at_least: float | None = None,
           at_most: float | None = None) -> Callable[[str], float]:
    """An argparse type: a finite ``kind`` (int or float) above ``above`` / from ``at_least`` to ``at_most``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number: give {_range(kind, above, at_least, at_most)}")
        if (above is not None and value <= above) or (
                at_least is not None and value < at_least) or (at_most is not None and value > at_most):
            raise argparse.ArgumentTypeError(f"{text} is out of range: give {_range(kind, above, at_least, at_most)}")
        return value

    return parse


def _range(kind: type, above: float | None, at_least: float | None, at_most: float | None) -> str:
    words = ["a whole number" if kind is int else "a number"]
    if above is not None:
        words.append(f"above {above:g}")
    elif at_least is not None:
        words.append(f"from {at_least:g}" if at_most is not None else f"of at least {at_least:g}")
    if at_most is not None:
        words.append(f"to {at_most:g}" if above is None and at_least is not None else f"and at most {at_most:g}")
    return " ".join(words)


POSITIVE = number(above=0)  # seconds, GiB, rates
COUNT = number(int, at_least=1)
PORT = number(int, at_least=0, at_most=65535)
FRACTION = number(at_least=0, at_most=1)
