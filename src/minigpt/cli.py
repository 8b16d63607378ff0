"""``minigpt`` command line: one sub-command per module, registered in :data:`COMMANDS`.

Each module listed has ``register(subparsers)`` that adds its parser and sets ``func``; modules
import their heavy dependencies inside the command, so ``minigpt --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

#: Sub-command modules, in the order ``--help`` lists them.
COMMANDS: list[str] = [
    "minigpt.tools.quickstart",
    "minigpt.train.cli",
    "minigpt.train.memory.cli",
    "minigpt.infer.terminal",
    "minigpt.infer.web",
    "minigpt.infer.server",
    "minigpt.eval.cli",
    "minigpt.convert.cli",
    "minigpt.data.cli",
    "minigpt.tools.info",
    "minigpt.tools.bench.cli",
]


def add_command_group(
    subparsers: argparse._SubParsersAction, name: str, help: str, description: str
) -> argparse._SubParsersAction:
    """A command made of sub-commands (``minigpt NAME WHAT``; ``minigpt NAME`` alone prints its help): the
    sub-parsers to add them to."""
    parser = subparsers.add_parser(name, help=help, description=description)
    parser.set_defaults(func=lambda args: (parser.print_help(), 0)[1])
    return parser.add_subparsers(dest=f"{name}_command", metavar="WHAT")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="minigpt", description="MiniGPT-4-style vision chat models for any LLM.")
    parser.add_argument("--version", action="version", version=f"minigpt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    _name_parsers(parser)
    return parser


def _name_parsers(parser: argparse.ArgumentParser) -> None:
    """Each (sub-)command records its parser, so that its errors show its own usage (the innermost wins)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                if "command_parser" not in command._defaults:
                    command.set_defaults(command_parser=command)
                _name_parsers(command)


def main(argv: list[str] | None = None) -> int:
    from .console import error_text, quiet_third_party, setup_logging

    argv = sys.argv[1:] if argv is None else list(argv)
    if not {"-v", "--verbose"} & set(argv):
        quiet_third_party()  # before the commands' modules import transformers (its settings are read at import)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the command's own parser (its usage), with its hint when it has one
        hint = getattr(args, "unknown_hint", None)
        (getattr(args, "command_parser", None) or parser).error(
            f"unrecognized arguments: {' '.join(unknown)}{hint(unknown) if hint else ''}"
        )
    setup_logging(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except BrokenPipeError:  # `minigpt info MODEL | head`: the reader left; stop quietly, as SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as err:
        # Bad input is reported as one clear line, not a traceback (use -v for the traceback).
        if args.verbose:
            raise
        print(f"minigpt {args.command}: error: {error_text(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
