"""Benchmark metrics against hand-computed values (minigpt.eval.metrics)."""

from __future__ import annotations

import logging
import math

import pytest

from minigpt.eval import metrics as M

needs_java = pytest.mark.skipif(not M.java_available(), reason="java not on PATH")


@pytest.fixture
def no_java(monkeypatch):
    """Force the pure-Python path (simple_tokenize, no METEOR) even where java exists."""
    monkeypatch.setattr(M, "java_available", lambda: False)


# ----------------------------------------------------------------------------- captioning

# Three images, each predicted caption identical to its (two identical) references.
EXACT_PRED = {
    1: "A man riding a wave on a surfboard.",
    2: "Two dogs play in the snow.",
    3: "A red bus parked on the street.",
}
EXACT_REFS = {k: [v, v] for k, v in EXACT_PRED.items()}


def test_bleu_hand_computed(no_java):
    # hyp "the cat sat on the mat" vs ref "the cat is on the mat" (equal lengths, BP = 1)
    # unigrams 5/6 (the x2, cat, on, mat), bigrams 3/5, trigrams 1/4, 4-grams 0/3
    out = M.caption_metrics({"a": "The cat sat on the mat."}, {"a": ["the cat is on the mat"]})
    assert out["Bleu_1"] == pytest.approx(5 / 6, abs=1e-6)
    assert out["Bleu_2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 5), abs=1e-6)
    assert out["Bleu_3"] == pytest.approx(0.5, abs=1e-6)
    assert out["Bleu_4"] < 1e-3
    # brevity penalty: 2-word hypothesis vs 6-word reference -> exp(1 - 6/2)
    short = M.caption_metrics({"a": "the cat"}, {"a": ["the cat is on the mat"]})
    assert short["Bleu_1"] == pytest.approx(math.exp(-2), abs=1e-6)


def test_rouge_l_hand_computed(no_java):
    # LCS("cat on the mat", "the cat is on the mat") = 4 -> P = 4/4, R = 4/6, beta = 1.2
    p, r, b2 = 1.0, 4 / 6, 1.2**2
    out = M.caption_metrics({0: "cat on the mat"}, {0: ["the cat is on the mat", "a dog"]})
    assert out["ROUGE_L"] == pytest.approx((1 + b2) * p * r / (r + b2 * p), abs=1e-9)
    assert out["ROUGE_L"] == pytest.approx(4.88 / 6.32, abs=1e-9)


def test_exact_captions_fallback(no_java, caplog):
    with caplog.at_level(logging.INFO, logger=M.__name__):
        out = M.caption_metrics(EXACT_PRED, EXACT_REFS)
    assert out["METEOR"] is None and "METEOR skipped" in caplog.text
    for n in range(1, 5):
        assert out[f"Bleu_{n}"] == pytest.approx(1.0, abs=1e-6)
    assert out["ROUGE_L"] == pytest.approx(1.0)
    # CIDEr-D: cosine 1 for every n-gram order, no length penalty -> 10 x mean(1) = 10
    assert out["CIDEr"] == pytest.approx(10.0, abs=1e-6)
    worse = M.caption_metrics({**EXACT_PRED, 1: "A dog sleeping on a couch."}, EXACT_REFS)
    assert worse["CIDEr"] < out["CIDEr"] and worse["Bleu_4"] < 1.0


def test_cider_uses_references_of_evaluated_set(no_java):
    # one image: every n-gram has df = N = 1 -> idf log(N / df) = 0 -> CIDEr 0 (toolkit behaviour)
    assert M.caption_metrics({1: EXACT_PRED[1]}, {1: EXACT_REFS[1]})["CIDEr"] == 0.0


def test_caption_errors(no_java):
    with pytest.raises(KeyError):
        M.caption_metrics({1: "a cat"}, {2: ["a cat"]})
    with pytest.raises(RuntimeError):
        M.caption_metrics({1: "a cat"}, {1: ["a cat"]}, meteor=True)


def test_simple_tokenize():
    assert M.simple_tokenize("A man (wearing a hat) isn't here!") == "a man -lrb- wearing a hat -rrb- is n't here"
    assert M.simple_tokenize('The dog\'s 3.5-inch "toy", e.g. 1,000 pieces...') == (
        "the dog 's 3.5-inch toy e.g. 1,000 pieces"
    )


SENTENCES = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs' toys are on the (wooden) floor!",
    "It's a 3.5-inch screen, isn't it?",
    "Mrs. Brown's car: well-known, and/or RED; e.g. 1,000 pieces...",
    'He said "hello" -- can\'t stop.',
    "",
]


@needs_java
def test_fallback_tokenizer_matches_ptb():
    ptb = M.tokenize_captions({0: SENTENCES}, use_java=True)[0]
    assert [M.simple_tokenize(s) for s in SENTENCES] == ptb


@needs_java
def test_java_and_fallback_give_same_scores(monkeypatch):
    preds = {1: "A man rides a wave on his surfboard!", 2: "Two dogs, playing in snow.", 3: "A bus isn't parked."}
    refs = {
        1: ["A man riding a wave on top of a surfboard.", "Surfer (in red) on a wave."],
        2: ["Two dogs play in the snow.", "Dogs' day in the snow"],
        3: ["A red bus parked on the street."],
    }
    java = M.caption_metrics(preds, refs, meteor=False)
    monkeypatch.setattr(M, "java_available", lambda: False)
    assert M.caption_metrics(preds, refs) == pytest.approx(java)


@needs_java
def test_meteor_with_java():
    out = M.caption_metrics(EXACT_PRED, EXACT_REFS)
    assert out["METEOR"] is not None and 0.9 < out["METEOR"] <= 1.0
    assert out["Bleu_4"] == pytest.approx(1.0, abs=1e-6) and out["CIDEr"] == pytest.approx(10.0, abs=1e-6)


def test_per_image_scores_and_blank_references(no_java):
    refs = {
        1: ["A man riding a wave.", "A surfer on a wave."],
        2: ["Two dogs in the snow.", "Dogs playing."],
        3: ["A red bus on the street.", "A bus."],
    }
    preds = {1: "A man riding a wave.", 2: "Two dogs playing in snow.", 3: "A bus parked on a street."}
    totals, per = M.caption_scores(preds, refs)
    assert list(per) == [1, 2, 3] and set(per[1]) == set(M.CAPTION_METRICS)
    assert totals["CIDEr"] == pytest.approx(sum(p["CIDEr"] for p in per.values()) / 3)  # CIDEr-D: mean per image
    assert totals["ROUGE_L"] == pytest.approx(sum(p["ROUGE_L"] for p in per.values()) / 3)
    assert per[1]["METEOR"] is None and per[1]["Bleu_1"] == pytest.approx(1.0)
    # a blank reference is kept (as COCOEvalCap keeps it): it joins CIDEr's mean over references
    blank = M.caption_scores(preds, {**refs, 1: [*refs[1], ""]})[1]
    assert blank[1]["CIDEr"] == pytest.approx(per[1]["CIDEr"] * 2 / 3)


@needs_java
def test_equal_to_reference_cocoevalcap(monkeypatch):
    """The reference scorer itself (pycocoevalcap COCOEvalCap, PTBTokenizer and METEOR through Java) on captions
    with blank references and the constructs where the fallback tokenizer differs; SPICE stubbed out (it would
    download Stanford models)."""
    from pycocoevalcap import eval as coco_eval
    from pycocotools.coco import COCO

    class NoSpice:
        def method(self):
            return "SPICE"

        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

    monkeypatch.setattr(coco_eval, "Spice", NoSpice)
    refs = {
        1: ["A man riding a wave at 10:30.", "", "Surfer -- in red -- on a wave."],
        2: ["Two dogs play in the snow!", "Dogs' day in the snow", " "],
        3: ["A red bus parked on the street.", "@home: a #bus."],
        4: ["A cat on a mat.", "A cat sleeping."],
    }
    preds = {
        1: "A man rides a wave on his surfboard at 10:30",
        2: "Two dogs, playing in snow.",
        3: "A bus isn't parked @home.",
        4: "A cat on a mat.",
    }
    gt = COCO()
    gt.dataset = {
        "images": [{"id": k} for k in refs],
        "annotations": [
            {"image_id": k, "id": 10 * k + i, "caption": c} for k, cs in refs.items() for i, c in enumerate(cs)
        ],
    }
    gt.createIndex()
    ref = coco_eval.COCOEvalCap(gt, gt.loadRes([{"image_id": k, "caption": v} for k, v in preds.items()]))
    ref.evaluate()
    totals, per = M.caption_scores(preds, refs)
    for m in M.CAPTION_METRICS:
        assert totals[m] == pytest.approx(ref.eval[m], abs=1e-9), m
        assert [per[k][m] for k in refs] == pytest.approx([ref.imgToEval[k][m] for k in refs], abs=1e-9), m


# ----------------------------------------------------------------------------- VQA


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("Two", "2"),
        ("the dog.", "dog"),
        ("isnt", "isn't"),
        ("1,000", "1000"),  # digit-comma-digit: punctuation deleted, not replaced by a space
        ("red,blue", "red blue"),  # otherwise a mark not touching a space becomes a space
        ("yes, it is", "yes it is"),
        ("3.5", "3.5"),  # period before a digit kept
        ("A Dog!", "dog"),
        ("none", "0"),
        ("ten dollars", "10 dollars"),
        (" the\tcat\n", "cat"),
        ("black and white", "black and white"),
        ("oclock", "o'clock"),
    ],
)
def test_vqa_normalisation(raw, norm):
    assert M.normalize_vqa_answer(raw) == norm


@pytest.mark.parametrize(("matches", "acc"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_ten_answers(matches, acc):
    answers = ["2"] * matches + ["3"] * (10 - matches)
    assert M.vqa_accuracy("Two", answers) == pytest.approx(acc)


def test_vqa_accuracy_lavis_quirks():
    # fewer than 10 answers: same leave-one-out formula -> (2 * 1/3 + 1 * 2/3) / 3
    assert M.vqa_accuracy("cat", ["cat", "cat", "dog"]) == pytest.approx(4 / 9)
    # ground-truth answers get punctuation processing only when they disagree ...
    assert M.vqa_accuracy("dog", ["dog."] * 3 + ["cat"] * 7) == pytest.approx(0.9)
    # ... never the digit/article step, and they are not stripped
    assert M.vqa_accuracy("2", ["two"] * 10) == 0.0
    assert M.vqa_accuracy("yes", [" yes"] * 4 + ["no"] * 6) == 0.0
    # periodStrip.sub("", text, re.UNICODE): re.UNICODE (32) is the count, so at most 32 periods go
    assert M.vqa_process_punctuation("yes" + "." * 40) == "yes" + "." * 8
    assert M.vqa_accuracy("yes" + "." * 32, ["yes"] * 10) == 1.0
    assert M.vqa_accuracy("yes" + "." * 33, ["yes"] * 10) == 0.0


@pytest.mark.parametrize(
    ("prediction", "answers", "lavis", "vqaeval2021"),
    [
        ("Yes.", ["yes"] * 10, 1.0, 0.0),  # identical answers: 2021 compares the raw (stripped) prediction
        ("two", ["two"] * 10, 0.0, 1.0),  # LAVIS normalises the prediction to "2" but not the answers
        ("2", ["two"] * 3 + ["three"] * 7, 0.0, 0.9),  # disagreeing answers: 2021 normalises them fully
        ("yes", [" yes"] * 4 + ["no"] * 6, 0.0, 1.0),  # 2021 strips the answers
        (" yes\n", ["yes"] * 10, 1.0, 1.0),
    ],
)
def test_vqa_accuracy_lavis_and_2021_logic(prediction, answers, lavis, vqaeval2021):
    assert M.vqa_accuracy(prediction, answers, "lavis") == pytest.approx(lavis)
    assert M.vqa_accuracy(prediction, answers, "vqaeval2021") == pytest.approx(vqaeval2021)
    with pytest.raises(ValueError, match="unknown VQA logic 'x'; choose from lavis, vqaeval2021"):
        M.vqa_accuracy(prediction, answers, "x")


# ----------------------------------------------------------------------------- multiple choice

OPTS = ["red", "blue", "dark red", "green"]


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("b", "B"),
        ("The answer is B", "B"),
        ("Answer: b", "B"),
        ("The correct answer is (A) red.", "A"),
        ("C. dark red", "C"),
        ("I think D", "D"),
        ("A dog is on the left, so the answer is C.", "C"),
        ("blue", "B"),
        ("It is Dark Red.", "C"),  # longest option text wins over "red"
        ("The color is red", "A"),
        ("A or B", None),
        ("B and C are both possible", None),
        ("The answer is a dog", None),
        ("E", None),  # not an option letter
        ("I am not sure", None),
        ("", None),
    ],
)
def test_extract_choice(text, letter):
    assert M.extract_choice(text, OPTS) == letter


def test_extract_choice_dict_options():
    assert M.extract_choice("a dog", {"A": "cat", "B": "dog"}) == "B"


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("A dog.", "A"),  # the leading "A" is taken as the letter (ours: an article)
        ("A horse is shown.", "A"),
        ("B", "B"),
        ("(C)", "C"),
        ("The answer is B.", "B"),
        ("A or B", None),  # two letters, and no option text
        ("I think it is a dog", "B"),  # no letter: the one option text found in the answer
        ("cat and dog", None),
        ("Cannot determine the answer", "Z"),  # refusals and a standalone Z -> Z (scored as a miss)
        ("Z", "Z"),
        ("Failed to obtain answer via API: dog", "B"),  # no letter inferred, the text match still runs
        ("", None),
    ],
)
def test_vlmevalkit_exact_matcher(text, letter):
    assert M.vlmevalkit_choice(text, {"A": "cat", "B": "dog", "C": "horse", "D": "bird"}) == letter


def test_circular_eval():
    rots = M.circular_options(["w", "x", "y", "z"])
    assert rots == [["w", "x", "y", "z"], ["x", "y", "z", "w"], ["y", "z", "w", "x"], ["z", "w", "x", "y"]]
    # the right option ("y", letter C) moves to C, B, A, D
    assert [M.circular_answer("C", 4, i) for i in range(4)] == ["C", "B", "A", "D"]
    assert all(rots[i][M.LETTERS.index(M.circular_answer("C", 4, i))] == "y" for i in range(4))
    assert M.circular_options({"A": "yes", "B": "no"}) == [["yes", "no"], ["no", "yes"]]


# ----------------------------------------------------------------------------- POPE


@pytest.mark.parametrize(
    ("text", "ans"),
    [
        ("Yes, there is a dog in the image.", "yes"),
        ("No, there is no dog.", "no"),
        ("There is not a dog in the image.", "no"),
        ("Yes. There is no cat, only a dog.", "yes"),  # only the first sentence counts
        ("no", "no"),
        ("I see a dog", "yes"),  # anything without no/not counts as yes (POPE eval)
    ],
)
def test_parse_yes_no(text, ans):
    assert M.parse_yes_no(text) == ans


def test_pope_confusion_matrix():
    # TP=3, FN=1, FP=2, TN=4 (10 samples, positive = yes)
    labels = ["yes"] * 4 + ["no"] * 6
    preds = ["Yes"] * 3 + ["No"] + ["Yes, there is."] * 2 + ["No."] * 3 + ["There is not."]
    out = M.pope_metrics(preds, labels)
    p, r = 3 / 5, 3 / 4
    expected = {"accuracy": 0.7, "precision": p, "recall": r, "f1": 2 * p * r / (p + r), "yes_ratio": 0.5}
    assert out == pytest.approx({**expected, "tp": 3, "fp": 2, "tn": 4, "fn": 1})
    assert M.pope_metrics(["no", "no"], [True, False]) == pytest.approx(
        {
            "accuracy": 0.5,
            "precision": 0.0,
            "recall": 0.0,
            "f1": 0.0,
            "yes_ratio": 0.0,
            "tp": 0,
            "fp": 0,
            "tn": 1,
            "fn": 1,
        }
    )
