"""Shared command-line plumbing for the scripts: run a main, turn expected errors into one line."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

# Scripts live one folder below the project's modules.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run_cli(main: Callable[[], None]) -> None:
    """Call main(); print expected failures as `error: ...` and exit 1 instead of a traceback."""
    from checkpoint import CheckpointError
    try:
        main()
    except (CheckpointError, FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
