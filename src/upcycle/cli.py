"""The ``upcycle`` command: one thin table from sub-command to the module that implements it.

Each module provides ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``. Errors a
user can fix (bad option values, missing files, unsupported models) are printed as one line naming the
flag and what is allowed, with exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS: dict[str, str] = {
    "convert": "upcycle.upcycling.cli",
    "inspect": "upcycle.analysis.inspect",
    "export": "upcycle.models.export",
    "pretrain": "upcycle.training.cli",
    "demo": "upcycle.demo",
    "evaluate": "upcycle.evaluation.cli",
}


def _field_to_flag(field: str) -> str:
    from upcycle.upcycling.options import RENAMED

    name = field.split(".")[-1] if field.startswith("moe.") and field[4:] in RENAMED else field
    name = RENAMED.get(name, name)
    return "--" + name.replace("moe.", "").replace("_", "-")


def build_parser():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="upcycle",
        description="Turn dense language models into Mixture-of-Experts models, train them, and study them.",
        exit_on_error=False,
    )
    subcommands = parser.add_subcommands(dest="command", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = ArgumentParser(prog=f"upcycle {name}", description=module.__doc__, exit_on_error=False)
        module.add_arguments(sub)
        subcommands.add_subcommand(name, sub, help=module.HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    from upcycle.config import ConfigError, UserError

    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Our commands show their own progress; Hugging Face's per-file bars only add noise around them.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not argv or argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        known = ", ".join(COMMANDS)
        if argv:
            print(f"error: unknown command '{argv[0]}'; commands are {known}", file=sys.stderr)
            return 2
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or argparse's own usage error (already printed)
        return int(exc.code or 0)
    except Exception as exc:  # jsonargparse reports bad flag values as exceptions when exit_on_error=False
        print(f"error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[args.command])
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return int(module.run(getattr(args, args.command)) or 0)
    except ConfigError as err:
        print(f"error: {_field_to_flag(err.field)}={err.value!r} is invalid: {err.allowed}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NotADirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
