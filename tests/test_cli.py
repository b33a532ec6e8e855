"""The `upcycle` command as a newcomer meets it (issue 11): start-up, help, versions, argument errors and
Ctrl-C, for every command in the table."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time

import pytest

import upcycle
from tests.clitools import (
    assert_one_line_error,
    enter_workdir,
    refused,
    run_cli,
    subprocess_env,
    upcycle_subprocess,
)
from upcycle import cli
from upcycle.cli import COMMANDS

HEAVY = ("torch", "transformers", "datasets", "matplotlib", "accelerate")


def test_bare_command_prints_usage_and_every_command(capsys):
    code, out, err = run_cli(capsys, [])
    assert code == 2 and out == ""
    assert err.startswith("usage: upcycle")
    for name, module in COMMANDS.items():
        assert f"  {name} " in err and importlib.import_module(module).HELP in err
    code, out, _ = run_cli(capsys, ["--help"])
    assert code == 0 and "commands:" in out


def test_version(capsys):
    code, out, _ = run_cli(capsys, ["--version"])
    assert code == 0 and out.strip() == f"upcycle {upcycle.__version__}"


def test_unknown_command_suggests_the_nearest(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(capsys, tmp_path, ["convrt", "--out", "x"], "unknown command 'convrt'", "did you mean 'convert'")


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_shows_effective_defaults_and_value_names(capsys, name):
    code, out, _ = run_cli(capsys, [name, "--help"])
    assert code == 0
    assert "default: null" not in out and "default: None" not in out
    # Metavars are value names, never internal destinations (moe__capacity_factor → MOE__CAPACITY_FACTOR).
    usage_block = out.split("\n\n")[0]
    assert usage_block.startswith(f"usage: upcycle {name}") and "__" not in usage_block
    assert "Traceback" not in out


def test_convert_help_lists_defaults_presets_and_keeps_example_lines(capsys):
    _, out, _ = run_cli(capsys, ["convert", "--help"])
    flat = " ".join(out.split())
    for shown in ("(default: drop)", "(default: 0.5)", "(default: 8)", "(default: 2)", "(default: all)"):
        assert shown in flat
    assert "Renormalise the kept top-k probabilities (see MoEConfig.renormalize)" in flat
    assert "a top-1 router. (default: on)" in flat  # the renormalize flag's help ends with its default
    assert "--capacity-factor CAPACITY_FACTOR" in out
    # Example commands keep their own lines (a raw description, not one reflowed paragraph).
    assert (
        "\nExamples:\n  upcycle convert --preset report-gpt2 --out gpt2-moe\n  upcycle convert --model" in out
    )
    from upcycle.upcycling.options import PRESETS

    preset_lines = [line for line in out.splitlines() if line.startswith("  ") and line.split()[0] in PRESETS]
    assert len(preset_lines) == len(PRESETS)  # one line each
    assert any("ratio=0.15" in line and "top_k=1" in line for line in preset_lines)


def test_export_help_keeps_the_mapping_table(capsys):
    _, out, _ = run_cli(capsys, ["export", "--help"])
    table = [line for line in out.splitlines() if "→" in line]
    assert len(table) == 5 and all(line.startswith("  ") for line in table)
    assert "model.layers.i.mlp.router.weight            → model.layers.i.mlp.gate.weight" in out


def test_pretrain_help_lists_model_presets_and_defaults(capsys):
    from upcycle.models.presets import PRESETS

    _, out, _ = run_cli(capsys, ["pretrain", "--help"])
    flat = " ".join(out.split())
    assert "(default: 1000)" in flat and "(default: allenai/c4)" in flat and "(default: cosine)" in flat
    for name, preset in PRESETS.items():
        assert f"  {name}" in out and preset.description in out
    assert "15 % faster" in flat  # a literal '%' in a docstring survives argparse's %-formatting


@pytest.mark.parametrize(
    "argv,needles",
    [
        (["convert", "--experts", "eight"], ["--experts", "'eight'", "integer"]),
        (["pretrain", "--steps", "ten"], ["--steps", "'ten'", "integer"]),
        (["pretrain", "--lr", "fast"], ["--lr", "'fast'", "number"]),
        (["pretrain", "--lr", "nan"], ["--lr", "'nan'", "number"]),
        (["inspect", "x", "--seq-len", "abc"], ["--seq-len", "'abc'", "integer"]),
        (["convert", "--method", "dorp"], ["--method", "'dorp'", "did you mean 'drop'"]),
        (["convert", "--expertz", "3"], ["--expertz", "did you mean '--expert or --experts'"]),
        (["export", "m"], ["--format", "--out", "required"]),
    ],
)
def test_argument_errors_name_flag_value_and_type(capsys, tmp_path, monkeypatch, argv, needles):
    monkeypatch.chdir(tmp_path)
    refused(capsys, tmp_path, argv, *needles)


#: A bad option value per command whose options are checked after parsing (by the command's ``check``).
VALUE_ERRORS = [
    ["evaluate", "m", "--task", "nli"],
    ["analyze", "routing", "m", "--max-tokens", "0", "--out", "o"],
    ["analyze", "training", "r", "--collapse-share", "2", "--out", "o"],
    ["fertility", "--max-examples", "0", "--out", "o"],
]


def test_help_and_argument_errors_import_nothing_heavy(tmp_path):
    """The user's start-up paths, `python -m upcycle` and the console script `upcycle` (what pip writes):
    parsing, and checking option values, imports only the command's module, never torch or transformers."""
    script = tmp_path / "bin" / "upcycle"
    script.parent.mkdir()
    script.write_text("import sys\nfrom upcycle.cli import main\nsys.exit(main())\n")
    probes = [["--help"], [], ["convert", "--experts", "eight"]] + [[name, "--help"] for name in COMMANDS]
    probes += VALUE_ERRORS
    for entry in (["-m", "upcycle"], [str(script)]):
        for argv in probes if entry[0] == "-m" else probes[:3]:
            result = subprocess.run(
                [sys.executable, "-X", "importtime", *entry, *argv],
                cwd=tmp_path,
                env=subprocess_env(),
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert result.returncode in (0, 2), result.stderr[-2000:]
            if argv in VALUE_ERRORS:
                assert result.returncode == 2 and "is invalid" in result.stderr, result.stderr[-2000:]
            modules = {
                line.split("|")[-1].strip()
                for line in result.stderr.splitlines()
                if line.startswith("import time:")
            }
            assert "upcycle.cli" in modules
            assert not modules & set(HEAVY), (
                f"upcycle {' '.join(argv)} imported {sorted(modules & set(HEAVY))}"
            )


def test_ctrl_c_during_start_up_exits_130_quietly(capsys, monkeypatch):
    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.importlib, "import_module", interrupted)
    code, out, err = run_cli(capsys, ["convert", "--out", "x"])
    assert code == 130 and out == "" and err == ""


@pytest.mark.skipif(os.name != "posix", reason="SIGINT delivery to a child process")
def test_ctrl_c_while_a_command_loads_exits_130_without_traceback(tmp_path):
    """SIGINT while `upcycle inspect` imports torch and transformers (the seconds a user waits)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "upcycle", "inspect", str(tmp_path)],
        cwd=tmp_path,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.8)  # past the parser (≈0.2 s), inside the heavy imports (seconds)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 2:  # the machine was fast enough to finish first: nothing to interrupt
        pytest.skip("the command ended before the signal")
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_the_readme_start_up_figure_is_measurable(tmp_path):
    """`upcycle --help` answers in well under a second (the figure quoted in the README; generous bound
    for a busy CI machine)."""
    start = time.perf_counter()
    result = upcycle_subprocess(["convert", "--help"], tmp_path)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0 and elapsed < 3.0, elapsed


def test_unexpected_errors_keep_their_traceback(capsys, monkeypatch):
    module = importlib.import_module(COMMANDS["inspect"])

    def bug(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(module, "run", bug)
    with pytest.raises(ZeroDivisionError):
        cli.main(["inspect", "x"])


def test_a_plain_type_int_flag_of_a_command_is_explained(capsys, monkeypatch):
    """A command that declares ``type=int`` itself (jsonargparse's own check) gets the same message."""
    import sys
    import types

    module = types.ModuleType("plain_int_command")
    module.HELP = "a command with a plain type=int flag"
    module.add_arguments = lambda parser: parser.add_argument("--steps", type=int, default=1)
    module.run = lambda args: 0
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(COMMANDS, "plain", module.__name__)
    line = assert_one_line_error(
        run_cli(capsys, ["plain", "--steps", "ten"])[2], "--steps", "'ten'", "integer"
    )
    assert "Parser key" not in line


@pytest.mark.parametrize(
    "argv,field,expected",
    [
        (["evaluate", "a", "b", "--names", "x,y"], "names", ["x", "y"]),
        (["evaluate", "a", "b", "--names", "x", "y"], "names", ["x", "y"]),
        (["analyze", "routing", "a", "b", "--names", "x,y", "--out", "o"], "names", ["x", "y"]),
        (["analyze", "routing", "a", "b", "--names", "x", "y", "--out", "o"], "names", ["x", "y"]),
        (["analyze", "training", "a", "b", "--names", "x,y", "--out", "o"], "names", ["x", "y"]),
        (["fertility", "--tokenizer", "gpt2", "gpt2-offline", "--names", "x,y", "--out", "o"], "names", ["x", "y"]),
        (["fertility", "--text-fields", "premise,hypothesis", "--out", "o"], "text_fields", ["premise", "hypothesis"]),
        (["fertility", "--text-fields", "premise", "hypothesis", "--out", "o"], "text_fields", ["premise", "hypothesis"]),
        (["finetune", "--text-fields", "sentence1,sentence2", "--out", "o"], "text_field_list", ["sentence1", "sentence2"]),
        (["evaluate", "a", "--text-fields", "sentence1,sentence2"], "text_field_list", ["sentence1", "sentence2"]),
    ],
)  # fmt: skip
def test_list_flags_take_commas_or_spaces_in_every_command(argv, field, expected):
    """`--names a,b` and `--text-fields premise,hypothesis` mean the same in every command (and the
    space-separated form still works where a flag takes several values)."""
    args = cli.command_parser(argv[0]).parse_args(argv[1:])
    cfg = importlib.import_module(COMMANDS[argv[0]]).config_from_args(args)
    assert getattr(cfg, field) == expected


@pytest.mark.parametrize(
    "argv,needles",
    [
        (["fertility", "--tokenizer", "dnese", "--out", "o"], ["--tokenizer='dnese'", "no local folder 'dnese'"]),
        (["fertility", "--data", "nope/xnli", "--out", "o"], ["--data='nope/xnli'", "no local folder 'nope/xnli'"]),
        (["evaluate", "m", "--data", "nope/xnli", "--out", "o"], ["--data='nope/xnli'", "no local folder"]),
        (["evaluate", "m", "--out", "o"], ["--data='facebook/xnli'"]),
        (["evaluate", "m", "--task", "lm", "--data", "nope/c4", "--out", "o"], ["--data='nope/c4'"]),
        (["analyze", "routing", "m", "--data", "nope/xnli", "--out", "o"], ["--data='nope/xnli'"]),
        (["analyze", "routing", "m", "--domain", "web=nope/c4", "--out", "o"], ["--domain='nope/c4'"]),
    ],
)  # fmt: skip
def test_hub_names_fail_fast_when_the_hub_is_unreachable(capsys, tmp_path, monkeypatch, argv, needles):
    """The one-line answer pretrain and finetune give (issue 11), from every command that reads a tokenizer
    or a dataset by name, before any model or data is loaded."""
    enter_workdir(tmp_path, monkeypatch)
    (tmp_path / "m").mkdir()  # a model folder as far as the names are concerned (its weights are not read)
    (tmp_path / "m" / "config.json").write_text('{"model_type": "moe_gpt2", "moe_layers": [1]}')
    refused(capsys, tmp_path, argv, *needles, "and the hub could not be reached")
