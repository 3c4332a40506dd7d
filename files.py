"""Writing output files so that a failed or interrupted run never leaves a half-written one."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def check_writable(path: str | Path, *inputs: str | Path) -> Path:
    """Fail now, not after minutes of work, if `path` cannot be written or is one of `inputs`.

    Leaves nothing behind: the missing folders of `path` are only made when the file is written.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a directory")
    if any(path.resolve() == Path(p).resolve() for p in inputs):
        raise ValueError(f"cannot write {path}: it would overwrite an input of this run")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"cannot write {path}: {folder} is not a directory")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror} in {folder}") from None
    return path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    The file gets the permissions of any file the user creates (umask applied), not the 0600 of
    mkstemp or of writers that replace the temporary file (safetensors does).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def write_report(out: str | Path, data: Any, lines: list[str]) -> None:
    """A benchmark's results: OUT.json (`data`) and OUT.md (the table `lines`), each written
    atomically, and the table printed."""
    out = Path(out)
    write_json(out.with_suffix(".json"), data)
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
