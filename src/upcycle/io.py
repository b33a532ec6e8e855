"""Paths and output folders: the package's one "is this a path?" helper, ``~`` expansion, and atomic
output folders (write everything into a temporary sibling, rename into place at the end).

A crash, Ctrl-C or full disk while writing leaves the previous folder (or nothing) at the destination,
never a half-written checkpoint. What lands there has the permissions the user's umask gives, like any
file they create (``tempfile.mkdtemp`` makes 0700 folders and safetensors 0600 files, which colleagues on
a shared cluster could not read: issue 11).

Imported while the command line parses its flags, so it imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from upcycle.config import ConfigError


def expand_path(path: str | os.PathLike) -> Path:
    """``path`` with ``~`` and ``~user`` expanded (the shell does not expand them in ``--out=~/x``, YAML
    files never do)."""
    return Path(os.path.expanduser(os.fspath(path)))


def absolute_path(path: str | os.PathLike) -> str:
    """The expanded, absolute form of ``path`` (what a record stores so it can be used from any folder)."""
    return os.path.abspath(expand_path(path))


def looks_like_path(name: str) -> bool:
    """True for a name that can only be a path: it exists, or it starts with '.', '/' or '~', or it has
    more than one '/' (hub ids are 'name' or 'owner/name'), or an OS separator other than '/'."""
    if not isinstance(name, str) or not name:
        return False
    if expand_path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return True
    return os.sep != "/" and os.sep in name


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Give ``root`` and everything below it the modes a plain ``mkdir``/``open`` would have given."""
    mask = current_umask()
    dir_mode, file_mode = 0o777 & ~mask, 0o666 & ~mask
    with contextlib.suppress(OSError):
        os.chmod(root, dir_mode)
        for folder, dirs, files in os.walk(root):
            for d in dirs:
                os.chmod(os.path.join(folder, d), dir_mode)
            for f in files:
                path = os.path.join(folder, f)
                if not os.path.islink(path):
                    os.chmod(path, file_mode)


def check_output_dir(out: str | os.PathLike, overwrite: bool, flag: str = "out") -> Path:
    """The expanded output folder, refused when it exists (without ``overwrite``) or cannot be a folder."""
    shown = os.fspath(out)
    out = expand_path(out)
    if out.exists() and not overwrite:
        raise ConfigError(flag, shown, "already exists; pass --overwrite to replace it")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(flag, shown, f"'{parent}' is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(flag, shown, f"cannot write in '{parent}' (permission denied)")
            break
    return out


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False, flag: str = "out") -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``out``, on any error it is removed."""
    out = check_output_dir(out, overwrite, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        apply_umask(tmp)
        _fsync_dir(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
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
