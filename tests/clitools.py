"""Running the real command line in tests: exit status, stdout, stderr, and the files it left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from upcycle.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in Path(root).rglob("*")}


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    """``upcycle ARGV`` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *needles: str) -> str:
    """stderr is exactly one line, an ``error:`` that contains every needle (the flag, file or value)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith("error: ") and "Traceback" not in err, line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def refused(capsys, root: Path, argv: list[str], *needles: str) -> str:
    """Run ARGV in ``root`` (the working folder); it must exit with 2 and one error line naming the
    needles, and leave no new file or folder under ``root``."""
    before = files_under(root)
    code, _, err = run_cli(capsys, argv)
    line = assert_one_line_error(err, *needles)
    assert code == 2, f"exit status {code}: {line}"
    assert files_under(root) == before, f"new files: {sorted(files_under(root) - before)}"
    return line


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def upcycle_subprocess(
    args: list[str], cwd: Path, timeout: float = 120, **env
) -> subprocess.CompletedProcess:
    """``python -m upcycle ARGS`` as a user runs it (the package's start-up path, not this process's)."""
    return subprocess.run(
        [sys.executable, "-m", "upcycle", *map(str, args)],
        cwd=cwd,
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def enter_workdir(tmp_path: Path, monkeypatch) -> Path:
    """Work in ``tmp_path`` with the Hub offline (it is unreachable here; this makes it immediate)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path
