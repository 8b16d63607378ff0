"""Eval-set readers: every input format, prompts, circular expansion, malformed records; the task registry."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image as PILImage

from conftest import logged
from minigpt.eval.tasks import REGISTRY, TASKS, apply_limit, load_task
from minigpt.eval.tasks.base import coco_image_path
from minigpt.eval.tasks.caption import PROMPT as CAPTION_PROMPT
from minigpt.eval.tasks.mcq import PROMPT as MCQ_INSTRUCTION
from minigpt.eval.tasks.mcq import mcq_prompt_text, split_inline_options
from minigpt.eval.tasks.pope import PROMPT as POPE_INSTRUCTION
from minigpt.eval.tasks.vqa import PROMPT as VQA_INSTRUCTION


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in data))
    else:
        path.write_text(json.dumps(data))
    return path


def user_text(record) -> str:
    return record.prompt.turns[-1].text


def test_every_task_module_registers_itself():
    assert TASKS == ("caption", "mcq", "pope", "vqa")
    for name, task in REGISTRY.items():
        assert task.name == name and task.prompt and task.scorers  # readers, prompt and scoring in one module
        assert type(task).__module__ == f"minigpt.eval.tasks.{name}"


# ---------------------------------------------------------------------------------------------- caption


def test_coco_caption_annotations_group_references(tmp_path):
    data = write(
        tmp_path / "captions_val.json",
        {
            "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}, {"id": 3}],
            "annotations": [
                {"image_id": 1, "caption": "A cat."},
                {"image_id": 2, "caption": "A dog."},
                {"image_id": 1, "caption": "The cat sits."},
                {"image_id": 2},  # no caption: skipped
            ],
        },
    )
    with logged() as caught:
        td = load_task("caption", data, images=tmp_path / "imgs")
    messages = [str(w.message) for w in caught]
    assert any("annotations[3]" in m for m in messages)
    assert any("images[2]" in m and "no reference captions" in m for m in messages)  # image 3 has none
    assert [r.id for r in td.records] == ["1", "2"]
    assert td.records[0].references == ["A cat.", "The cat sits."]
    assert td.records[0].images == [str(tmp_path / "imgs" / "a.jpg")]
    assert user_text(td.records[0]) == "<ImageHere> " + CAPTION_PROMPT
    assert len(td.report.skipped) == 2


def test_blank_reference_captions_are_kept_as_cocoevalcap_keeps_them(tmp_path):
    data = write(
        tmp_path / "gt.json",
        {
            "images": [{"id": 1, "file_name": "a.jpg"}],
            "annotations": [
                {"image_id": 1, "caption": "A cat."},
                {"image_id": 1, "caption": " "},
                {"image_id": 1, "caption": ""},
            ],
        },
    )
    assert load_task("caption", data).records[0].references == ["A cat.", " ", ""]
    jl = write(tmp_path / "caps.jsonl", [{"id": "q", "image": "a.png", "captions": ["x", ""]}])
    assert load_task("caption", jl).records[0].references == ["x", ""]


def test_coco_images_without_file_name_use_coco_names(tmp_path):
    (tmp_path / "val2014").mkdir()
    img = tmp_path / "val2014" / "COCO_val2014_000000000042.jpg"
    img.write_bytes(b"x")
    data = write(tmp_path / "gt.json", {"images": [{"id": 42}], "annotations": [{"image_id": 42, "caption": "x"}]})
    assert load_task("caption", data).records[0].images == [str(img)]
    assert coco_image_path(tmp_path, 7, "val2014") == str(tmp_path / "COCO_val2014_000000000007.jpg")


def test_karpathy_split_file_filters_split(tmp_path):
    data = write(
        tmp_path / "dataset_coco.json",
        {
            "dataset": "coco",
            "images": [
                {
                    "filepath": "val2014",
                    "filename": "x.jpg",
                    "split": "test",
                    "cocoid": 11,
                    "sentences": [{"raw": "One."}, {"raw": "Two."}],
                },
                {
                    "filepath": "val2014",
                    "filename": "y.jpg",
                    "split": "val",
                    "cocoid": 12,
                    "sentences": [{"raw": "No."}],
                },
                {
                    "filepath": "train2014",
                    "filename": "z.jpg",
                    "split": "restval",
                    "cocoid": 13,
                    "sentences": [{"raw": "R."}],
                },
            ],
        },
    )
    td = load_task("caption", data)
    assert [(r.id, r.references) for r in td.records] == [("11", ["One.", "Two."])]
    assert td.records[0].images == [str(tmp_path / "val2014" / "x.jpg")]
    assert [r.id for r in load_task("caption", data, split="train").records] == ["13"]
    assert len(load_task("caption", data, split="all")) == 3


def test_lavis_karpathy_list_and_jsonl(tmp_path):
    data = write(
        tmp_path / "coco_karpathy_test.json",
        [
            {"image": "val2014/COCO_val2014_000000391895.jpg", "caption": ["A man.", "A bike."]},
            {"image": "val2014/COCO_val2014_000000000001.jpg", "caption": "Single."},
            {"image": "val2014/COCO_val2014_000000000001.jpg", "caption": "Second."},
        ],
    )
    td = load_task("caption", data, prompt="")
    assert [(r.id, r.references) for r in td.records] == [
        ("391895", ["A man.", "A bike."]),
        ("1", ["Single.", "Second."]),
    ]
    assert user_text(td.records[0]) == "<ImageHere>"  # prompt="" -> the image alone (stage-1 models)
    jl = write(tmp_path / "caps.jsonl", [{"id": "q", "image": "a.png", "captions": ["x", "y"]}, "{broken"])
    with logged("caps.jsonl:2"):
        td = load_task("caption", jl)
    assert td.records[0].id == "q" and td.records[0].references == ["x", "y"]


# ---------------------------------------------------------------------------------------------- vqa


def _vqav2(tmp_path):
    questions = write(
        tmp_path / "v2_Questions_val.json",
        {
            "data_subtype": "val2014",
            "questions": [
                {"image_id": 9, "question": "How many dogs?", "question_id": 90},
                {"image_id": 9, "question": "What color?", "question_id": 91},
            ],
        },
    )
    answers = [{"answer": a} for a in ["2"] * 3 + ["3"] * 7]
    annotations = write(
        tmp_path / "v2_Annotations_val.json",
        {
            "annotations": [
                {"question_id": 90, "image_id": 9, "answers": answers, "answer_type": "number"},
                {"question_id": 91, "image_id": 9, "answers": [{"answer": "red"}] * 10, "answer_type": "other"},
            ]
        },
    )
    return questions, annotations


def test_vqav2_questions_and_annotations(tmp_path):
    questions, annotations = _vqav2(tmp_path)
    for td in (load_task("vqa", [questions, annotations]), load_task("vqa", questions, annotations=annotations)):
        assert [r.id for r in td.records] == ["90", "91"]  # the annotation file does not prefix ids
        r = td.records[0]
        assert r.references == ["2"] * 3 + ["3"] * 7
        assert r.extra == {"answer_type": "number"}
        assert r.images == [str(tmp_path / "COCO_val2014_000000000009.jpg")]
        assert user_text(r) == f"<ImageHere> How many dogs?\n{VQA_INSTRUCTION}"
    no_answers = load_task("vqa", questions)  # test-dev: predictions only
    assert no_answers.records[0].references == []


def test_vqa_simple_jsonl_with_malformed_lines(tmp_path):
    data = write(
        tmp_path / "vqa.jsonl",
        [
            {"id": "a", "image": "1.png", "question": "What is it?", "answers": ["cat", "Cat"]},
            {"question_id": 7, "image": "2.png", "question": "Color?", "answers": [{"answer": "red"}]},
            {"id": "c", "image": "3.png", "question": "No answers?"},
            {"id": "d", "question": "No image", "answers": ["x"]},
            "not json",
            {"id": "a", "image": "1.png", "question": "dup", "answers": ["x"]},
        ],
    )
    with logged() as caught:
        td = load_task("vqa", data, images="/imgs")
    assert [r.id for r in td.records] == ["a", "7"]
    assert td.records[0].images == ["/imgs/1.png"]
    assert td.records[0].references == ["cat", "cat"]  # raw answers are VQA-normalised when read
    reasons = dict(td.report.skipped)
    assert "answers" in reasons[f"{data}:3"] and "image" in reasons[f"{data}:4"]
    assert "invalid JSON" in reasons[f"{data}:5"] and "duplicate id" in reasons[f"{data}:6"]
    assert len(caught) == 4


def test_placeholders_in_the_question_place_the_images(tmp_path):
    data = write(
        tmp_path / "q.jsonl",
        [
            {"id": "a", "images": ["1.png", "2.png"], "question": "Compare <image> and <image>?", "answers": ["x"]},
            {"id": "b", "image": "1.png", "question": "<image>\nWhat?", "answers": ["x"]},
            {"id": "c", "image": "1.png", "question": "<image> <image> too many?", "answers": ["x"]},
        ],
    )
    with logged("2 image placeholder"):
        td = load_task("vqa", data)
    assert [user_text(r) for r in td.records] == [
        f"Compare <ImageHere> and <ImageHere>?\n{VQA_INSTRUCTION}",
        f"<ImageHere>\nWhat?\n{VQA_INSTRUCTION}",
    ]


def test_file_without_any_valid_record_is_an_error(tmp_path):
    data = write(tmp_path / "bad.jsonl", [{"id": 1}])
    with logged(), pytest.raises(ValueError, match="no valid record"):
        load_task("pope", data)
    with pytest.raises(ValueError, match="unknown task"):
        load_task("nope", data)
    with pytest.raises(FileNotFoundError):
        load_task("vqa", tmp_path / "missing.json")


# ---------------------------------------------------------------------------------------------- mcq


def test_mcq_prompt_wording():
    text = mcq_prompt_text("What is it?", {"A": "cat", "B": "dog"}, hint="A pet.")
    assert text == f"A pet.\nWhat is it?\nA. cat\nB. dog\n{MCQ_INSTRUCTION}"


def test_mcq_json_options_and_answer_forms(tmp_path):
    data = write(
        tmp_path / "mcq.jsonl",
        [
            {"id": 1, "image": "a.png", "question": "Q1?", "options": ["cat", "dog"], "answer": "B", "category": "x"},
            {"id": 2, "image": "a.png", "question": "Q2?", "choices": ["red", "blue", "green"], "answer": 2},
            {
                "id": 3,
                "image": "a.png",
                "question": "Q3?",
                "options": {"A": "up", "B": "down"},
                "answer": "down",
                "hint": "Think.",
            },
            {"id": 4, "image": "a.png", "question": "Q4?", "options": ["x", "y"], "answer": "E"},
            {"id": 5, "image": "a.png", "question": "Q5?", "options": ["only"], "answer": "A"},
        ],
    )
    with logged():
        td = load_task("mcq", data)
    assert [(r.id, r.references) for r in td.records] == [("1", ["B"]), ("2", ["C"]), ("3", ["B"])]
    assert td.records[0].extra == {"options": {"A": "cat", "B": "dog"}, "rotation": 0, "category": "x"}
    assert user_text(td.records[2]) == f"<ImageHere> Think.\nQ3?\nA. up\nB. down\n{MCQ_INSTRUCTION}"
    assert len(td.report.skipped) == 2


def test_mmstar_inline_options_are_parsed():
    q = "Which animal is shown?\nOptions: A: a cat, B: a dog, C: a bird, D: 3.5 cm"
    assert split_inline_options(q) == (
        "Which animal is shown?",
        {"A": "a cat", "B": "a dog", "C": "a bird", "D": "3.5 cm"},
    )
    assert split_inline_options("What?\nA. one\nB. two") == ("What?", {"A": "one", "B": "two"})
    assert split_inline_options("A dog. What is it?") == ("A dog. What is it?", {})


def _b64_png(color) -> str:
    buf = io.BytesIO()
    PILImage.new("RGB", (4, 4), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_mmbench_tsv_base64_images_and_circular_copies(tmp_path):
    rows = [
        ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"],
        ["0", "Q0?", "nan", "cat", "dog", "", "", "A", "attr", _b64_png("red")],
        ["1", "Q1?", "Look.", "x", "y", "z", "nan", "C", "count", "0"],  # image of row 0
        ["1000000", "Q0?", "nan", "dog", "cat", "", "", "B", "attr", "0"],  # circular copy of 0
    ]
    data = tmp_path / "MMBench_DEV_EN.tsv"
    data.write_text("\n".join("\t".join(r) for r in rows) + "\n")
    td = load_task("mcq", data)  # vanilla: the copies are dropped
    assert [r.id for r in td.records] == ["0", "1"]
    assert td.records[0].extra["options"] == {"A": "cat", "B": "dog"}
    assert td.records[1].extra["options"] == {"A": "x", "B": "y", "C": "z"}
    assert user_text(td.records[1]).startswith("<ImageHere> Look.\nQ1?\nA. x")
    assert td.records[0].images == td.records[1].images and isinstance(td.records[0].images[0], bytes)
    circ = load_task("mcq", data, circular=True)  # copies present: kept as they are, not rotated again
    assert [(r.id, r.group, r.extra["rotation"]) for r in circ.records] == [
        ("0", "0", 0),
        ("1", "1", 0),
        ("1000000", "0", 1),
    ]


def test_circular_expansion_rotates_options_and_answers(tmp_path):
    data = write(
        tmp_path / "mcq.json",
        [{"id": "q", "image": "a.png", "question": "Q?", "options": ["cat", "dog", "cow"], "answer": "B"}],
    )
    td = load_task("mcq", data, circular=True)
    got = [(r.id, r.group, r.extra["options"], r.references[0]) for r in td.records]
    assert got == [
        ("q@0", "q", {"A": "cat", "B": "dog", "C": "cow"}, "B"),
        ("q@1", "q", {"A": "dog", "B": "cow", "C": "cat"}, "A"),
        ("q@2", "q", {"A": "cow", "B": "cat", "C": "dog"}, "C"),
    ]
    assert "A. dog\nB. cow\nC. cat" in user_text(td.records[1])
    assert len(apply_limit(td.records, 1)) == 3  # a limit counts questions, not rotations


def test_scienceqa_problems_json_image_subset(tmp_path):
    data = write(
        tmp_path / "problems.json",
        {
            "5": {
                "question": "Which is a mammal?",
                "choices": ["frog", "whale"],
                "answer": 1,
                "hint": "",
                "image": "image.png",
                "split": "test",
                "subject": "natural science",
            },
            "6": {
                "question": "Text only?",
                "choices": ["a", "b"],
                "answer": 0,
                "hint": "",
                "image": None,
                "split": "test",
                "subject": "x",
            },
            "7": {
                "question": "Train?",
                "choices": ["a", "b"],
                "answer": 0,
                "hint": "",
                "image": "image.png",
                "split": "train",
                "subject": "x",
            },
        },
    )
    td = load_task("mcq", data, images=tmp_path)
    assert [(r.id, r.references, r.extra["category"]) for r in td.records] == [("5", ["B"], "natural science")]
    assert td.records[0].images == [str(tmp_path / "test" / "5" / "image.png")]


# ---------------------------------------------------------------------------------------------- pope


def test_pope_files_category_from_name_and_prefixed_ids(tmp_path):
    rand = write(
        tmp_path / "coco_pope_random.json",
        [
            {"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"},
            {"question_id": 2, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "no"},
        ],
    )
    adv = write(
        tmp_path / "coco_pope_adversarial.jsonl",
        [
            {"question_id": 1, "image": "b.jpg", "text": "Is there a car?", "label": "NO"},
            {"question_id": 2, "image": "b.jpg", "text": "Is there a bus?", "label": "maybe"},
        ],
    )
    with logged("yes' or 'no"):
        td = load_task("pope", [rand, adv])
    assert [r.id for r in td.records] == ["coco_pope_random/1", "coco_pope_random/2", "coco_pope_adversarial/1"]
    assert [r.extra["category"] for r in td.records] == ["random", "random", "adversarial"]
    assert td.records[2].references == ["no"]
    assert user_text(td.records[0]) == f"<ImageHere> Is there a dog in the image?\n{POPE_INSTRUCTION}"
    single = load_task("pope", rand)
    assert [r.id for r in single.records] == ["1", "2"]


def test_apply_limit():
    from minigpt.eval.tasks import EvalRecord, build_prompt

    recs = [EvalRecord(str(i), build_prompt("q"), [], ["x"]) for i in range(5)]
    assert [r.id for r in apply_limit(recs, 2)] == ["0", "1"]
    assert len(apply_limit(recs, None)) == 5
