"""Atomic output folders: write everything into a temporary sibling, rename into place at the end.

A crash, Ctrl-C or full disk while writing leaves the previous folder (or nothing) at the destination,
never a half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from upcycle.config import ConfigError


def check_output_dir(out: str | os.PathLike, overwrite: bool, flag: str = "out") -> Path:
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(flag, str(out), "already exists; pass --overwrite to replace it")
    return out


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False, flag: str = "out") -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``out``, on any error it is removed."""
    out = check_output_dir(out, overwrite, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _fsync_dir(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(path: Path) -> None:
    """Flush the folder's files and entry to disk so a power loss cannot leave a renamed-but-empty folder."""
    with contextlib.suppress(OSError):
        for f in path.iterdir() if path.is_dir() else ():
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
