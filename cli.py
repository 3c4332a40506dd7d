"""Command-line plumbing shared by every tool: the default checkpoint, one parser, one convention
for errors and exit codes.

- A usage error (unknown flag, bad value): `prog: error: ...` on one line (no usage block), exit 2.
- Bad input found while running (missing or corrupt file, impossible request): `error: ...` on one
  line, exit 1. Library code raises ValueError / OSError (CheckpointError and QuantizationError are
  ValueErrors) or UserError with a message meant for the user.
- Ctrl-C: `interrupted` on one line, exit 130.
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, NoReturn

DEFAULT_CHECKPOINT = Path("checkpoints/SmolLM2-135M-Instruct")


class UserError(Exception):
    """Bad input noticed after argument parsing; reported as one `error:` line, exit 1."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the module docstring's layout and shows every flag's default."""


class ArgumentParser(argparse.ArgumentParser):
    def __init__(self, description: str | None = None, **kwargs) -> None:
        super().__init__(description=description, formatter_class=HelpFormatter, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


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
