"""Fuzzing every command in ``upcycle.cli.COMMANDS`` (issue 11): random flag values and random YAML
documents never end in a traceback; a refusal is exit status 2 and one ``error:`` line.

The table is read at test time, so commands added later are fuzzed too. Their flags come from their own
parsers (option names, choices, switches); values are drawn from text a user could type (no NUL bytes or
lone surrogates: a shell cannot pass them). Runs never get to real work: ``--out`` (where a command has
it) is an existing *file*, the Hub is offline, and no drawn name is a model or data set.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from upcycle.cli import COMMANDS, command_parser, main

TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
TRICKY = st.sampled_from(
    ["", " ", "-1", "0", "1", "2.5", "1e309", "nan", "inf", "-inf", "1_000", "0x10", "~", "/", ".", "..",
     "a/b/c", "none", "None", "null", "true", "all", "every_other", "0,1", "0,0", "normal:0.02", "zeros",
     "uniform:-1", "./missing", "owner/name", "x.jsonl", "é"]
)  # fmt: skip
VALUE = st.one_of(TRICKY, TEXT, st.integers(-(10**12), 10**12).map(str), st.floats().map(repr))

YAML_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-(10**12), 10**12), st.floats(), TEXT, TRICKY)
YAML_VALUE = st.recursive(
    YAML_SCALAR,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
    max_leaves=6,
)


def _kind(action) -> str:
    """'bool', 'int', 'float', 'choice' or 'text': what a valid value of the option looks like."""
    if action.nargs == 0:
        return "bool"
    if action.choices:
        return "choice"
    tp = getattr(action, "_typehint", None) or action.type
    name = getattr(tp, "__name__", str(tp))
    return {"integer": "int", "int": "int", "number": "float", "float": "float"}.get(name, "text")


def _flag_value(action) -> st.SearchStrategy[str]:
    """Mostly values of the right type (to get past the parser into each command's own checks), some junk."""
    typed = (
        {
            "int": st.one_of(st.integers(-3, 100), st.integers(-(10**12), 10**12)).map(str),
            "float": st.one_of(st.floats(-2, 2, allow_nan=False), st.floats(allow_nan=False)).map(repr),
            "choice": st.sampled_from([str(c) for c in action.choices or ["x"]]),
            "text": VALUE,
        }[_kind(action)]
        if _kind(action) != "bool"
        else VALUE
    )
    return st.one_of(typed, typed, typed, VALUE)


def _yaml_value(action) -> st.SearchStrategy:
    typed = {
        "bool": st.booleans(),
        "int": st.integers(-3, 100),
        "float": st.floats(-2, 2),
        "choice": st.sampled_from(list(action.choices or ["x"])),
        "text": st.one_of(TRICKY, TEXT),
    }[_kind(action)]
    if action.nargs in ("+", "*"):
        typed = st.one_of(typed, st.lists(typed, max_size=3))
    return st.one_of(typed, typed, typed, YAML_VALUE)


def _options(name: str):
    """(flag actions, positional actions) of a command's parser, without --help."""
    parser = command_parser(name)
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    positionals = [a for a in parser._actions if not a.option_strings]
    return flags, positionals


@st.composite
def flag_arguments(draw, name: str) -> list[str]:
    flags, positionals = _options(name)
    argv: list[str] = []
    for action in positionals:
        if draw(st.integers(0, 9)):  # sometimes missing
            argv.append(draw(_flag_value(action)))
    for action in draw(st.lists(st.sampled_from(flags), max_size=5)) if flags else []:
        option = draw(st.sampled_from(action.option_strings))
        if action.nargs == 0:
            argv.append(option)
            continue
        count = draw(st.integers(1, 2)) if action.nargs in ("+", "*") else 1
        values = [draw(_flag_value(action)) for _ in range(count)]
        # --x=VALUE keeps a value that starts with '-' a value rather than another flag.
        argv += [f"{option}={values[0]}", *values[1:]] if values[0].startswith("-") else [option, *values]
    return argv


@st.composite
def yaml_documents(draw, name: str) -> str:
    flags, _ = _options(name)
    keys = [a.dest.split("__")[-1] for a in flags if a.dest != "config"]
    near = [k[:-1] + "z" for k in keys if len(k) > 2] + [k + "s" for k in keys]
    key = st.one_of(
        st.sampled_from(keys), st.sampled_from(near), TEXT, st.sampled_from(["moe", "preset", "out"])
    )
    if draw(st.integers(0, 9)) == 0:  # sometimes not a mapping, or not YAML at all
        return draw(
            st.one_of(
                TEXT, st.sampled_from(["[", ": :", "- 1", "a: [", "{a: 1", "\t x: 1", "!!python/object x"])
            )
        )
    document = draw(st.dictionaries(key, YAML_VALUE, max_size=5))
    return yaml.safe_dump(document, allow_unicode=True)


def _run(argv: list[str]) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(argv)
    return code, err.getvalue()


def _check(argv: list[str]) -> None:
    code, err = _run(argv)  # an exception here is the traceback a user would see
    assert code in (0, 1, 2), (code, argv, err)
    lines = [line for line in err.splitlines() if line.strip()]
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
    assert "Traceback" not in err, (argv, err)


FUZZ = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "taken").write_text("an existing file: no command may write its outputs here\n")
    return tmp_path


def _visible(folder: Path) -> list[str]:
    """What a command left in the working folder (HOME points there too: caches that libraries keep
    under ~/.cache or ~/.config are not the command's outputs)."""
    return sorted(n for n in os.listdir(folder) if not n.startswith("."))


def _guarded(name: str, argv: list[str]) -> list[str]:
    flags, _ = _options(name)
    if any("--out" in a.option_strings for a in flags):
        argv = [*argv, "--out", "taken"]  # the last --out wins
    return [name, *argv]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_flag_values_never_end_in_a_traceback(sandbox, name):
    @FUZZ
    @given(st.data())
    def fuzz(data):
        _check(_guarded(name, data.draw(flag_arguments(name))))

    fuzz()
    assert _visible(sandbox) == ["taken"]  # nothing written, and the file is untouched
    assert (sandbox / "taken").read_text().startswith("an existing file")


@pytest.mark.parametrize(
    "name", [n for n in COMMANDS if "--config" in command_parser(n)._option_string_actions]
)
def test_yaml_documents_never_end_in_a_traceback(sandbox, name):
    config = Path("fuzz.yaml")

    @FUZZ
    @given(st.data())
    def fuzz(data):
        config.write_text(data.draw(yaml_documents(name)))
        _check(_guarded(name, ["--config", str(config), *data.draw(flag_arguments(name))]))

    fuzz()
    assert _visible(sandbox) == ["fuzz.yaml", "taken"]
