"""Command-line plumbing shared by every tool: the default checkpoint, one parser, one convention
for errors and exit codes.

- A usage error (unknown flag, bad value): `prog: error: ...` on one line (no usage block), exit 2.
- Bad input found while running (missing or corrupt file, impossible request): `error: ...` on one
  line, exit 1. Library code raises ValueError / OSError (CheckpointError and QuantizationError are
  ValueErrors) or UserError with a message meant for the user.
- Ctrl-C: `interrupted` on one line, exit 130. Tools import this module before torch, so that a
  Ctrl-C during those seconds of imports is mostly reported the same way (see `_excepthook`; one
  landing inside torch's C++ initialisation can still abort there).
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from types import TracebackType
from typing import Callable, NoReturn

DEFAULT_CHECKPOINT = Path("checkpoints/SmolLM2-135M-Instruct")


class UserError(Exception):
    """Bad input noticed after argument parsing; reported as one `error:` line, exit 1."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and shows every flag's default, unless it is None or
    False (nothing to show) or the help text already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if (not action.option_strings or default in (None, False, argparse.SUPPRESS)
                or "default" in text):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list) else "%(default)s"
        return f"{text} (default: {shown})"


class ArgumentParser(argparse.ArgumentParser):
    def __init__(self, description: str | None = None, **kwargs) -> None:
        super().__init__(description=description, formatter_class=HelpFormatter, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def int_at_least(low: int) -> Callable[[str], int]:
    """argparse type: an integer >= low, so that a bad value is a usage error before any work."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = "int"  # argparse's "invalid int value: 'x'"
    return parse


def float_in(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """argparse type: a float in the interval [low, high], each end open if asked (NaN never is)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        value = float(text)
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below):
            raise argparse.ArgumentTypeError(f"{text} is outside {interval}")
        return value
    parse.__name__ = "float"
    return parse


FRACTION = float_in(0.0, 1.0, high_open=True)  # a sparsity level
NON_NEGATIVE = float_in(0.0, math.inf, high_open=True)


def run_main(main: Callable[[], object]) -> NoReturn:
    """Call main() and exit with the convention above."""
    try:
        main()
    except (UserError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(0)


def _excepthook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    """A Ctrl-C outside run_main (while a tool imports torch): one line, no traceback. Python then
    exits through SIGINT itself, which shells report as 130."""
    if issubclass(kind, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
    else:
        _previous_excepthook(kind, value, tb)


_previous_excepthook = sys.excepthook
sys.excepthook = _excepthook
