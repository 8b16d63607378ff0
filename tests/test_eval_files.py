"""Evaluation files as people have them: POPE's official files, per-split answer files, lmms-eval logs of every
version (their exact layouts), matched one to one or refused."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from minigpt.cli import main
from minigpt.eval.predictions import PredictionMatchError
from minigpt.eval.runner import score_predictions
from minigpt.eval.tasks import load_task

#: The first lines of RUCAIBox/POPE output/coco/coco_pope_*.json: JSON Lines under a .json name.
POPE_LINES = {
    "random": [
        ("COCO_val2014_000000310196.jpg", "Is there a snowboard in the image?", "yes"),
        ("COCO_val2014_000000310196.jpg", "Is there a bench in the image?", "no"),
        ("COCO_val2014_000000210789.jpg", "Is there a car in the image?", "yes"),
        ("COCO_val2014_000000210789.jpg", "Is there a giraffe in the image?", "no"),
    ],
    "popular": [
        ("COCO_val2014_000000310196.jpg", "Is there a snowboard in the image?", "yes"),
        ("COCO_val2014_000000310196.jpg", "Is there a dining table in the image?", "no"),
        ("COCO_val2014_000000210789.jpg", "Is there a car in the image?", "yes"),
        ("COCO_val2014_000000210789.jpg", "Is there a chair in the image?", "no"),
    ],
    "adversarial": [
        ("COCO_val2014_000000310196.jpg", "Is there a snowboard in the image?", "yes"),
        ("COCO_val2014_000000310196.jpg", "Is there a skis in the image?", "no"),
        ("COCO_val2014_000000210789.jpg", "Is there a car in the image?", "yes"),
        ("COCO_val2014_000000210789.jpg", "Is there a truck in the image?", "no"),
    ],
}


def _pope_files(folder: Path) -> list[Path]:
    """The three official files, written as POPE writes them (json.dumps per line, ids 1.. in each file)."""
    paths = []
    for cat, rows in POPE_LINES.items():
        path = folder / f"coco_pope_{cat}.json"
        path.write_text(
            "".join(
                json.dumps({"question_id": i, "image": img, "text": q, "label": lab}) + "\n"
                for i, (img, q, lab) in enumerate(rows, 1)
            )
        )
        paths.append(path)
    return paths


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pope_official_files_are_json_lines_with_a_json_name(tmp_path):
    random = _pope_files(tmp_path)[0]
    assert random.read_text().splitlines()[0] == (
        '{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", '
        '"text": "Is there a snowboard in the image?", "label": "yes"}'
    )
    td = load_task("pope", random)
    assert [r.id for r in td.records] == ["1", "2", "3", "4"] and not td.report.skipped
    assert td.records[0].references == ["yes"] and td.records[0].extra == {"category": "random"}
    assert td.records[1].prompt_text.endswith("Is there a bench in the image?\nAnswer yes or no.")
    # a JSON document is still one, indented or on one line (every task reads through the same detection)
    listed = tmp_path / "vqa.json"
    rows = [{"id": 1, "image": "a.jpg", "question": "What?", "answers": ["red"]}]
    for text in (json.dumps(rows, indent=2), json.dumps(rows), json.dumps(rows[0]) + "\n" + json.dumps(rows[0])):
        listed.write_text(text)
        assert len(load_task("vqa", listed).records) == 1  # the JSONL form: the repeated id is skipped


# answers per category: the 4 questions of each file, in order
ANSWERS = {
    "random": ["Yes, there is a snowboard.", "No.", "Yes", "No, there is not."],  # all right
    "popular": ["Yes", "Yes, there is.", "There is a car.", "no"],  # tp 2, fp 1, tn 1
    "adversarial": ["No.", "Yes", "There is no car.", "There is not."],  # tp 0, fn 2, fp 1, tn 1
}


def _llava_answers(folder: Path) -> list[Path]:
    """LLaVA model_vqa_loader answer files, one per split (question ids as in the split's file)."""
    return [
        _jsonl(
            folder / f"answers_{cat}.jsonl",
            [
                {"question_id": i, "prompt": "", "text": a, "answer_id": "x", "model_id": "m", "metadata": {}}
                for i, a in enumerate(answers, 1)
            ],
        )
        for cat, answers in ANSWERS.items()
    ]


def test_three_pope_splits_scored_in_one_call_per_category_and_mean(tmp_path, capsys):
    data = _pope_files(tmp_path)
    td = load_task("pope", data)
    assert [r.id for r in td.records[:2]] == ["coco_pope_random/1", "coco_pope_random/2"]
    m = score_predictions("pope", td, _llava_answers(tmp_path)).metrics
    per = m["per_category"]
    assert per["random"]["accuracy"] == 1.0 and per["random"]["f1"] == 1.0
    assert (per["popular"]["tp"], per["popular"]["fp"], per["popular"]["tn"], per["popular"]["fn"]) == (2, 1, 1, 0)
    assert per["popular"]["precision"] == pytest.approx(2 / 3) and per["popular"]["accuracy"] == 0.75
    assert per["adversarial"]["f1"] == 0.0 and per["adversarial"]["accuracy"] == 0.25
    assert m["mean"]["accuracy"] == pytest.approx((1 + 0.75 + 0.25) / 3)
    assert m["mean"]["f1"] == pytest.approx((1 + 0.8 + 0) / 3)
    assert set(m["per_file"]) == {"coco_pope_random", "coco_pope_popular", "coco_pope_adversarial"}

    # minigpt's own predictions of a several-file run carry the prefixed ids
    own = _jsonl(
        tmp_path / "predictions.jsonl",
        [{"id": r.id, "prediction": "yes"} for r in td.records],
    )
    assert score_predictions("pope", td, own).metrics["yes_ratio"] == 1.0

    # one file of answers with ids 1..4: which split? refused, naming the entries
    with pytest.raises(PredictionMatchError, match=r"answers_random.jsonl:1: id 1 fits 3 records"):
        score_predictions("pope", td, _llava_answers(tmp_path)[0])
    with pytest.raises(ValueError, match="2 predictions files for 3 data files"):
        score_predictions("pope", td, _llava_answers(tmp_path)[:2])

    # the CLI prints what LLaVA's eval_pope.py prints for each category, then the mean
    out = tmp_path / "out"
    argv = ["eval", "--task", "pope", "--data", *map(str, data), "-o", str(out), "--predictions"]
    assert main([*argv, *map(str, _llava_answers(tmp_path))]) == 0
    err = capsys.readouterr().err
    assert (
        "Category: popular, # samples: 4\nTP\tFP\tTN\tFN\t\n2\t1\t1\t0\nAccuracy: 0.75\n"
        "Precision: 0.6666666666666666\nRecall: 1.0\nF1 score: 0.8\nYes ratio: 0.75\n"
        "0.800, 0.750, 0.667, 1.000, 0.750\n===================================="
    ) in err
    assert "Mean over 3: accuracy 0.667, precision 0.556, recall 0.667, f1 0.600" in err
    assert json.loads((out / "metrics.json").read_text())["metrics"]["mean"]["f1"] == pytest.approx(0.6)


def _lmms07_pope(doc_id: int, question_id: str, answer: str, target: str) -> dict:
    """A line of ``{date}_samples_pope.jsonl`` as lmms-eval 0.7 writes it (evaluation_tracker.save_results_samples:
    no ``doc``, no ``arguments``; ``filtered_resps`` flattened to the string; ``resps`` dropped when equal)."""
    metric = {"question_id": question_id, "score": float(answer.lower() == target), "prediction": answer.lower()}
    metric["ground_truth"] = target
    return {
        "doc_id": doc_id,
        "target": target,
        "filtered_resps": answer,
        "token_counts": [None],
        "doc_hash": "9f2c1e",
        "input_media": ["COCO_val2014_000000310196.jpg"],
        "input": "Is there a snowboard in the image?\nAnswer the question using a single word or phrase.",
        **{k: metric for k in ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio")},
    }


def test_lmms_eval_07_logs_match_by_the_logged_question_id_not_doc_id(tmp_path):
    td = load_task("pope", _pope_files(tmp_path)[0])  # ids 1..4, doc_id 0..3
    answers = ["Yes", "No", "No", "No"]
    log = _jsonl(
        tmp_path / "20250101_samples_pope.jsonl",
        [_lmms07_pope(i, str(i + 1), a, POPE_LINES["random"][i][2]) for i, a in enumerate(answers)],
    )
    result = score_predictions("pope", td, log)
    assert result.predictions == {"1": "Yes", "2": "No", "3": "No", "4": "No"}  # not shifted by one
    assert result.metrics["accuracy"] == 0.75 and result.metrics["fn"] == 1

    # a log whose task logs no ids: doc_id is the row of the data file, checked against the target
    rows = [{"doc_id": i, "target": lab, "filtered_resps": "yes", "exact_match": 1.0} for i, (_, _, lab) in
            enumerate(POPE_LINES["random"])]  # fmt: skip
    assert score_predictions("pope", td, _jsonl(tmp_path / "rows.jsonl", rows)).predictions["1"] == "yes"
    rows[0]["doc_id"], rows[1]["doc_id"] = 1, 0  # targets no longer agree: refused, not scored
    with pytest.raises(PredictionMatchError, match=r"rows.jsonl:1: no record has doc_id 1 \(a row\) and target 'yes'"):
        score_predictions("pope", td, _jsonl(tmp_path / "rows.jsonl", rows))

    # the three splits with a per-split question_id and no category: ambiguous, refused by entry
    three = load_task("pope", _pope_files(tmp_path))
    with pytest.raises(PredictionMatchError, match=r"samples_pope.jsonl:1: id 1 fits 3 records"):
        score_predictions("pope", three, log)


def test_lmms_eval_03_docs_match_within_their_split(tmp_path):
    """v0.3 logs keep the document: lmms-lab/POPE's carries a per-split ``question_id`` and its ``category``."""
    three = load_task("pope", _pope_files(tmp_path))
    entries = []
    for n, (cat, answers) in enumerate(ANSWERS.items()):
        for i, a in enumerate(answers):
            doc = {"id": str(n * 4 + i), "question_id": str(i + 1), "question": "?", "answer": "", "category": cat}
            doc["answer"] = POPE_LINES[cat][i][2]
            entries.append(
                {
                    "doc_id": n * 4 + i,
                    "doc": doc,
                    "target": doc["answer"],
                    "arguments": {"0": {"max_new_tokens": 128}},
                    "resps": [[a]],
                    "filtered_resps": [a],
                    "doc_hash": "x",
                    "prompt_hash": "y",
                    "target_hash": "z",
                    "input": "?",
                }
            )
    result = score_predictions("pope", three, _jsonl(tmp_path / "v03.jsonl", entries))
    assert result.predictions["coco_pope_adversarial/4"] == "There is not."
    assert result.metrics["per_category"]["adversarial"]["accuracy"] == 0.25
    entries[0]["doc"]["category"] = "popular"  # the popular file's question 1 is taken: a second prediction for it
    with pytest.raises(PredictionMatchError, match=re.escape("a second prediction for record 'coco_pope_popular/1'")):
        score_predictions("pope", three, _jsonl(tmp_path / "v03.jsonl", entries))


def test_lmms_eval_07_mmbench_log_matches_by_index(tmp_path):
    """mmbench_process_results logs ``gpt_eval_score`` / ``submission`` objects with the row's ``index``."""
    tsv = tmp_path / "mmbench_dev_en.tsv"
    header = "index\tquestion\thint\tA\tB\tanswer\tcategory\timage_path\n"
    keys = {5: "B", 7: "A", 9: "B"}
    tsv.write_text(header + "".join(f"{i}\tq{i}?\tnan\tcat\tdog\t{k}\tscene\ta.png\n" for i, k in keys.items()))
    td = load_task("mcq", tsv)

    def line(doc_id: int, index: int, answer: str, target: str) -> dict:
        logged = {"index": index, "question": "?", "answer": target, "prediction": answer, "hint": "nan"}
        logged.update({"source": "x", "split": "dev", "category": "scene", "L2-category": "y", "A": "cat"})
        return {"doc_id": doc_id, "target": target, "filtered_resps": answer, "doc_hash": "h", "input": "?",
                "gpt_eval_score": logged, "submission": logged}  # fmt: skip

    log = _jsonl(tmp_path / "samples_mmbench_en_dev.jsonl", [line(0, 5, "B", "B"), line(1, 7, "A", "A")])
    result = score_predictions("mcq", td, log)
    assert result.predictions == {"5": "B", "7": "A"} and result.metrics["missing"] == 1
    log = _jsonl(tmp_path / "samples_mmbench_en_dev.jsonl", [line(0, 5, "B", "A")])  # a wrong dataset version
    with pytest.raises(PredictionMatchError, match="no record has id 5 and category 'scene' and target 'A'"):
        score_predictions("mcq", td, log)


#: can_infer of VLMEvalKit's vlmeval/utils/matching_util.py, run at commits c026693a (rules "2024"), c3371551
#: ("2025") and e8e78f05 ("2026", HEAD), options A cat, B dog, C "a red bird", D "the sky"; None: False.
VLMEVALKIT_CASES = [
    ("A dog.", "A", "A", "A"),
    ("The correct answer is **B**. Here's why: it barks and it is a dog", "B", None, "B"),
    ("B is right because the picture shows a dog sitting on the grass", "B", None, None),
    ("I think the answer is d", None, None, "D"),
    ("The answer is Cat", "A", "A", "C"),
    ("Option B, the dog", "B", "B", "B"),
    ("It is a dog, not a cat", None, None, None),
    ("The image shows a dog playing in a park with a lot of other animals around it today", "B", None, None),
    ("answer is C or D", None, None, "C"),
    ("Cannot determine the answer", "Z", "Z", "Z"),
    ("B and some words after here", "B", None, None),
    ("Correct answer is b.", None, None, "B"),
    ("the sky is blue and the dog", None, None, None),
    ("a red bird", "C", "C", "C"),
]


@pytest.mark.parametrize(("answer", "v2024", "v2025", "v2026"), VLMEVALKIT_CASES)
def test_vlmevalkit_matcher_versions_equal_the_real_can_infer(answer, v2024, v2025, v2026):
    from minigpt.eval.metrics import CHOICE_EXTRACTORS

    options = {"A": "cat", "B": "dog", "C": "a red bird", "D": "the sky"}
    got = [CHOICE_EXTRACTORS[s][0](answer, options) for s in ("vlmevalkit", "vlmevalkit2025", "vlmevalkit2026")]
    assert got == [v2024, v2025, v2026]


def test_mcq_metrics_name_the_vlmevalkit_version(tmp_path):
    data = _jsonl(tmp_path / "q.jsonl", [{"id": 1, "image": "a.png", "question": "?", "options": ["cat", "dog"],
                                         "answer": "B"}])  # fmt: skip
    td = load_task("mcq", data)
    preds = _jsonl(tmp_path / "p.jsonl", [{"id": "1", "prediction": "B is right because the picture shows a dog"}])
    old = score_predictions("mcq", td, preds).metrics
    new = score_predictions("mcq", td, preds, scorer="vlmevalkit2025").metrics
    assert old["accuracy"] == 1.0 and new["accuracy"] == 0.0
    assert "c6bdffd3 (2024-03-19) up to c3371551 (2025-08-04)" in old["reference"]
    assert new["scorer"] == "vlmevalkit2025" and "last 4 words" in new["reference"]


#: LLaVA's EvalAIAnswerProcessor()(text) (llava/eval/m4c_evaluator.py at haotian-liu/LLaVA HEAD), run on each.
EVALAI_CASES = [
    ("red,white", "redwhite"),
    ("Red, White", "red white"),
    ("What's that?", "what 's that"),
    ("the dog's bone", "dog 's bone"),
    ("2,000", "2000"),
    ("Two", "2"),
    ("None", "0"),
    ("1.5", "1.5"),
    ("It's a cat.", "it 's cat"),
    ("t-shirt", "t shirt"),
    ("dont", "don't"),
    ('He said "hi"', "he said hi"),
    ("3 , 4", "3 4"),
    ("a/b", "b"),
    ("up?down", "updown"),
]


@pytest.mark.parametrize(("text", "processed"), EVALAI_CASES)
def test_evalai_answer_processor_equals_llavas(text, processed):
    from minigpt.eval.metrics import evalai_answer

    assert evalai_answer(text) == processed


def test_vqa_llava_style_scorer(tmp_path):
    rows = [
        {"id": 1, "image": "a.png", "question": "Colors?", "answers": ["redwhite"] * 4 + ["red and white"] * 6},
        {"id": 2, "image": "a.png", "question": "What?", "answers": ["2000"] * 10},
    ]
    td = load_task("vqa", _jsonl(tmp_path / "q.jsonl", rows))
    preds = _jsonl(tmp_path / "p.jsonl", [{"id": "1", "prediction": "red,white"}, {"id": "2", "prediction": "2,000"}])
    plain = score_predictions("vqa", td, preds).metrics
    llava = score_predictions("vqa", td, preds, scorer="lavis+evalai").metrics
    assert plain["accuracy"] == pytest.approx(0.5)  # "red,white" -> "red white" (no annotator said that)
    assert llava["accuracy"] == pytest.approx(1.0) and "EvalAIAnswerProcessor" in llava["reference"]
    assert score_predictions("vqa", td, preds, scorer="vqaeval2021+evalai").metrics["accuracy"] == pytest.approx(1.0)


#: Captions with times, emoji, dashes and @/# words, on which the fallback tokenizer was made to equal PTB.
HARD_REFS = {
    1: ["A clock tower shows 10:30 on a sunny day.", "The tower clock reads 10:30.", "A tall clock tower."],
    2: ["A dog 🐶 sleeps on the couch.", "A brown dog asleep on a sofa.", "Dog napping on the couch 😴"],
    3: ["A man — wearing a hat — walks his dog.", "A man in a hat walking a dog.", "Man and dog – out for a walk."],
    4: [
        "Two kids play soccer at the park - a sunny day.",
        "Kids playing soccer in a park.",
        "Two children with a ball.",
    ],
    5: ["A woman takes a #selfie with her phone.", "A woman taking a selfie.", "Selfie time: a woman and her phone."],
    6: ["A sign says @home on the wall.", "A wall sign reading @home.", "A sign on a white wall."],
    7: ["The train leaves at 7:45 pm from platform 2.", "A train at a platform.", "A train waiting at 7:45."],
    8: ["A cat 😺 on a window sill at 6:00.", "A cat sitting on a window sill.", "Cat by the window at dawn."],
    9: ["A pizza -- with cheese and olives -- on a plate.", "A cheese pizza on a plate.", "Pizza with olives."],
    10: ["People at the #1 burger shop in town.", "People eating burgers.", "A busy burger shop."],
    11: ["A tweet by @nasa on a screen.", "A computer screen showing a tweet.", "A screen with @nasa's post."],
    12: ["A birthday cake 🎂 with candles.", "A cake with lit candles.", "Birthday cake – five candles."],
}
HARD_PREDS = {
    1: "A clock tower showing 10:30.",
    2: "A dog 🐶 sleeping on a couch.",
    3: "A man — with a hat — walking a dog.",
    4: "Kids play soccer at the park - sunny.",
    5: "A woman taking a #selfie.",
    6: "A sign that says @home.",
    7: "A train at the platform at 7:45.",
    8: "A cat 😺 sitting on a window sill.",
    9: "A pizza -- cheese and olives -- on a plate.",
    10: "People at the #1 burger shop.",
    11: "A screen with a tweet by @nasa.",
    12: "A birthday cake 🎂 with candles.",
}
#: Written after the fallback was fixed, never tuned on: the README's figure of the fallback's error.
HELD_REFS = {
    1: ["A poster for a C# workshop from 3:15-4:00.", "A workshop poster on a board.", "A poster with times."],
    2: ["An email address tom@home.com on a screen.", "A screen showing an email address.", "Text on a monitor."],
    3: ["A runner crosses the line at 2:05:33 — a new record!", "A runner finishing a race.", "Race finish line."],
    4: ["Fans hold a #GoTeam banner 🙌 at the stadium.", "Fans with a banner.", "A crowd in a stadium."],
    5: ["A laptop sticker says @dev_life.", "A laptop with stickers.", "Stickers on a laptop lid."],
    6: ["A menu: breakfast 7:00–11:00.", "A restaurant menu board.", "A menu with opening hours."],
    7: ["Kids 👧👦 eating ice cream 🍦 in the sun.", "Two kids with ice cream.", "Children eating ice cream."],
    8: ["A street sign — Main St. — at noon.", "A street sign on a pole.", "Main Street sign."],
    9: ["A phone showing #1 on the charts – a song.", "A phone screen with music.", "A music app."],
    10: ["A bus timetable: 8:15, 8:45, 9:15.", "A bus timetable.", "Bus times on a sign."],
    11: ["A baker @ work at 5am.", "A baker making bread.", "A man baking."],
    12: ["A dog-walker with 5 dogs — busy!", "A person walking five dogs.", "Dogs on leashes."],
}
HELD_PREDS = {
    1: "A poster for a C# workshop at 3:15-4:00.",
    2: "A screen showing tom@home.com.",
    3: "A runner at the finish line — 2:05:33.",
    4: "Fans holding a #GoTeam banner 🙌.",
    5: "A laptop with a @dev_life sticker.",
    6: "A menu with breakfast 7:00–11:00.",
    7: "Kids 👧👦 eating ice cream 🍦.",
    8: "A sign for Main St. — at noon.",
    9: "A phone with a #1 song – on the charts.",
    10: "A bus timetable: 8:15, 8:45.",
    11: "A baker @ work at 5am.",
    12: "A dog-walker with 5 dogs — busy.",
}


def test_fallback_tokenizer_on_times_emoji_dashes_and_tags():
    from minigpt.eval.metrics import simple_tokenize

    assert simple_tokenize("A dog 🐶 at 10:30 — #selfie by @nasa's #1 fan – yes") == (
        "a dog at 10:30 #selfie by @nasa 's # 1 fan yes"
    )


def _fallback_error(refs, preds, monkeypatch) -> dict[str, float]:
    from minigpt.eval import metrics as M

    java = M.caption_metrics(preds, refs, meteor=False)
    monkeypatch.setattr(M, "java_available", lambda: False)
    fallback = M.caption_metrics(preds, refs, meteor=False)
    monkeypatch.undo()
    return {k: round(fallback[k] - java[k], 3) for k in ("Bleu_4", "CIDEr")}


@pytest.mark.skipif(shutil.which("java") is None, reason="java not on PATH: PTBTokenizer is the reference")
def test_fallback_error_measured_against_ptb(monkeypatch):
    assert _fallback_error(HARD_REFS, HARD_PREDS, monkeypatch) == {"Bleu_4": 0.0, "CIDEr": 0.0}
    # the README's figure: e-mail addresses, "C#" and time ranges still split differently
    assert _fallback_error(HELD_REFS, HELD_PREDS, monkeypatch) == {"Bleu_4": 0.006, "CIDEr": 0.023}


def test_caption_eval_refuses_without_java_unless_asked(tmp_path, monkeypatch, capsys):
    from minigpt.eval import metrics as M

    data = _jsonl(tmp_path / "caps.jsonl", [{"id": 1, "image": "a.png", "captions": ["A red square."]}])
    preds = _jsonl(tmp_path / "p.jsonl", [{"id": "1", "prediction": "A red square."}])
    argv = ["eval", "--task", "caption", "--data", str(data), "--predictions", str(preds), "-o", str(tmp_path / "o")]
    monkeypatch.setattr(M, "java_available", lambda: False)
    assert main(argv) != 0
    assert "caption scores need java" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main([*argv, "--allow-fallback-tokenizer"]) == 0
    notes = json.loads((tmp_path / "o" / "metrics.json").read_text())["metrics"]["notes"]
    assert "fallback tokenizer" in notes[0] and "0.006" in notes[0]


@pytest.mark.parametrize(("uid", "installs"), [("0", True), ("1000", False)])
def test_install_script_installs_java_where_missing(tmp_path, uid, installs):
    """scripts/install.sh's java step, run with stand-ins for id and apt-get on a PATH without java."""
    script = (Path(__file__).parents[1] / "scripts" / "install.sh").read_text()
    block = script[script.index("if ! command -v java") : script.index('python -c "import minigpt')]
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    (bin_ / "apt-get").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/apt.log\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    bash = shutil.which("bash")
    run = subprocess.run([bash, "-c", block], env={"PATH": str(bin_)}, capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    log = (tmp_path / "apt.log").read_text() if (tmp_path / "apt.log").exists() else ""
    assert ("install -y -qq --no-install-recommends default-jre-headless" in log) == installs
    assert installs or "java not found" in run.stderr


def _readme_eval_block() -> list[str]:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("## Evaluation\n") :]
    block = section[section.index("```bash\n") + 8 : section.index("```\n", section.index("```bash\n") + 8)]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_evaluation_commands_run(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """Every line of the README's evaluation block, on tiny files named as there, with the tiny model as MODEL."""
    import base64
    import io

    from PIL import Image as PILImage

    monkeypatch.chdir(tmp_path)
    (tmp_path / "coco" / "val2014").mkdir(parents=True)
    name = "COCO_val2014_000000391895.jpg"
    PILImage.new("RGB", (16, 12), (200, 30, 30)).save(tmp_path / "coco" / "val2014" / name)
    Path("v2_Questions_val.json").write_text(
        json.dumps({"data_subtype": "val2014", "questions": [{"question_id": 1, "image_id": 391895, "question": "?"}]})
    )
    answers = [{"answer": "red"}] * 10
    Path("v2_Annotations_val.json").write_text(
        json.dumps({"annotations": [{"question_id": 1, "image_id": 391895, "answers": answers}]})
    )
    sentences = [{"raw": "A red square."}, {"raw": "Red."}]
    karpathy = {"filepath": "val2014", "filename": name, "split": "test", "cocoid": 391895, "sentences": sentences}
    Path("dataset_coco.json").write_text(json.dumps({"images": [karpathy]}))
    buf = io.BytesIO()
    PILImage.new("RGB", (16, 12), (30, 30, 200)).save(buf, "PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    Path("MMBench_DEV_EN.tsv").write_text(
        f"index\tquestion\thint\tA\tB\tanswer\tcategory\timage\n0\tColour?\tnan\tred\tblue\tB\tcolor\t{b64}\n"
    )
    for cat in ("random", "popular", "adversarial"):
        row = {"question_id": 1, "image": name, "text": "Is there a square in the image?", "label": "yes"}
        Path(f"coco_pope_{cat}.json").write_text(json.dumps(row) + "\n" + json.dumps({**row, "question_id": 2}) + "\n")
    Path("answers.jsonl").write_text(json.dumps({"question_id": 1, "text": "red,white"}) + "\n")
    lines = _readme_eval_block()
    assert len(lines) == 5 and all(line.startswith("minigpt eval ") for line in lines)
    for i, line in enumerate(lines):
        if "--task caption" in line and shutil.which("java") is None:
            continue  # refused without java (tested above)
        argv = [str(tiny_model_dir) if a == "MODEL" else a for a in line.split()[1:]]
        argv += ["-o", f"out{i}", "--no-progress", "--max-new-tokens", "2"] if "MODEL" in line else ["-o", f"out{i}"]
        assert main(argv) == 0, line
        assert json.loads(Path(f"out{i}", "metrics.json").read_text())["status"] == "done"
    pope = json.loads(Path("out3", "metrics.json").read_text())["metrics"]
    assert set(pope["per_category"]) == {"random", "popular", "adversarial"} and "mean" in pope
