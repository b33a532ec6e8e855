"""The ``upcycle`` command: one thin table from sub-command to the module that implements it.

Each module provides ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``, and imports
heavy modules (torch, transformers, datasets, matplotlib) only inside ``run``. Only the command that runs
is imported, so ``--help`` and argument errors answer at once (issue 11). A module may also provide
``check(args)``: validation that needs no heavy module (options, YAML, names and files), run before the
MoE model types are registered (which imports torch and transformers), so those mistakes are reported at
once too; ``run`` may repeat it.

Errors a user can fix (bad option values, unknown YAML keys, missing files, unreachable names, corrupt
weights) are printed as one line naming the flag, key or file and what is allowed, with exit status 2;
Ctrl-C exits with 130 without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import signal
import sys
import threading

COMMANDS: dict[str, str] = {
    "convert": "upcycle.upcycling.cli",
    "extend": "upcycle.upcycling.extend_cli",
    "inspect": "upcycle.analysis.inspect",
    "export": "upcycle.models.export",
    "pretrain": "upcycle.training.cli",
    "finetune": "upcycle.training.finetune_cli",
    "demo": "upcycle.demo",
    "analyze": "upcycle.analysis.cli",
    "fertility": "upcycle.analysis.fertility_cli",
    "evaluate": "upcycle.evaluation.cli",
    "run": "upcycle.experiment.cli",
    "report": "upcycle.report.cli",
}

DESCRIPTION = "Turn dense language models into Mixture-of-Experts models, train them, and study them."


def _help_formatter():
    """jsonargparse's formatter, keeping the line breaks of descriptions and epilogs (example commands,
    tables) and showing each option's help as written: the defaults shown are the effective ones that
    ``add_dataclass_flags`` put there, not the flags' internal ``None``."""
    from jsonargparse import DefaultHelpFormatter

    class HelpFormatter(DefaultHelpFormatter):
        def _fill_text(self, text, width, indent):
            return "".join(indent + line for line in text.splitlines(keepends=True))

        def _get_help_string(self, action):
            from upcycle.config import describe_default

            text = action.help or ""
            if action.required and action.option_strings:
                text += " (required)"
            # A plain add_argument with a real default (dataclass flags default to None and already
            # show the field's default in their help).
            switch_off = action.nargs == 0 and action.default is False  # a plain --flag
            shown = (
                None
                if action.default is argparse.SUPPRESS or switch_off
                else describe_default(action.default)
            )
            if shown is not None and action.option_strings and "default" not in text.lower():
                text += f" (default: {shown})"
            return text

    return HelpFormatter


def command_parser(name: str):
    """The parser of one sub-command (only its module is imported)."""
    from jsonargparse import ArgumentParser

    module = importlib.import_module(COMMANDS[name])
    parser = ArgumentParser(
        prog=f"upcycle {name}",
        description=(module.__doc__ or "").strip() or None,
        formatter_class=_help_formatter(),
        exit_on_error=False,
    )
    module.add_arguments(parser)
    return parser


def usage() -> str:
    """What ``upcycle`` and ``upcycle --help`` print: the usage and one line per command."""
    width = max(len(name) for name in COMMANDS)
    lines = [
        "usage: upcycle [-h] [--version] COMMAND [options]",
        "",
        DESCRIPTION,
        "",
        "commands:",
    ]
    for name, module_name in COMMANDS.items():
        lines.append(f"  {name:<{width}}  {importlib.import_module(module_name).HELP}")
    lines += ["", "Run 'upcycle COMMAND --help' for the options of a command."]
    return "\n".join(lines)


def _suggestion(word: str, choices) -> str:
    from upcycle.config import suggest

    hint = suggest(word, list(choices))
    return f" (did you mean {hint!r}?)" if hint else ""


def _option_for_dest(parser, dest: str) -> str:
    """The flag of a destination (``moe__capacity_factor`` → ``--capacity-factor``); a positional
    argument's name as its help shows it."""
    for action in parser._actions:
        if action.dest == dest:
            return max(action.option_strings, key=len) if action.option_strings else action.metavar or dest
    return "--" + dest.split("__")[-1].replace("_", "-")


def explain_parse_error(parser, exc: BaseException) -> str:
    """One line for an argument error: the flag, the value and what was expected, with a suggestion for
    a mistyped flag or choice."""
    message = " ".join(str(exc).split())
    # jsonargparse's own type check (a plain ``type=int`` in add_argument): 'Parser key "x": Expected a
    # <class 'int'>. Got value: y'.
    m = re.match(r'Parser key "([^"]+)":\s*Expected a <class \'(\w+)\'>\. Got value:\s*(.*)$', message)
    if m:
        names = {"int": "integer", "float": "number", "str": "text", "bool": "true or false"}
        kind = names.get(m.group(2), m.group(2))
        return f"argument {_option_for_dest(parser, m.group(1))}: invalid {kind} value: {m.group(3)!r}"
    m = re.match(r"unrecognized arguments: (\S+)", message)
    if m and m.group(1).startswith("-"):
        flag = m.group(1).split("=")[0]
        options = [s[2:] for a in parser._actions for s in a.option_strings if s.startswith("--")]
        hint = _suggestion(flag.lstrip("-"), options).replace(" '", " '--").replace(" or ", " or --")
        return f"unknown option {flag}{hint}; see 'upcycle {parser.prog.split()[-1]} --help'"
    m = re.match(r"the following arguments are required: (.*)$", message)
    if m:
        names = [_option_for_dest(parser, n.strip()) for n in m.group(1).split(",")]
        return f"the following arguments are required: {', '.join(names)}"
    m = re.match(r"argument (\S+): invalid choice: '([^']*)' \(choose from (.*)\)$", message)
    if m:
        choices = [c.strip().strip("'") for c in m.group(3).split(",")]
        hint = _suggestion(m.group(2), choices)
        return (
            f"argument {m.group(1)}: invalid choice: {m.group(2)!r}{hint}; choose from {', '.join(choices)}"
        )
    return message


def _field_to_flag(field: str) -> str:
    """The flag of a config field: ``moe.num_experts`` → ``--experts``, ``top_k`` → ``--top-k``."""
    from upcycle.upcycling.options import RENAMED

    if field[:1].isupper() or field.startswith("-"):  # a positional argument's name (PATH) or a flag
        return field
    name = field[4:] if field.startswith("moe.") else field
    name = RENAMED.get(name, name)
    return "--" + name.replace("_", "-")


def format_error(err: BaseException) -> str:
    """The one line printed for an error the user can fix."""
    from upcycle.config import ConfigError, first_line

    if isinstance(err, ConfigError):
        if not str(err.field).isprintable():  # a YAML key with a line break or control character
            err.field = repr(err.field)
        if err.source:  # a key of a YAML file, named as written there
            return f"{err.source}: {err.field}={err.value!r} is invalid: {first_line(err.allowed)}"
        return f"{_field_to_flag(err.field)}={err.value!r} is invalid: {first_line(err.allowed)}"
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    return first_line(err)


@contextlib.contextmanager
def _ctrl_c_exits_at_once():
    """While torch and transformers import (seconds, partly in C code, and library code there can lose
    the KeyboardInterrupt a Ctrl-C raises): Ctrl-C ends the process at once with status 130. Nothing has
    been written yet, so there is nothing to clean up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum, frame):
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(130)

    previous = signal.signal(signal.SIGINT, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def main(argv: list[str | os.PathLike] | None = None) -> int:
    argv = [
        os.fspath(a) if isinstance(a, os.PathLike) else a for a in (sys.argv[1:] if argv is None else argv)
    ]
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C at any point the command does not handle itself (start-up, loading): no traceback, and
        # the shell's status for "ended by SIGINT".
        return 130


def _main(argv: list[str]) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Our commands show their own progress; Hugging Face's per-file bars only add noise around them.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from upcycle import __version__

        print(f"upcycle {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        hint = _suggestion(argv[0], COMMANDS)
        print(
            f"error: unknown command '{argv[0]}'{hint}; commands are {', '.join(COMMANDS)}", file=sys.stderr
        )
        return 2
    name = argv[0]
    parser = command_parser(name)
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit as exc:  # --help (already printed)
        return int(exc.code or 0)
    except argparse.ArgumentError as exc:
        print(f"error: {explain_parse_error(parser, exc)}", file=sys.stderr)
        return 2
    return _run(name, args)


def _run(name: str, args) -> int:
    from upcycle.config import ConfigError, UserError

    module = importlib.import_module(COMMANDS[name])
    try:
        if hasattr(module, "check"):
            module.check(args)
        with _ctrl_c_exits_at_once():
            import upcycle

            upcycle.register_model_types()
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        return int(module.run(args) or 0)
    except (ConfigError, UserError, OSError) as err:
        print(f"error: {format_error(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
