"""Output folders (issue 11): the permissions the user's umask gives, and the one path helper."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from upcycle.config import ConfigError
from upcycle.io import absolute_path, atomic_output_dir, check_output_dir, expand_path, looks_like_path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_outputs_get_the_modes_of_the_users_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_output_dir(tmp_path / "out") as tmp:
            assert _mode(tmp) == 0o700  # mkdtemp's private folder while writing...
            weights = tmp / "model.safetensors"
            fd = os.open(
                weights, os.O_WRONLY | os.O_CREAT, 0o600
            )  # ...and a private file, as safetensors writes
            os.close(fd)
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "sub" / "state.json").write_text("{}")
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert _mode(out) == 0o777 & ~umask and _mode(out / "sub") == 0o777 & ~umask
    assert _mode(out / "model.safetensors") == 0o666 & ~umask
    assert _mode(out / "sub" / "state.json") == 0o666 & ~umask


def test_home_is_expanded_everywhere(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert expand_path("~/x") == tmp_path / "x"
    assert absolute_path("~/x") == str(tmp_path / "x")
    with atomic_output_dir("~/made") as tmp:
        (tmp / "f").write_text("1")
    assert (tmp_path / "made" / "f").is_file() and not Path("~").exists()
    with pytest.raises(ConfigError, match="already exists"):
        check_output_dir("~/made", overwrite=False)


def test_an_output_under_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "file" / "out", overwrite=False)


@pytest.mark.parametrize(
    "name,is_path",
    [("gpt2", False), ("openai-community/gpt2", False), ("./gpt2", True), ("/abs", True), ("~/m", True),
     ("a/b/c", True), ("", False)],
)  # fmt: skip
def test_looks_like_path(name, is_path):
    assert looks_like_path(name) is is_path
