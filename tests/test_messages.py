"""What the commands print: logged skips (not Python warnings), rank-0 set-up lines, quiet third-party libraries,
visible progress on a 0-size terminal, one-line errors with the flag to use, and no "Broken pipe"."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import textwrap
import warnings
from pathlib import Path

import pytest

from minigpt.cli import main
from minigpt.console import QUIET_ENV

REPO = Path(__file__).resolve().parents[1]


def fresh_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: this checkout's sources, none of the settings that quiet libraries (an
    in-process command of an earlier test may have set them)."""
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV and k != "DS_ACCELERATOR"}
    return {**env, "PYTHONPATH": str(REPO / "src"), **extra}


def python(code: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with this checkout's sources."""
    environ = fresh_env(**(env or {}))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------- skips and logging


def test_skips_are_logged_even_with_python_warnings_off(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([{"image": "a.jpg", "conversations": []}, {"image": "b.jpg"}] * 1))
    code = f"""
        from minigpt.console import setup_logging
        from minigpt.data.formats import read_llava_json
        setup_logging()
        try:
            read_llava_json({str(tmp_path / "d.json")!r})
        except ValueError as err:
            print("error:", err)
    """
    result = python(code, env={"PYTHONWARNINGS": "ignore"})
    lines = result.stderr.splitlines()
    assert sum(line.startswith("WARNING minigpt.data.formats: skipped ") for line in lines) == 2, result.stderr
    assert "Warning" not in result.stderr  # a log line, not a Python warning with its source location
    assert "no valid record (2 skipped" in result.stdout


def test_eval_problems_are_log_lines_not_warnings(recwarn, caplog):
    from minigpt.eval.runner import Problems

    problems = Problems()
    problems.add("missing_image", "vqa.jsonl:3", "image file not found: a.png")
    assert [r.getMessage() for r in caplog.records] == ["missing image: vqa.jsonl:3: image file not found: a.png"]
    assert caplog.records[0].name == "minigpt.eval.runner" and caplog.records[0].levelname == "WARNING"
    assert len(recwarn) == 0


LOG_LINES = """
    import logging
    from minigpt.console import setup_logging
    setup_logging()
    logging.getLogger("minigpt.train.loop").info("setup line")
    logging.getLogger("minigpt.train.loop").warning("a problem")
"""


@pytest.mark.parametrize("rank, shown", [("0", ["setup line", "a problem"]), ("1", ["a problem"])])
def test_under_torchrun_only_rank_0_prints_the_setup_lines(rank, shown):
    result = python(LOG_LINES, env={"RANK": rank})
    assert [line.split(": ", 1)[1] for line in result.stderr.splitlines()] == shown


def test_third_party_noise_is_silenced_and_verbose_restores_it(tiny_llama_dir):
    code = f"""
        import logging, sys, warnings
        from minigpt.console import setup_logging
        setup_logging(verbose=sys.argv[1] == "-v")
        import deepspeed, bitsandbytes  # the accelerator line, the CPU gemm_4bit_forward notice
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained({str(tiny_llama_dir)!r})  # the weight-loading bar
        warnings.warn("old API", FutureWarning)
        logging.getLogger("bitsandbytes.cextension").error("a real error")
    """
    noise = ("Setting accelerator", "gemm_4bit_forward", "Loading weights", "FutureWarning")
    quiet = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), ""],
        env=fresh_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert quiet.returncode == 0, quiet.stderr
    assert not [n for n in noise if n in quiet.stderr + quiet.stdout], quiet.stderr
    assert "a real error" in quiet.stderr
    verbose = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), "-v"],
        env=fresh_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert all(n in verbose.stderr + verbose.stdout for n in noise), verbose.stderr


# ---------------------------------------------------------------------------------------------- progress


def _on_zero_size_terminal(code: str) -> str:
    """What ``code`` writes to a pseudo-terminal that reports 0 rows and 0 columns."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
    env = fresh_env()
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stderr=slave, env=env)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=60)
    os.close(master)
    return out.decode(errors="replace")


@pytest.mark.parametrize("make", ["tqdm.auto.tqdm", "minigpt.console.progress_bar"])
def test_progress_shows_on_a_terminal_of_zero_size(make):
    module, name = make.rsplit(".", 1)
    code = f"""
        from {module} import {name} as bar
        b = bar(total=5, desc="step", dynamic_ncols=True, mininterval=0)
        for _ in range(3):
            b.update(1)
        b.close()
    """
    shown = "3/5" in _on_zero_size_terminal(code)
    assert shown == (make == "minigpt.console.progress_bar")  # tqdm alone shows nothing there


# ---------------------------------------------------------------------------------------------- command errors


def test_train_option_instead_of_override_names_the_key(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "cfg.yaml", "--batch_size", "4"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("usage: minigpt train")
    assert "unrecognized arguments: --batch_size 4 (config overrides are KEY=VALUE" in err
    assert "e.g. run.batch_size=4 run.eval_task.batch_size=4)" in err
    with pytest.raises(SystemExit):
        main(["train", "cfg.yaml", "--optimizer.lr=3e-5"])
    assert "e.g. run.batch_size=4)" in capsys.readouterr().err  # no key of that name: the general example


def test_other_commands_report_unknown_options_with_their_own_usage(capsys):
    with pytest.raises(SystemExit):
        main(["info", "x", "--bogus"])
    err = capsys.readouterr().err
    assert err.startswith("usage: minigpt info") and "unrecognized arguments: --bogus" in err


def test_an_unknown_template_is_one_line_without_pydantic_details(tiny_model_dir, capsys):
    assert main(["chat", str(tiny_model_dir), "--template", "foo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minigpt chat: error: invalid MiniGPTConfig: template: unknown template 'foo'; available:")
    assert "pydantic" not in err and len(err.splitlines()) == 1


def test_a_closed_pipe_ends_quietly(tiny_model_dir):
    read, write = os.pipe()
    os.close(read)  # the reader (`head`) has gone
    result = subprocess.run(
        [sys.executable, "-m", "minigpt.cli", "info", str(tiny_model_dir)],
        stdout=write,
        stderr=subprocess.PIPE,
        text=True,
        env=fresh_env(),
        timeout=120,
    )
    os.close(write)
    assert result.stderr == "" and result.returncode == 141


def test_quickstart_says_why_it_skips_the_chat(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from minigpt.tools import quickstart, quickstart_report

    item = SimpleNamespace(image="img/0.png", caption="a red circle")
    monkeypatch.setattr(
        quickstart,
        "_quickstart",
        lambda args, out, seconds: (None, {"model": "M", "image_root": str(tmp_path)}, [item]),
    )
    monkeypatch.setattr(quickstart_report, "print_summary", lambda summary: None)
    monkeypatch.setattr(sys, "stdin", open(os.devnull))  # not a terminal
    out = tmp_path / "qs"
    assert main(["quickstart", "--llm", "tiny", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "stdin is not a terminal: skipping the chat" in printed and "chat with it:  minigpt chat M" in printed
    assert main(["quickstart", "--llm", "tiny", "--out", str(out), "--device", "cpu", "--no-chat"]) == 0
    assert "stdin is not a terminal" not in capsys.readouterr().out  # asked for: nothing to explain


def test_web_names_our_share_flag_not_gradios(tiny_model_dir, monkeypatch, capsys):
    import socket

    import gradio

    from minigpt.cli import build_parser
    from minigpt.infer.web import run

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(gradio.Blocks, "block_thread", lambda self: None)  # return instead of serving forever
    try:
        assert run(build_parser().parse_args(["web", str(tiny_model_dir), "--port", str(port)])) == 0
    finally:
        gradio.close_all()
    out = capsys.readouterr().out
    assert f"minigpt web: running on http://127.0.0.1:{port}" in out
    # Gradio's own opening of an upload would repeat, as a Pillow warning, what the pixel limit refuses
    assert any(f[0] == "ignore" and f[2].__name__ == "DecompressionBombWarning" for f in warnings.filters)
    assert "run again with --share" in out and "share=True" not in out


@pytest.mark.parametrize("verbose", [False, True])
def test_chat_loads_its_model_without_progress_bars_unless_verbose(tiny_model_dir, verbose):
    result = subprocess.run(
        [sys.executable, "-m", "minigpt.cli", *(["-v"] if verbose else []), "chat", str(tiny_model_dir)],
        input="hello\n",
        capture_output=True,
        text=True,
        env=fresh_env(),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert ("Loading weights" in result.stderr) == verbose  # transformers' bar, set up when it is imported


def test_the_quickstart_log_keeps_info_lines_off_the_commands_console(tmp_path, capsys):
    """The CLI's console handler writes above the bars (a wrapped stream): still the console to quiet."""
    import logging

    from minigpt.console import LOG_FORMAT, _AboveBars
    from minigpt.tools.quickstart import detailed_log

    console = logging.StreamHandler(_AboveBars(sys.stderr))  # as setup_logging makes it
    console.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.root.addHandler(console)
    try:
        with detailed_log(tmp_path / "q.log"):
            logging.getLogger("minigpt.train.loop").info("training")
            logging.getLogger("minigpt.train.loop").warning("a problem")
    finally:
        logging.root.removeHandler(console)
    assert capsys.readouterr().err == "WARNING minigpt.train.loop: a problem\n"
    assert "INFO minigpt.train.loop: training" in (tmp_path / "q.log").read_text()
