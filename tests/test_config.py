"""One validation path for flags and YAML (issue 11): types named in errors, unknown keys named with a
"did you mean", flag types derived from the same field types, help showing the effective defaults."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest

from upcycle.config import (
    ConfigError,
    add_dataclass_flags,
    check_mapping,
    check_value,
    field_types,
    first_line,
    from_dict,
    load_yaml,
    normalise_keys,
    suggest,
)


@dataclass
class Options:
    """A config with one field of each kind."""

    steps: int = 10
    """Optimizer steps."""
    lr: float = 1e-3
    """Learning rate."""
    name: str = "drop"
    """A name."""
    mode: Literal["a", "b"] = "a"
    """A choice."""
    flag: bool = True
    """A switch."""
    warmup: int | None = None
    """Optional count (default: 1 % of steps)."""
    models: list[str] = field(default_factory=lambda: ["gpt2"])
    """Sources."""
    extra: dict = field(default_factory=dict)
    """Anything else."""


TYPES = field_types(Options)


@pytest.mark.parametrize(
    "name,value,expected",
    [
        ("steps", "ten", "expected an integer"),
        ("steps", 2.5, "expected an integer"),
        ("steps", True, "expected an integer"),
        ("lr", "0.5", "expected a number"),
        ("lr", float("nan"), "expected a number"),
        ("flag", "yes", "expected true or false"),
        ("flag", 1, "expected true or false"),
        ("mode", "c", "allowed values are 'a', 'b'"),
        ("models", {"a": 1}, "expected a list"),
        ("extra", [1], "expected a mapping"),
        ("name", None, "expected text"),
    ],
)
def test_wrong_types_name_the_field_value_and_type(name, value, expected):
    with pytest.raises(ConfigError) as err:
        check_value(name, TYPES[name], value, source="run.yaml")
    assert err.value.field == name and expected in err.value.allowed and err.value.source == "run.yaml"
    assert str(err.value).startswith(f"run.yaml: {name}=")


def test_values_of_the_right_type_pass_with_the_obvious_conversions():
    assert check_value("steps", TYPES["steps"], 3) == 3
    assert check_value("lr", TYPES["lr"], 1) == 1  # an integer is a number
    assert check_value("name", TYPES["name"], 3) == "3"  # `layers: 3` means the text '3'
    assert check_value("models", TYPES["models"], "gpt2") == ["gpt2"]  # one item for a list
    assert check_value("warmup", TYPES["warmup"], None) is None
    assert check_value("mode", TYPES["mode"], "b") == "b"


@pytest.mark.parametrize(
    "typo,known,meant",
    [
        ("learning_rate", ["lr", "steps"], "lr"),
        ("step", ["lr", "steps"], "steps"),
        ("expertz", ["experts", "top_k"], "experts"),
        ("top_kk", ["experts", "top_k"], "top_k"),
        ("num_experts", ["experts", "top_k"], "experts"),
        ("output_dir", ["out", "model"], "out"),
        ("zzz", ["lr", "steps"], None),
        ("learning_rate", ["steps"], None),  # an alias only when its target exists here
    ],
)
def test_did_you_mean(typo, known, meant):
    assert suggest(typo, known) == meant


def test_unknown_keys_are_all_named_with_a_suggestion():
    with pytest.raises(ConfigError) as err:
        check_mapping({"learning_rate": 1e-3, "stepz": 3, "zzz": 1}, TYPES, source="x.yaml")
    message = str(err.value)
    assert err.value.field == "learning_rate" and "did you mean lr?" in message
    assert "also unknown: stepz, zzz" in message and "known fields are" in message


def test_from_dict_checks_types_and_nested_keys():
    assert from_dict(Options, {"steps": 5, "models": "a"}) == Options(steps=5, models=["a"])
    with pytest.raises(ConfigError, match="expected an integer"):
        from_dict(Options, {"steps": "5"})
    with pytest.raises(ConfigError) as err:
        from_dict(Options, {"step": 5}, where="train")
    assert err.value.field == "train.step" and "did you mean train.steps?" in err.value.allowed


def test_flags_use_the_field_types_and_show_effective_defaults():
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_dataclass_flags(parser, Options, dest_prefix="o__")
    args = parser.parse_args(["--steps", "3", "--lr", "2e-4", "--no-flag", "--models", "a", "b"])
    assert (args.o__steps, args.o__lr, args.o__flag, args.o__models, args.o__name) == (
        3,
        2e-4,
        False,
        ["a", "b"],
        None,
    )
    with pytest.raises(argparse.ArgumentError, match="invalid integer value: 'ten'"):
        parser.parse_args(["--steps", "ten"])
    with pytest.raises(argparse.ArgumentError, match="invalid number value: 'inf'"):
        parser.parse_args(["--lr", "inf"])
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["o__steps"] == "Optimizer steps. (default: 10)"
    assert helps["o__flag"] == "A switch. (default: on)"
    assert helps["o__models"] == "Sources. (default: gpt2)"
    assert helps["o__warmup"] == "Optional count (default: 1 % of steps)."  # its own words, no None
    metavars = {a.dest: a.metavar for a in parser._actions}
    assert metavars["o__steps"] == "STEPS" and metavars["o__lr"] == "LR"


def test_yaml_errors_are_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [\n")
    with pytest.raises(ConfigError) as err:
        load_yaml(bad)
    assert err.value.field == "config" and "line 2" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="no such file"):
        load_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(tmp_path / "list.yaml")
    (tmp_path / "keys.yaml").write_text("1: a\n")
    with pytest.raises(ConfigError, match="keys must be option names"):
        load_yaml(tmp_path / "keys.yaml")
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    assert load_yaml(tmp_path / "empty.yaml") == {}


def test_yaml_paths_expand_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "c.yaml").write_text("steps: 3\n")
    assert load_yaml("~/c.yaml") == {"steps": 3}


def test_normalise_keys_and_first_line():
    assert normalise_keys({"top-k": 1, 3: {"a-b": 2}}) == {"top_k": 1, 3: {"a_b": 2}}
    assert first_line(ValueError("\n  first\nsecond")) == "first"
    assert first_line(ValueError()) == "ValueError"


def test_every_dataclass_field_kind_has_a_flag_or_is_yaml_only():
    parser = argparse.ArgumentParser()
    dests = add_dataclass_flags(parser, Options)
    assert set(dests) == {f.name for f in dataclasses.fields(Options)} - {"extra"}
