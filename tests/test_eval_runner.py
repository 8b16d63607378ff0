"""Eval runner: metric paths with hand-computed values (stub model), bad input, resume, batched == single greedy
with the tiny real model, the CLI end to end, and the lmms-eval adapter's logic."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image as PILImage

from conftest import logged
from minigpt.eval.runner import IN_TRAINING, EvalFiles, EvalSettings, evaluate_task, predict, read_predictions, run_eval
from minigpt.eval.tasks import load_task
from minigpt.infer.generate import Generation, GenerationOptions

QUIET = EvalSettings(progress=False)
QUIET3 = EvalSettings(batch_size=3, progress=False)


class StubModel:
    """``generate`` answers from a table: the first key found in a prompt's text gives the answer."""

    def __init__(self, answers: dict[str, str] | None = None, fn=None, fail_on: str | None = None, image_fn=None):
        self.answers, self.fn, self.fail_on, self.image_fn = answers or {}, fn, fail_on, image_fn
        self.calls: list[list[str]] = []
        self.training = False

    def _answer(self, conv, imgs) -> str:
        text = conv.turns[-1].text
        if self.fail_on and self.fail_on in text:
            raise ValueError(f"cannot answer {self.fail_on!r}")
        if self.image_fn:
            return self.image_fn(imgs)
        if self.fn:
            return self.fn(text)
        return next((a for k, a in self.answers.items() if k in text), "")

    def generate(self, conversations, images, options=None):
        assert len(images) == len(conversations) and all(isinstance(i, list) for i in images)
        self.calls.append([c.turns[-1].text for c in conversations])
        return [Generation(self._answer(c, imgs), [], "stop", 0) for c, imgs in zip(conversations, images)]

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode


def write(path: Path, data) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(x) + "\n" for x in data))
    else:
        path.write_text(json.dumps(data))
    return path


@pytest.fixture()
def images(tmp_path) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, color in [("a.png", (200, 0, 0)), ("b.png", (0, 200, 0)), ("c.png", (0, 0, 200))]:
        PILImage.new("RGB", (24, 18), color).save(folder / name)
    return folder


# ---------------------------------------------------------------------------------------------- metric paths


def test_vqa_accuracy_hand_computed(tmp_path, images):
    answers = ["2"] * 3 + ["3"] * 7
    data = write(
        tmp_path / "vqa.jsonl",
        [
            {"id": "n", "image": "a.png", "question": "How many?", "answers": answers, "answer_type": "number"},
            {"id": "y", "image": "b.png", "question": "Is it red?", "answers": ["yes"] * 10, "answer_type": "yes/no"},
            {"id": "z", "image": "c.png", "question": "Is it blue?", "answers": ["yes"] * 10, "answer_type": "yes/no"},
        ],
    )
    td = load_task("vqa", data, images=images)
    model = StubModel({"How many": "Two", "red": "Yes.", "blue": "no"})
    out = tmp_path / "out"
    result = run_eval(
        model,
        "vqa",
        td,
        GenerationOptions(max_new_tokens=5),
        EvalSettings(batch_size=2, progress=False),
        files=EvalFiles(out / "p.jsonl", out / "m.json"),
        info={"model": "stub"},
    )
    # "Two" -> "2": 3 of 10 annotators; leave-one-out mean = (3 * 2/3 + 7 * 1) / 10 = 0.9
    assert result.metrics["accuracy"] == pytest.approx((0.9 + 1.0 + 0.0) / 3)
    assert result.metrics["per_answer_type"] == pytest.approx({"number": 0.9, "yes/no": 0.5})
    assert sorted(len(c) for c in model.calls) == [1, 2]  # batches of 2
    rows = [json.loads(x) for x in (out / "p.jsonl").read_text().splitlines()]
    row = next(r for r in rows if r["id"] == "n")
    assert row["prediction"] == "Two" and row["references"] == answers
    assert row["prompt"] == "<ImageHere> How many?\nAnswer the question using a single word or phrase."
    report = json.loads((out / "m.json").read_text())
    assert report["status"] == "done" and report["model"] == "stub" and report["task"] == "vqa"
    assert report["settings"]["generation"]["max_new_tokens"] == 5 and report["settings"]["batch_size"] == 2
    assert report["counts"] == {
        "records": 3,
        "predicted": 3,
        "resumed": 0,
        "generated": 3,
        "failed": 0,
        "empty_predictions": 0,
        "skipped_on_read": 0,
    }
    assert report["throughput"]["samples"] == 3 and report["throughput"]["samples_per_s"] > 0
    assert set(report["versions"]) >= {"minigpt", "torch", "transformers"}


def test_caption_metrics_hand_computed(tmp_path, images):
    data = write(
        tmp_path / "coco.json",
        {
            "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
            "annotations": [
                {"image_id": 1, "caption": "a cat on a mat"},
                {"image_id": 1, "caption": "the cat sits on the mat"},
                {"image_id": 2, "caption": "a dog sits on grass"},
            ],
        },
    )
    td = load_task("caption", data, images=images)
    # the stub tells the images apart by colour: a.png is red (image 1), b.png green (image 2)
    model = StubModel(image_fn=lambda imgs: "a cat on a mat" if imgs[0].getpixel((0, 0))[0] > 100 else "a dog runs")
    m = evaluate_task(model, "caption", td.records, GenerationOptions(), replace(IN_TRAINING, batch_size=4))
    # BLEU-1 over the corpus: 7 of 8 words match (clipped); hypothesis 8 words vs closest references 5 + 5 ->
    # brevity penalty exp(1 - 10/8)
    assert m["Bleu_1"] == pytest.approx(7 / 8 * math.exp(1 - 10 / 8), rel=1e-6)
    # ROUGE-L (beta 1.2): image 1 matches a reference exactly (1.0); image 2: LCS 2, P = 2/3, R = 2/5
    p, r = 2 / 3, 2 / 5
    assert m["ROUGE_L"] == pytest.approx((1 + (1 + 1.44) * p * r / (r + 1.44 * p)) / 2, rel=1e-6)
    assert m["CIDEr"] > 0 and "METEOR" not in m  # None (skipped) is dropped by the flattening
    assert m["n"] == 2 and m["failed"] == 0


def test_mcq_accuracy_and_circular_hand_computed(tmp_path, images):
    data = write(
        tmp_path / "mcq.jsonl",
        [
            {
                "id": "q1",
                "image": "a.png",
                "question": "Which pet?",
                "options": ["dog", "cat", "cow"],
                "answer": "B",
                "category": "animals",
            },
            {
                "id": "q2",
                "image": "b.png",
                "question": "Which color?",
                "options": ["red", "blue"],
                "answer": "A",
                "category": "colors",
            },
            {
                "id": "q3",
                "image": "c.png",
                "question": "Which shape?",
                "options": ["round", "square"],
                "answer": "B",
                "category": "colors",
            },
        ],
    )

    def answer(text: str) -> str:
        if "pet" in text:  # always finds "cat": right in every rotation
            letter = next(line[0] for line in text.splitlines() if line.endswith(". cat"))
            return f"The answer is ({letter})."
        if "color" in text:
            return "A"  # right only in rotation 0
        return "I am not sure"  # unparsable

    plain = run_eval(StubModel(fn=answer), "mcq", load_task("mcq", data, images=images), run=QUIET).metrics
    assert plain["accuracy"] == pytest.approx(2 / 3) and plain["unparsed"] == pytest.approx(1 / 3)
    assert plain["per_category"] == pytest.approx({"animals": 1.0, "colors": 0.5})
    assert "circular_accuracy" not in plain

    circ = run_eval(
        StubModel(fn=answer), "mcq", load_task("mcq", data, images=images, circular=True), run=QUIET3
    ).metrics
    assert circ["accuracy"] == pytest.approx(2 / 3)  # rotation 0 = the plain evaluation
    assert circ["circular_accuracy"] == pytest.approx(1 / 3)  # only q1 is right in all its rotations
    assert circ["unparsed"] == pytest.approx(2 / 7) and circ["n_circular"] == 3
    assert circ["per_category"] == pytest.approx({"animals": 1.0, "colors": 0.0})


def test_pope_metrics_hand_computed(tmp_path, images):
    labels = ["yes", "yes", "no", "no", "yes"]
    answers = ["Yes, there is.", "No.", "no", "Yes", "There is not a cat."]
    data = write(
        tmp_path / "coco_pope_popular.jsonl",
        [{"question_id": i, "image": "a.png", "text": f"Question {i}?", "label": lab} for i, lab in enumerate(labels)],
    )
    td = load_task("pope", data, images=images)
    m = run_eval(StubModel({f"Question {i}?": a for i, a in enumerate(answers)}), "pope", td, run=QUIET).metrics
    # parsed: yes no no yes no -> tp 1, fp 1, fn 2, tn 1
    expected = {"accuracy": 2 / 5, "precision": 1 / 2, "recall": 1 / 3, "f1": 0.4, "yes_ratio": 2 / 5}
    assert {k: m[k] for k in expected} == pytest.approx(expected)
    counts = {"tp": 1, "fp": 1, "tn": 1, "fn": 2}
    assert m["per_category"]["popular"] == pytest.approx({**expected, **counts, "n": 5})


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_named_counted_and_never_fatal(tmp_path, images):
    (images / "broken.png").write_bytes(b"not a png")
    data = write(
        tmp_path / "vqa.jsonl",
        [
            {"id": "ok", "image": "a.png", "question": "Fine?", "answers": ["yes"]},
            {"id": "gone", "image": "missing.png", "question": "Missing?", "answers": ["yes"]},
            {"id": "bad", "image": "broken.png", "question": "Broken?", "answers": ["yes"]},
            {"id": "boom", "image": "b.png", "question": "Explode?", "answers": ["yes"]},
            {"id": "mute", "image": "c.png", "question": "Silent?", "answers": ["yes"]},
            {"id": "malformed", "image": "a.png", "question": "No answers key"},
        ],
    )
    with logged() as caught:
        td = load_task("vqa", data, images=images)
        model = StubModel({"Fine": "yes", "Silent": "  "}, fail_on="Explode")
        result = run_eval(
            model,
            "vqa",
            td,
            run=EvalSettings(batch_size=4, progress=False),
            files=EvalFiles(tmp_path / "o" / "p.jsonl", tmp_path / "o" / "m.json"),
        )
    messages = "\n".join(str(w.message) for w in caught)
    assert "missing.png" in messages and "broken.png" in messages and "Explode" in messages
    assert "empty prediction" in messages and "vqa.jsonl:5" in messages and "vqa.jsonl:6" in messages
    report = result.report
    assert report["counts"] == {
        "records": 5,
        "predicted": 2,
        "resumed": 0,
        "generated": 2,
        "failed": 3,
        "empty_predictions": 1,
        "skipped_on_read": 1,
    }
    assert set(report["problems"]) == {"missing_image", "generation_failed", "empty_prediction", "malformed_record"}
    assert report["problems"]["missing_image"]["count"] == 2
    # single-answer questions are scored by exact match: "yes" right, the empty answer wrong
    assert {k: result.metrics[k] for k in ("scorer", "accuracy", "n", "n_exact_match")} == {
        "scorer": "lavis",
        "accuracy": pytest.approx(0.5),
        "n": 2,
        "n_exact_match": 2,
    }
    assert result.metrics["notes"] == ["2 question(s) with fewer than 10 answers scored by exact match"]
    first = model.calls[0]  # the failed batch is retried one record at a time
    assert len(first) > 1 and any("Explode" in t for t in first)
    assert model.calls[1 : len(first) + 1] == [[t] for t in first]


def test_a_run_whose_records_all_fail_stops_with_the_first_error(tmp_path):
    data = write(
        tmp_path / "pope.jsonl",
        [{"question_id": i, "image": "nowhere.png", "text": "Q?", "label": "yes"} for i in range(40)],
    )
    td = load_task("pope", data, images=tmp_path / "wrong")
    with logged(), pytest.raises(RuntimeError, match="all failed; first error: image file not"):
        run_eval(StubModel(), "pope", td, run=EvalSettings(batch_size=8, progress=False))


# ---------------------------------------------------------------------------------------------- resume


def test_interrupted_run_resumes_from_its_predictions(tmp_path, images):
    data = write(
        tmp_path / "pope.jsonl",
        [
            {"question_id": i, "image": "abc"[i % 3] + ".png", "text": f"Is there thing {i}?", "label": "yes"}
            for i in range(7)
        ],
    )
    td = load_task("pope", data, images=images)
    out = tmp_path / "out"
    kwargs = dict(files=EvalFiles(out / "p.jsonl", out / "m.json"), info={"model": "stub"})

    class Interrupting(StubModel):
        def generate(self, conversations, images, options=None):
            if self.calls:
                raise KeyboardInterrupt
            return super().generate(conversations, images, options)

    with pytest.raises(KeyboardInterrupt):
        run_eval(Interrupting(fn=lambda t: "yes"), "pope", td, run=QUIET3, **kwargs)
    assert len((out / "p.jsonl").read_text().splitlines()) == 3
    assert json.loads((out / "m.json").read_text())["status"] == "running"
    with open(out / "p.jsonl", "a") as f:
        f.write('{"id": "6", "predic')  # a line cut by the interruption

    model = StubModel(fn=lambda t: "no")
    with logged("bad prediction line"):
        result = run_eval(model, "pope", td, run=QUIET3, **kwargs)
    assert sum(len(c) for c in model.calls) == 4  # only the records not predicted yet
    counts = result.report["counts"]
    assert (counts["resumed"], counts["generated"], counts["predicted"]) == (3, 4, 7)
    assert result.metrics["accuracy"] == pytest.approx(3 / 7)  # 3 resumed "yes" are right, 4 new "no" wrong
    assert len(read_predictions(out / "p.jsonl")) == 7

    again = StubModel(fn=lambda t: "no")
    assert run_eval(again, "pope", td, run=QUIET3, **kwargs).report["counts"]["resumed"] == 7 and not again.calls
    with pytest.raises(ValueError, match="generation differ.*--no-resume"):
        run_eval(again, "pope", td, GenerationOptions(max_new_tokens=3), QUIET3, **kwargs)
    fresh = run_eval(again, "pope", td, GenerationOptions(max_new_tokens=3), replace(QUIET3, resume=False), **kwargs)
    assert fresh.report["counts"]["generated"] == 7


def test_evaluate_task_restores_training_mode_and_flattens(tmp_path, images):
    data = write(
        tmp_path / "pope_random.jsonl",
        [
            {"question_id": i, "image": "a.png", "text": f"Q{i}?", "label": "yes", "category": "random"}
            for i in range(4)
        ],
    )
    model = StubModel(fn=lambda t: "yes")
    model.training = True
    seen = []
    original = model.generate
    model.generate = lambda c, i, o=None: (seen.append(model.training), original(c, i, o))[1]  # type: ignore
    m = evaluate_task(
        model, "pope", load_task("pope", data, images=images), None, replace(IN_TRAINING, limit=3, batch_size=2)
    )
    assert seen == [False, False] and model.training is True
    assert m["accuracy"] == 1.0 and m["n"] == 3 and m["per_category/random/accuracy"] == 1.0


# ---------------------------------------------------------------------------------------------- real tiny model


def test_batched_equals_one_by_one_greedy(tiny_pair_factory, tmp_path, images):
    from minigpt.infer.engine import Engine

    engine = Engine(*tiny_pair_factory())
    data = write(
        tmp_path / "vqa.jsonl",
        [
            {"id": "1", "image": "a.png", "question": "Hi?", "answers": ["x"]},
            {
                "id": "2",
                "image": "b.png",
                "question": "A much longer question about what the picture shows?",
                "answers": ["x"],
            },
            {"id": "3", "images": ["c.png", "a.png"], "question": "Compare <image> and <image>?", "answers": ["x"]},
            {"id": "4", "image": "c.png", "question": "Medium length question here?", "answers": ["x"]},
        ],
    )
    records = load_task("vqa", data, images=images).records
    opts = GenerationOptions(max_new_tokens=6, min_new_tokens=6)
    batched = predict(engine, records, opts, batch_size=4)
    single = predict(engine, records, opts, batch_size=1)
    assert batched == single and len(batched) == 4 and any(batched.values())


def _eval_parser() -> argparse.ArgumentParser:
    from minigpt.eval import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    return parser


def test_cli_end_to_end_and_resume(tiny_model_factory, tmp_path, images, capsys):
    model_dir = tmp_path / "model"
    tiny_model_factory().save_pretrained(model_dir)
    data = write(
        tmp_path / "coco_pope_random.jsonl",
        [
            {"question_id": i, "image": "abc"[i] + ".png", "text": f"Is there a thing {i}?", "label": "yes"}
            for i in range(3)
        ],
    )
    out = tmp_path / "out"
    argv = [
        "eval",
        str(model_dir),
        "--task",
        "pope",
        "--data",
        str(data),
        "--images",
        str(images),
        "--batch-size",
        "2",
        "--max-new-tokens",
        "3",
        "--output",
        str(out),
        "--no-progress",
    ]
    args = _eval_parser().parse_args(argv)
    assert args.func(args) == 0  # the random tiny model may answer nothing: that is only warned about
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) >= {"accuracy", "precision", "recall", "f1", "yes_ratio"}
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["0", "1", "2"] and all(r["references"] == ["yes"] for r in rows)
    report = json.loads((out / "metrics.json").read_text())
    assert report["model"] == str(model_dir.resolve()) and report["data"] == [str(data.resolve())]
    assert report["settings"]["generation"]["max_new_tokens"] == 3 and report["counts"]["generated"] == 3
    assert report["throughput"]["device"] == "cpu"

    assert _eval_parser().parse_args(argv).func(_eval_parser().parse_args(argv)) == 0  # rerun: all resumed
    report = json.loads((out / "metrics.json").read_text())
    assert report["counts"]["resumed"] == 3 and report["counts"]["generated"] == 0


def test_cli_static_and_plain_decoding_give_the_same_predictions(tiny_model_factory, tmp_path, images):
    model_dir = tmp_path / "model"
    tiny_model_factory().save_pretrained(model_dir)
    data = write(
        tmp_path / "vqa.jsonl",
        [
            {"question_id": i, "image": "abc"[i] + ".png", "question": f"What is {i}?", "answers": ["red"]}
            for i in range(3)
        ],
    )
    predictions = {}
    for mode in ("plain", "static"):
        out = tmp_path / mode
        argv = [
            "eval",
            str(model_dir),
            "--task",
            "vqa",
            "--data",
            str(data),
            "--images",
            str(images),
            "--batch-size",
            "2",
            "--max-new-tokens",
            "6",
            "--output",
            str(out),
            "--no-progress",
            "--decoding",
            mode,
        ]
        args = _eval_parser().parse_args(argv)
        assert args.func(args) == 0
        rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
        predictions[mode] = {r["id"]: r["prediction"] for r in rows}
        assert json.loads((out / "metrics.json").read_text())["settings"]["decoding"] == mode
    assert predictions["static"] == predictions["plain"] and len(predictions["plain"]) == 3
    assert any(predictions["plain"].values())


# ---------------------------------------------------------------------------------------------- lmms-eval adapter


class _Req:
    def __init__(self, *args):
        self.args = args


def test_lmms_adapter_generate_until_batches_and_keeps_order(images):
    from minigpt.eval.lmms_adapter import MiniGPTLmmsCore, options_from_gen_kwargs

    model = StubModel(fn=lambda text: text.split("?")[0].split()[-1])
    core = MiniGPTLmmsCore(model, batch_size=2)
    core.task_dict = {
        "t": {
            "test": {
                0: {"img": images / "a.png"},
                1: {"img": images / "b.png"},
                2: {"img": None},
                3: {"img": images / "nope.png"},
            }
        }
    }

    def visual(doc):
        return [] if doc["img"] is None else [PILImage.open(doc["img"]) if doc["img"].exists() else doc["img"]]

    greedy = {"until": ["\n\n"], "max_new_tokens": 4, "temperature": 0}
    reqs = [
        _Req("<image>\nWhat is shown alpha?", greedy, visual, 0, "t", "test"),
        _Req("A longer question here about beta?", greedy, visual, 1, "t", "test"),
        _Req("Text only gamma?", {"max_new_tokens": 2}, visual, 2, "t", "test"),
        _Req("Missing delta?", greedy, visual, 3, "t", "test"),
    ]
    with pytest.warns(UserWarning, match="doc 3 failed"):
        answers = core.generate_until(reqs)
    assert answers == ["alpha", "beta", "gamma", ""]
    assert sorted(len(c) for c in model.calls) == [1, 2]
    assert model.calls[0][0].startswith("<ImageHere> A longer")  # visuals first when no placeholder; longest first
    assert "<ImageHere>\nWhat is shown" in model.calls[0][1]
    opts = options_from_gen_kwargs(greedy)
    assert (opts.do_sample, opts.max_new_tokens, opts.stop) == (False, 4, ["\n\n"])
    sampled = options_from_gen_kwargs({"do_sample": True, "temperature": 0.7, "top_p": None})
    assert sampled.do_sample and sampled.temperature == 0.7 and sampled.top_p == 1.0


def test_lmms_adapter_multi_round(images):
    from minigpt.eval.lmms_adapter import MiniGPTLmmsCore

    model = StubModel(fn=lambda text: f"r{text.count('again') + 1}")
    core = MiniGPTLmmsCore(model)
    core.task_dict = {"t": {"test": {0: {}}}}

    def doc_to_text(doc, previous_output, round_idx, previous_round_info):
        done = round_idx == 3
        return [], "again " * round_idx, done, list(previous_output), {"round": round_idx}

    out = core.generate_until_multi_round([_Req("first", {}, lambda d: [], doc_to_text, 0, "t", "test")])
    assert out == [["r1", "r2", "r3"]]


def test_lmms_adapter_loglikelihood_with_tiny_model(tiny_pair_factory, image_file):
    import torch

    from minigpt.data.tokenize import ModelBatch, collate
    from minigpt.eval.lmms_adapter import MiniGPTLmmsCore, continuation_logprobs, request_conversation
    from minigpt.infer.engine import Engine

    model, processor = tiny_pair_factory()
    engine = Engine(model, processor)
    img = PILImage.open(image_file).convert("RGB")
    conv = request_conversation("What is it?", 1)
    pixels = processor.image_processor(img).unsqueeze(0)
    ids: list[int] = []
    for _ in range(3):  # the greedy continuation, step by step from the model's own logits
        enc = processor.encode(conv, train=False)
        enc.extend(ids, supervised=False)
        batch = ModelBatch(collate([enc], processor.pad_token_id or 0), pixels)
        with torch.inference_mode():
            logits = model.llm(inputs_embeds=model.embed(batch), attention_mask=batch.text.attention_mask).logits
        ids.append(int(logits[0, -1].argmax()))
    other = ids[:2] + [(ids[2] + 1) % len(processor.tokenizer)]
    (lp_greedy, is_greedy), (lp_other, other_greedy) = continuation_logprobs(
        engine, [conv, request_conversation("What is it? A longer context.", 1)], [[img], [img]], [ids, other]
    )
    assert is_greedy and not other_greedy and lp_greedy < 0 and lp_other < 0
    ((lp_single, greedy_single),) = continuation_logprobs(engine, [conv], [[img]], [ids])
    assert lp_single == pytest.approx(lp_greedy, abs=1e-4) and greedy_single  # padding in a batch changes nothing
    ((lp_prefix, _),) = continuation_logprobs(engine, [conv], [[img]], [ids[:2]])
    assert lp_prefix > lp_single  # one more token can only lower the log-probability

    core = MiniGPTLmmsCore(engine)
    core.task_dict = {"t": {"val": {0: {}}}}
    ((lp, greedy),) = core.loglikelihood([_Req("What is it?", " cat", lambda d: [img], 0, "t", "val")])
    assert math.isfinite(lp) and lp < 0 and isinstance(greedy, bool)
