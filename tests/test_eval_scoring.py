"""Scoring: every number names its reference logic; a predictions file (minigpt, LLaVA, lmms-eval) scores the
same as the run that made it; per-record scores; the MMBench and VQA options; the CLI without a model."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
from PIL import Image as PILImage

from conftest import logged
from minigpt.eval import cli
from minigpt.eval.predictions import PredictionMatchError
from minigpt.eval.runner import EvalFiles, EvalSettings, run_eval, score, score_predictions
from minigpt.eval.tasks import load_task
from minigpt.infer.generate import Generation


class Stub:
    """``generate`` answers ``fn(prompt text)``."""

    training = False

    def __init__(self, fn):
        self.fn = fn

    def generate(self, conversations, images, options=None):
        return [Generation(self.fn(c.turns[-1].text), [], "stop", 0) for c in conversations]


def write(path: Path, data) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(x) + "\n" for x in data))
    else:
        path.write_text(json.dumps(data))
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture()
def images(tmp_path) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        PILImage.new("RGB", (8, 8), (90, 20, 20)).save(folder / name)
    return folder


def _mmbench(tmp_path: Path, n: int) -> Path:
    """``n`` two-option questions (right answer: "dog"), options swapped in rotation 1."""
    return write(
        tmp_path / "mmb.jsonl",
        [
            {
                "id": f"q{i}",
                "image": "a.png",
                "question": f"Which animal {i}?",
                "options": ["dog", "cat"],
                "answer": "A",
                "category": "animals",
            }
            for i in range(n)
        ],
    )


def _answer_letter_of_dog(text: str) -> str:
    return next(line[0] for line in text.splitlines() if line.endswith(". dog"))


# ---------------------------------------------------------------------------------------------- MMBench rules


def test_circular_question_with_a_missing_rotation_is_a_miss(tmp_path, images):
    td = load_task("mcq", _mmbench(tmp_path, 4), images=images, circular=True)
    predictions = {r.id: _answer_letter_of_dog(r.prompt_text) for r in td.records if r.id != "q3@1"}
    s = score("mcq", td.records, predictions)
    # 3 questions right in both rotations, q3 lacks one: 3/4 (dropping it would give 3/3)
    assert s.totals["circular_accuracy"] == pytest.approx(3 / 4) and s.totals["n_circular"] == 4
    assert s.totals["incomplete_questions"] == 1 and s.totals["missing"] == 1
    assert s.totals["scorer"] == "vlmevalkit" and "VLMEvalKit" in s.totals["reference"]
    assert s.totals["per_category"] == {"animals": pytest.approx(3 / 4)}
    assert [row["hit"] for row in s.rows] == [1, 1, 1, 0]
    assert s.rows[3] == {
        "group": "q3",
        "hit": 0,
        "rotations": [
            {"id": "q3@0", "answer": "A", "choice": "A", "prediction": "A"},
            {"id": "q3@1", "answer": "B", "choice": None, "prediction": None},
        ],
    }


def test_mmbench_extraction_vlmevalkit_by_default_ours_as_an_option(tmp_path, images):
    td = load_task(
        "mcq",
        write(
            tmp_path / "m.jsonl",
            [{"id": "q", "image": "a.png", "question": "Which animal?", "options": ["cat", "dog"], "answer": "B"}],
        ),
        images=images,
    )
    predictions = {"q": "A dog."}
    vlm = score("mcq", td.records, predictions)
    ours = score("mcq", td.records, predictions, scorer="minigpt")
    assert vlm.totals["accuracy"] == 0.0 and vlm.rows[0]["rotations"][0]["choice"] == "A"  # VLMEvalKit: "A"
    assert ours.totals["accuracy"] == 1.0 and ours.rows[0]["rotations"][0]["choice"] == "B"  # ours: an article
    assert ours.totals["scorer"] == "minigpt" and "own answer extraction" in ours.totals["reference"]
    with pytest.raises(
        ValueError,
        match="unknown scorer 'gpt' for task mcq; choose from vlmevalkit, vlmevalkit2025, vlmevalkit2026, minigpt",
    ):
        score("mcq", td.records, predictions, scorer="gpt")


# ---------------------------------------------------------------------------------------------- files


def _vqa(tmp_path: Path) -> Path:
    return write(
        tmp_path / "vqa.jsonl",
        [
            {"id": "1", "image": "a.png", "question": "How many?", "answers": ["two"] * 3 + ["three"] * 7},
            {"id": "2", "image": "b.png", "question": "Color?", "answers": ["red"] * 10},
        ],
    )


def test_predictions_file_scores_like_the_run_that_made_it(tmp_path, images):
    td = load_task("mcq", _mmbench(tmp_path, 3), images=images, circular=True)
    model = Stub(lambda text: "A" if "animal 2" in text else _answer_letter_of_dog(text))
    out = tmp_path / "run"
    run = run_eval(
        model,
        "mcq",
        td,
        run=EvalSettings(progress=False),
        files=EvalFiles(out / "predictions.jsonl", out / "metrics.json"),
    )
    scored = score_predictions("mcq", td, out / "predictions.jsonl", metrics_path=tmp_path / "s" / "metrics.json")
    assert scored.metrics == run.metrics and run.metrics["circular_accuracy"] == pytest.approx(2 / 3)
    assert lines(tmp_path / "s" / "scores.jsonl") == lines(out / "scores.jsonl") == run.rows
    report = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert report["metrics"]["reference"].startswith("VLMEvalKit") and report["counts"]["predicted"] == 6


def test_llava_answers_and_lmms_eval_logs(tmp_path, images):
    td = load_task("vqa", _vqa(tmp_path), images=images)
    answers = {"1": "3", "2": "Red."}
    expected = score("vqa", td.records, answers).totals
    llava = write(
        tmp_path / "answers.jsonl",
        [
            {"question_id": int(k), "prompt": "...", "text": v, "answer_id": "x", "model_id": "m"}
            for k, v in answers.items()
        ],
    )
    lmms = write(
        tmp_path / "vqa_samples.jsonl",
        [
            {
                "doc_id": i,
                "doc": {"question_id": k, "question": "?"},
                "target": "",
                "resps": [[v]],
                "filtered_resps": [v],
            }
            for i, (k, v) in enumerate(answers.items())
        ],
    )
    logs = write(
        tmp_path / "vqa_old.json",
        {
            "logs": [
                {"doc_id": 0, "doc": {"question_id": 1}, "resps": [["3"]], "filtered_resps": ["3"]},
                {"doc_id": 1, "doc": {"question_id": 2}, "resps": [["Red."]], "filtered_resps": ["Red."]},
                {"doc_id": 2, "doc": {"question_id": 99}, "resps": [["x"]], "filtered_resps": ["x"]},
            ]
        },
    )
    for path in (llava, lmms):
        result = score_predictions("vqa", td, path)
        assert result.metrics == expected and result.predictions == answers
    with pytest.raises(PredictionMatchError, match=re.escape(f"{logs}[2]: no record has id 99")):
        score_predictions("vqa", td, logs)  # an entry matching nothing: the file is not this eval set's
    assert expected["accuracy"] == pytest.approx((1.0 + 1.0) / 2)  # "3": 7 of 10 annotators; "Red." -> "red"


def test_llava_mmbench_rounds_and_coco_file_names(tmp_path, images):
    td = load_task("mcq", _mmbench(tmp_path, 1), images=images, circular=True)
    llava = write(
        tmp_path / "mmb.jsonl",
        [{"question_id": "q0", "round_id": 0, "text": "A"}, {"question_id": "q0", "round_id": 1, "text": "B"}],
    )
    assert score_predictions("mcq", td, llava).metrics["circular_accuracy"] == 1.0
    caps = write(
        tmp_path / "caps.jsonl",
        [
            {"id": 391895, "image": "a.png", "captions": ["a red square", "red"]},
            {"id": 7, "image": "b.png", "captions": ["a dark square", ""]},
        ],
    )
    td = load_task("caption", caps, images=images)
    lmms = write(
        tmp_path / "coco_samples.jsonl",
        [
            {"doc_id": 0, "doc": {"question_id": "COCO_val2014_000000391895.jpg"}, "filtered_resps": ["a red square"]},
            {"doc_id": 1, "doc": {"question_id": "COCO_val2014_000000000007.jpg"}, "filtered_resps": ["a square"]},
        ],
    )
    result = score_predictions("caption", td, lmms, meteor=False)
    assert result.predictions == {"391895": "a red square", "7": "a square"}
    assert [r["id"] for r in result.rows] == ["391895", "7"] and result.rows[0]["Bleu_1"] == pytest.approx(1.0)


def test_bad_prediction_lines_are_named(tmp_path, images):
    td = load_task("vqa", _vqa(tmp_path), images=images)
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "1", "prediction": "3"}\n{broken\n{"foo": 1}\n')
    with logged() as caught:
        result = score_predictions("vqa", td, path)
    assert len(caught) == 2 and result.predictions == {"1": "3"}
    assert result.problems.counts == {"bad_prediction_line": 2}
    assert result.problems.examples["bad_prediction_line"][0].startswith(f"{path}:2: not a JSON object")
    path.write_text('{"id": "1", "prediction": "3"}\n{"id": "1", "prediction": "2"}\n')
    with pytest.raises(PredictionMatchError, match=re.escape(f"{path}:2: a second prediction for record '1'")):
        score_predictions("vqa", td, path)
    with pytest.raises(PredictionMatchError, match="none.jsonl:1: no record has id x"):
        score_predictions("vqa", td, write(tmp_path / "none.jsonl", [{"id": "x", "prediction": "y"}]))


# ---------------------------------------------------------------------------------------------- VQA and captions


def test_vqa_scorer_option_and_per_question_rows(tmp_path, images):
    td = load_task("vqa", _vqa(tmp_path), images=images)
    assert td.records[0].references == ["2"] * 3 + ["3"] * 7  # JSONL answers are normalised when read
    predictions = {"1": "Two", "2": "red" + "." * 40}
    lavis = score("vqa", td.records, predictions)
    current = score("vqa", td.records, predictions, scorer="vqaeval2021")
    assert lavis.rows == [
        {"id": "1", "accuracy": pytest.approx(0.9), "prediction": "Two"},
        {"id": "2", "accuracy": 0.0, "prediction": "red" + "." * 40},
    ]  # 8 periods are left
    assert [r["accuracy"] for r in current.rows] == pytest.approx([0.9, 0.0])
    assert lavis.totals["scorer"] == "lavis" and "LAVIS" in lavis.totals["reference"]
    assert current.totals["reference"] == "GT-Vision-Lab/VQA vqaEval.py, 2021 revision"
    for r, refs in zip(td.records, (["two"] * 10, ["red"] * 10)):
        r.references = refs  # as a VQAv2 annotation file may give them
    same = {"1": "two", "2": "red"}
    assert score("vqa", td.records, same).totals["accuracy"] == pytest.approx(0.5)  # LAVIS: "2" != "two"
    assert score("vqa", td.records, same, scorer="vqaeval2021").totals["accuracy"] == pytest.approx(1.0)


def test_caption_without_java_says_so(tmp_path, images, monkeypatch):
    from minigpt.eval import metrics as M

    monkeypatch.setattr(M, "java_available", lambda: False)
    td = load_task(
        "caption",
        write(
            tmp_path / "c.jsonl",
            [
                {"id": "a", "image": "a.png", "captions": ["a red square", "a square"]},
                {"id": "b", "image": "b.png", "captions": ["a dark square", " "]},
            ],
        ),
        images=images,
    )
    s = score("caption", td.records, {"a": "a red square", "b": "a square"})
    assert s.totals["METEOR"] is None and s.totals["reference"].endswith("[fallback tokenizer, no METEOR]")
    assert "METEOR missing" in s.totals["notes"][0] and "fallback tokenizer" in s.totals["notes"][0]
    assert [r["id"] for r in s.rows] == ["a", "b"] and all(r["METEOR"] is None for r in s.rows)


# ---------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    return parser


def test_cli_scores_a_predictions_file_without_a_model(tmp_path, images, capsys):
    data = _vqa(tmp_path)
    preds = write(tmp_path / "answers.jsonl", [{"question_id": 1, "text": "3"}, {"question_id": 2, "text": "blue"}])
    out = tmp_path / "out"
    args = _parser().parse_args(
        [
            "eval",
            "--predictions",
            str(preds),
            "--task",
            "vqa",
            "--data",
            str(data),
            "--scorer",
            "vqaeval2021",
            "--output",
            str(out),
        ]
    )
    assert args.func(args) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert printed["scorer"] == "vqaeval2021" and printed["accuracy"] == pytest.approx(0.5)
    assert "scored with vqaeval2021: GT-Vision-Lab/VQA vqaEval.py, 2021 revision" in captured.err
    report = json.loads((out / "metrics.json").read_text())
    assert report["metrics"] == printed and report["predictions"] == str(preds.resolve())
    assert [(r["id"], r["accuracy"]) for r in lines(out / "scores.jsonl")] == [("1", 1.0), ("2", 0.0)]
    for argv in (
        ["eval", "--task", "vqa", "--data", str(data)],
        ["eval", "m", "--predictions", str(preds), "--task", "vqa", "--data", str(data)],
    ):
        args = _parser().parse_args(argv)
        with pytest.raises(ValueError, match="give a MODEL directory to evaluate, or --predictions FILE"):
            args.func(args)
    args = _parser().parse_args(
        ["eval", "--predictions", str(preds), "--task", "vqa", "--data", str(data), "--scorer", "coco"]
    )
    with pytest.raises(ValueError, match="unknown scorer 'coco' for task vqa; choose from lavis, vqaeval2021"):
        args.func(args)
