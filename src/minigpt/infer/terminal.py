"""``minigpt chat MODEL``: a terminal chat with the MiniGPT4Qwen demo's commands."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from .args import add_generation_arguments, add_model_arguments

HELP = """Commands:
  :help  :h              show this help
  :clear :cl             clear the screen
  :clh   :clear-history  clear the history (keep the image)
  :his   :history        show the history
  :img                   show the current image path(s)
  :image PATH [PATH ...] use these image(s) from the next question on ("quote paths" with spaces)
  :quit  :q  :exit       leave
Anything else is a question. Ctrl-C stops an answer; at the prompt it leaves."""

if TYPE_CHECKING:
    from .chat import Chat

CLEAR_SCREEN = "\x1b[2J\x1b[H"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="chat with a model in the terminal",
        description="Chat with a model in the terminal (:help lists the commands).",
    )
    add_model_arguments(parser)
    add_generation_arguments(parser)
    parser.add_argument("--image", action="append", default=[], metavar="PATH", help="image (repeatable)")
    parser.add_argument("--system", help="system prompt (default: the template's)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .args import engine_from_args

    chat = engine_from_args(args).chat(system=args.system)
    if args.image:
        chat.set_images(*args.image)
    return repl(chat, sys.stdin, sys.stdout)


def image_paths(arg: str) -> list[str]:
    """The paths of an ``:image`` command: the whole argument when it names a file (spaces and backslashes
    kept), else shell-style words, so ``"dir with space/a.png"`` or ``dir\\ with\\ space/a.png`` is one path."""
    if Path(arg).is_file():
        return [arg]
    try:
        return shlex.split(arg)
    except ValueError as err:  # an unclosed quote
        raise ValueError(f"cannot read the paths ({err}); quote each path that has spaces") from None


def repl(chat: Chat, stdin: TextIO, stdout: TextIO) -> int:
    """Read questions and commands from ``stdin`` until ``:quit`` or end of input."""

    def say(text: str = "") -> None:
        stdout.write(text + "\n")
        stdout.flush()

    def show_history(_: str) -> None:
        if not chat.history:
            say("(no history)")
        for i, ex in enumerate(chat.history, 1):
            images = "".join(f"[image: {img.name}] " for img in ex.images)
            say(f"[{i}] Q: {images}{ex.question}\n    A: {ex.answer}")

    def set_image(arg: str) -> None:
        if not arg:
            say("usage: :image PATH [PATH ...]")
            return
        chat.set_images(*image_paths(arg))
        say(f"Image set: {', '.join(chat.image_names)} (used from the next question on)")

    def clear_history(_: str) -> None:
        chat.reset()
        say("History cleared" + (" (image kept)." if chat.images else "."))

    commands: dict[str, Callable[[str], None]] = {
        "help": lambda _: say(HELP),
        "clear": lambda _: stdout.write(CLEAR_SCREEN),
        "clh": clear_history,
        "his": show_history,
        "img": lambda _: say("Image: " + (", ".join(chat.image_names) or "(none)")),
        "image": set_image,
    }
    aliases = {"h": "help", "cl": "clear", "clear-history": "clh", "history": "his"}
    say("minigpt chat. Type :help for commands." + (f" Image: {', '.join(chat.image_names)}" if chat.images else ""))
    while True:
        stdout.write("User: ")
        stdout.flush()
        try:
            line = stdin.readline()
        except KeyboardInterrupt:  # Ctrl-C at the prompt leaves, as end of input does
            line = ""
        if not line:
            say()
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith(":"):
            name, _, arg = line[1:].partition(" ")
            name = aliases.get(name, name)
            if name in ("quit", "q", "exit"):
                return 0
            handler = commands.get(name)
            if handler is None:
                say(f"unknown command :{name} (:help lists the commands)")
                continue
            try:
                handler(arg.strip())
            except (ValueError, OSError) as err:
                say(f"error: {err}")
            continue
        stdout.write("Assistant: ")
        try:
            with closing(chat.stream(line)) as deltas:  # closing stops generation at the next token
                for delta in deltas:
                    stdout.write(delta)
                    stdout.flush()
            say()
        except KeyboardInterrupt:
            say("\n(stopped: this question and its partial answer are not kept in the history)")
        except ValueError as err:
            say(f"\nerror: {err}")
