"""Option parsers shared by the ``lcnn`` command line and the pytest plugin (argparse ``type=``
callables: a bad value is an ``ArgumentTypeError`` whose message says what was expected)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence

from .validate import suggest

__all__ = ["count", "floats", "names", "real"]


def count(minimum: int = 1) -> Callable[[str], int]:
    """An integer ≥ ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def real(minimum: float = 0.0, above: bool = False) -> Callable[[str], float]:
    """A finite number ≥ ``minimum`` (> with ``above``)."""
    rule = f"{'>' if above else '>='} {minimum:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {rule}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (above and value == minimum):
            raise argparse.ArgumentTypeError(f"expected a finite number {rule}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


def floats(text: str) -> list[float]:
    """Comma-separated distinct finite numbers ≥ 0, each a decimal or a fraction (``8/255``)."""
    values = []
    for item in text.split(","):
        try:
            num, _, den = item.partition("/")
            value = float(num) / float(den) if den else float(num)
        except (ValueError, ZeroDivisionError):
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
        if not (math.isfinite(value) and value >= 0):
            raise argparse.ArgumentTypeError(f"expected finite numbers >= 0, got {item!r}")
        if value in values:
            raise argparse.ArgumentTypeError(f"{item} given more than once")
        values.append(value)
    return values


def names(options: Sequence[str], what: str = "") -> Callable[[str], list[str]]:
    """Comma-separated distinct names out of ``options`` (``what``: "attack " in messages)."""

    def parse(text: str) -> list[str]:
        items = text.split(",")
        for name in items:
            if name not in options:
                hint = suggest(name, options)
                choose = ", ".join(options)
                raise argparse.ArgumentTypeError(f"unknown {what}{name!r}{hint}; choose from {choose}")
            if items.count(name) > 1:
                raise argparse.ArgumentTypeError(f"{name} given more than once")
        return items

    parse.__name__ = "list"
    return parse
