"""``minigpt chat``: driven through stdin, each command's output checked."""

from __future__ import annotations

import argparse
import io
import sys

from minigpt.infer import terminal


def run_chat(argv: list[str], script: str, monkeypatch, capsys) -> tuple[int, str]:
    """``minigpt chat ARGV`` with ``script`` on stdin; returns (exit code, stdout)."""
    parser = argparse.ArgumentParser(prog="minigpt")
    terminal.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["chat", *argv])
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    code = args.func(args)
    return code, capsys.readouterr().out


def test_registered_as_a_cli_command():
    from minigpt.cli import COMMANDS

    assert "minigpt.infer.terminal" in COMMANDS


def test_commands_through_stdin(tiny_model_dir, image_file, tmp_path, monkeypatch, capsys):
    other = tmp_path / "other.png"
    other.write_bytes(image_file.read_bytes())
    script = (
        "\n".join(
            [
                ":help",
                ":img",
                "What is it?",
                ":his",
                ":clh",
                ":his",
                ":img",
                f":image {other}",
                ":img",
                "Second question?",
                ":his",
                ":clear",
                ":image /no/such.png",
                ":bogus",
                ":quit",
                "never asked",
            ]
        )
        + "\n"
    )
    argv = [str(tiny_model_dir), "--image", str(image_file), "--cpu-only", "--max-new-tokens", "6"]
    code, out = run_chat(argv, script, monkeypatch, capsys)
    assert code == 0
    blocks = out.split("User: ")
    assert blocks[0].startswith("minigpt chat. Type :help") and str(image_file) in blocks[0]
    by_command = dict(zip(script.splitlines(), blocks[1:]))  # for repeated commands: the last
    assert ":clh" in by_command[":help"] and ":image PATH" in by_command[":help"]
    answer = by_command["What is it?"].removeprefix("Assistant: ").rstrip("\n")
    assert answer and "\n" not in answer
    assert by_command[":clh"] == "History cleared (image kept).\n"
    assert by_command[f":image {other}"].startswith(f"Image set: {other}")
    assert by_command[":clear"] == terminal.CLEAR_SCREEN
    assert by_command[":image /no/such.png"].startswith("error: image file not found: /no/such.png")
    assert by_command[":bogus"].startswith("unknown command :bogus")
    # Commands that appear twice: look at their occurrences in order.
    his = [b for line, b in zip(script.splitlines(), blocks[1:]) if line == ":his"]
    assert his[0] == f"[1] Q: [image: {image_file}] What is it?\n    A: {answer}\n"
    assert his[1] == "(no history)\n"
    assert his[2].startswith(f"[1] Q: [image: {other}] Second question?\n    A: ")
    img = [b for line, b in zip(script.splitlines(), blocks[1:]) if line == ":img"]
    assert img == [f"Image: {image_file}\n", f"Image: {image_file}\n", f"Image: {other}\n"]
    assert "never asked" not in out and len(blocks) == len(script.splitlines())


def test_end_of_input_quits_and_text_only_chat_works(tiny_model_dir, monkeypatch, capsys):
    argv = [str(tiny_model_dir), "--device", "cpu", "--max-new-tokens", "4"]
    code, out = run_chat(argv, "Hello?\n:img\n", monkeypatch, capsys)
    assert code == 0
    assert "Image: (none)" in out and out.count("Assistant: ") == 1 and out.endswith("User: \n")


def test_quoted_image_paths_with_spaces(tiny_model_dir, image_file, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "dir with space"
    folder.mkdir()
    (folder / "a.png").write_bytes(image_file.read_bytes())
    (folder / "b c.png").write_bytes(image_file.read_bytes())
    monkeypatch.chdir(tmp_path)
    script = (
        "\n".join(
            [
                ':image "dir with space/a.png"',
                ":img",
                f":image {folder}/a.png",
                ":img",
                ":image 'dir with space/a.png' \"dir with space/b c.png\"",
                ":img",
                ':image "unclosed.png',
                ":q",
            ]
        )
        + "\n"
    )
    code, out = run_chat([str(tiny_model_dir), "--cpu-only"], script, monkeypatch, capsys)
    blocks = dict(zip(script.splitlines(), out.split("User: ")[1:]))
    assert code == 0
    assert blocks[":image 'dir with space/a.png' \"dir with space/b c.png\""].startswith(
        "Image set: dir with space/a.png, dir with space/b c.png"
    )
    imgs = [b for line, b in zip(script.splitlines(), out.split("User: ")[1:]) if line == ":img"]
    assert imgs == [
        "Image: dir with space/a.png\n",
        f"Image: {folder}/a.png\n",
        "Image: dir with space/a.png, dir with space/b c.png\n",
    ]
    assert blocks[':image "unclosed.png'] == (
        "error: cannot read the paths (No closing quotation); quote each path that has spaces\n"
    )


def test_ctrl_c_stops_the_answer_and_keeps_the_chat(tiny_model_dir, monkeypatch, capsys):
    """Ctrl-C (KeyboardInterrupt) arriving while an answer streams: generation stops, the chat goes on with the
    history it had, and the next answer is what it would have been without the interrupted question."""
    import threading
    from contextlib import closing

    from minigpt.infer.chat import ChatEngine

    argv = [str(tiny_model_dir), "--cpu-only", "--max-new-tokens", "12"]
    _, plain = run_chat(argv, "What is it?\n:his\n", monkeypatch, capsys)
    real_stream = ChatEngine.stream
    calls = []

    def interrupted_once(self, *args, **kwargs):
        calls.append(args)
        with closing(real_stream(self, *args, **kwargs)) as deltas:
            for i, delta in enumerate(deltas):
                if len(calls) == 1 and i == 1:
                    raise KeyboardInterrupt  # as if the signal arrived while waiting for the next token
                yield delta

    monkeypatch.setattr(ChatEngine, "stream", interrupted_once)
    code, out = run_chat(argv, "Tell me a long story.\nWhat is it?\n:his\n", monkeypatch, capsys)
    assert code == 0 and len(calls) == 2
    blocks = out.split("User: ")
    assert blocks[1].startswith("Assistant: ") and blocks[1].endswith(
        "\n(stopped: this question and its partial answer are not kept in the history)\n"
    )
    assert blocks[2:4] == plain.split("User: ")[1:3]  # same answer, history holds one exchange
    assert blocks[3].startswith("[1] Q: What is it?") and "[2]" not in blocks[3]
    assert not [t for t in threading.enumerate() if t.name == "minigpt-generate"]


def test_ctrl_c_at_the_prompt_leaves(tiny_model_dir, monkeypatch, capsys):
    class Interrupting(io.StringIO):
        def readline(self, *args):
            raise KeyboardInterrupt

    parser = argparse.ArgumentParser(prog="minigpt")
    terminal.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["chat", str(tiny_model_dir), "--cpu-only"])
    monkeypatch.setattr(sys, "stdin", Interrupting())
    assert args.func(args) == 0 and capsys.readouterr().out.endswith("User: \n")
