"""`minigpt data import`: class folders, captions and question/answer files -> LLaVA JSON + an eval split, with every
picture checked on the way in."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from minigpt.cli import main
from minigpt.data.formats import read_dataset
from minigpt.data.importer import SHORT_ANSWER, ImportOptions, import_folder, label_of
from minigpt.eval.tasks import load_task

COLOURS = {"red_apple": (220, 30, 30), "green-pear": (30, 170, 60), "blue": (40, 70, 220)}


def _picture(path: Path, colour: tuple[int, int, int], size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path


def _class_folder(root: Path, per_class: int = 10) -> Path:
    for name, colour in COLOURS.items():
        for i in range(per_class):
            _picture(root / name / f"{i:02d}.png", colour)
    return root


def _read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_class_folders_become_questions_answered_with_the_class_name(tmp_path):
    folder = _class_folder(tmp_path / "pictures")
    _picture(folder / "blue" / "nested" / "deep.png", COLOURS["blue"])  # subfolders belong to their class
    report = import_folder(folder, tmp_path / "out", options=ImportOptions(eval_size=6, seed=1))
    out = tmp_path / "out"
    assert report.classes == {"blue": 11, "green pear": 10, "red apple": 10} and report.images == 31
    assert report.held_out == 6 and report.train == 25 and not report.bad

    train = json.loads((out / "train.json").read_text())
    questions = Counter(r["conversations"][0]["value"].removeprefix("<image>\n") for r in train)
    assert len(questions) > 2  # several phrasings, with and without the short-answer instruction
    assert any(q.endswith(SHORT_ANSWER) for q in questions)
    assert {r["conversations"][1]["value"] for r in train} == {"blue", "green pear", "red apple"}
    for r in train:  # the answer is the class of the picture's folder
        assert label_of(r["image"].split("/")[1]) == r["conversations"][1]["value"]
        assert r["image"].startswith("images/") and not os.path.isabs(r["image"])

    held = _read_lines(out / "eval_vqa.jsonl")
    assert Counter(r["answers"][0] for r in held) == {"blue": 2, "green pear": 2, "red apple": 2}  # per class
    assert not {r["image"] for r in held} & {r["image"] for r in train}
    mcq = _read_lines(out / "eval_mcq.jsonl")
    for r in mcq:
        assert len(r["options"]) == 3 and r["options"]["ABC".index(r["answer"])] == label_of(r["image"].split("/")[1])
    captions = json.loads((out / "captions.json").read_text())
    assert captions[0]["caption"].startswith("a picture of ")

    moved = shutil.move(str(out), tmp_path / "elsewhere")  # paths are relative to the output: it can move
    shutil.rmtree(folder)  # and needs nothing from the source folder
    samples = read_dataset({"format": "llava", "path": f"{moved}/train.json", "image_root": moved})
    assert len(samples) == 25 and not samples.report.skipped
    assert all(Path(s.images[0]).is_file() for s in samples)
    vqa = load_task("vqa", Path(moved) / "eval_vqa.jsonl")
    assert len(vqa.records) == 6 and not vqa.report.skipped
    assert vqa.records[0].references == held[0]["answers"]
    choice = load_task("mcq", Path(moved) / "eval_mcq.jsonl")
    assert len(choice.records) == 6 and not choice.report.skipped


def test_split_and_phrasings_are_seeded(tmp_path):
    folder = _class_folder(tmp_path / "pictures")
    import_folder(folder, tmp_path / "a", options=ImportOptions(seed=3))
    import_folder(folder, tmp_path / "b", options=ImportOptions(seed=3))
    import_folder(folder, tmp_path / "c", options=ImportOptions(seed=4))
    a, b, c = ((tmp_path / x / "train.json").read_text() for x in "abc")
    assert a == b and a != c


def test_bad_pictures_are_named_and_counted_never_kept(tmp_path):
    folder = _class_folder(tmp_path / "pictures", per_class=4)
    (folder / "blue" / "truncated.png").write_bytes((folder / "blue" / "00.png").read_bytes()[:40])
    (folder / "blue" / "notes.png").write_text("not a picture")
    _picture(folder / "blue" / "huge.png", COLOURS["blue"], size=64)  # over the limit below
    secret = _picture(tmp_path / "secret.png", (0, 0, 0))
    (folder / "blue" / "link.png").symlink_to(secret)  # a symlink that leaves the folder
    (folder / "blue" / "inside.png").symlink_to(folder / "blue" / "00.png")  # one that stays inside: fine
    (folder / "blue" / "readme.txt").write_text("hello")
    (folder / "stray.jpg").write_text("a file outside the class folders")

    report = import_folder(folder, tmp_path / "out", options=ImportOptions(max_pixels=32 * 32, eval_size=3))
    kinds = {p.path: p.kind for p in report.bad}
    assert kinds == {
        "blue/truncated.png": "undecodable_image",
        "blue/notes.png": "undecodable_image",
        "blue/huge.png": "oversized_image",
        "blue/link.png": "outside_folder",
    }
    assert {p.path: p.kind for p in report.ignored} == {
        "stray.jpg": "not_in_a_class",
        "blue/readme.txt": "not_an_image",
    }
    assert report.classes["blue"] == 5  # 4 + the symlink inside the folder
    written = (tmp_path / "out" / "train.json").read_text() + (tmp_path / "out" / "eval_vqa.jsonl").read_text()
    for bad in kinds:
        assert bad not in written
    assert not (tmp_path / "out" / "images" / "blue" / "link.png").exists()
    saved = json.loads((tmp_path / "out" / "import_report.json").read_text())
    assert Counter(p["kind"] for p in saved["bad"]) == {
        "undecodable_image": 2,
        "oversized_image": 1,
        "outside_folder": 1,
    }
    summary = report.summary()
    assert "4 left out" in summary and "blue/link.png" in summary and "outside_folder 1" in summary


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_captions_file_gives_caption_pairs_and_a_caption_eval_split(tmp_path, suffix):
    folder = tmp_path / "pictures"
    rows = [(f"img{i}.png", f"a photo number {i}") for i in range(8)] + [("img0.png", "another caption of 0")]
    for name in {r[0] for r in rows}:
        _picture(folder / name, (10 * len(name), 0, 0))
    table = tmp_path / f"captions{suffix}"
    if suffix == ".jsonl":
        lines = [json.dumps({"image": i, "caption": c}) for i, c in rows] + [json.dumps({"image": "img1.png"})]
        table.write_text("\n".join(lines) + "\n")
    else:
        sep = "\t" if suffix == ".tsv" else ","
        table.write_text("\n".join([f"image{sep}caption", *(f"{i}{sep}{c}" for i, c in rows), f"img1.png{sep}"]) + "\n")
    report = import_folder(folder, tmp_path / "out", captions=table, options=ImportOptions(eval_size=2))
    assert [(p.kind, p.reason) for p in report.bad] == [("bad_row", "missing or empty caption")]
    assert report.bad[0].path == f"{table}:{10 if suffix == '.jsonl' else 11}"  # the file and its line (CSV: header)
    train = read_dataset({"format": "llava", "path": str(tmp_path / "out" / "train.json")})
    captions = read_dataset({"format": "captions_json", "path": str(tmp_path / "out" / "captions.json")})
    assert len(train) == len(captions) == report.train and not train.report.skipped
    refs = load_task("caption", tmp_path / "out" / "eval_caption.jsonl")
    assert len(refs.records) == 2  # held out by picture: both captions of img0 stay on one side
    assert sum(len(r.references) for r in refs.records) + report.train == 9


def test_qa_file_gives_instruction_pairs_and_paths_must_stay_inside(tmp_path):
    folder = tmp_path / "pictures"
    for i in range(6):
        _picture(folder / f"{i}.png", (i * 40, 0, 0))
    outside = _picture(tmp_path / "outside.png", (0, 0, 0))
    table = tmp_path / "qa.csv"
    rows = [f"{i}.png,How red is it?,level {i}" for i in range(6)]
    rows += ["../outside.png,What is it?,x", f"{outside},What is it?,x", "missing.png,What is it?,x"]
    rows += [f"{folder / '0.png'},Absolute but inside?,yes", "sub/../1.png,Normalised?,yes"]
    table.write_text("image,question,answer\n" + "\n".join(rows) + "\n")
    report = import_folder(folder, tmp_path / "out", qa=table, options=ImportOptions(eval_size=2, seed=5))
    assert {p.path: p.kind for p in report.bad} == {
        "../outside.png": "outside_folder",
        str(outside): "outside_folder",
        "missing.png": "missing_image",
    }
    train = json.loads((tmp_path / "out" / "train.json").read_text())
    eval_ = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert len(train) + len(eval_) == 8 and {r["image"] for r in train + eval_} == {f"images/{i}.png" for i in range(6)}
    assert (folder / "0.png").is_file() and sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == [
        f"{i}.png" for i in range(6)
    ]
    vqa = load_task("vqa", tmp_path / "out" / "eval_vqa.jsonl")
    assert len(vqa.records) == 2 and not vqa.report.skipped


def test_bad_input_is_one_clear_error(tmp_path):
    folder = _class_folder(tmp_path / "pictures", per_class=2)
    with pytest.raises(ValueError, match="inside"):
        import_folder(folder, folder / "out")
    with pytest.raises(ValueError, match="no pictures in class subfolders"):
        import_folder(folder / "blue", tmp_path / "flat")
    _picture(tmp_path / "single" / "only" / "a.png", (0, 0, 0))
    with pytest.raises(ValueError, match="at least two classes"):
        import_folder(tmp_path / "single", tmp_path / "one")
    with pytest.raises(ValueError, match=r"must contain \{label\}"):
        import_folder(folder, tmp_path / "t", options=ImportOptions(answers=("yes",)))
    table = tmp_path / "t.csv"
    table.write_text("picture,caption\nx.png,hi\n")
    with pytest.raises(ValueError, match=r"t\.csv:1: no image column"):
        import_folder(folder, tmp_path / "u", captions=table)
    import_folder(folder, tmp_path / "done", options=ImportOptions(eval_size=3))
    with pytest.raises(ValueError, match="already holds an import"):
        import_folder(folder, tmp_path / "done")


def test_short_answer_instruction_is_the_vqa_eval_prompt():
    from minigpt.eval.tasks.vqa import PROMPT

    assert SHORT_ANSWER == PROMPT


def test_cli_prints_the_report_and_next_steps(tmp_path, capsys):
    folder = _class_folder(tmp_path / "pictures", per_class=3)
    args = ["data", "import", str(folder), "--out", str(tmp_path / "out"), "--eval-size", "3"]
    assert main([*args, "--question", "Which fruit is this?", "--answer", "It is {label}."]) == 0
    out = capsys.readouterr().out
    assert "9 pictures imported, 0 left out" in out and "minigpt eval" in out and "--task mcq" in out
    held = _read_lines(tmp_path / "out" / "eval_vqa.jsonl")
    assert held[0]["question"] == "Which fruit is this?"
    train = json.loads((tmp_path / "out" / "train.json").read_text())
    assert all(r["conversations"][1]["value"].startswith("It is ") for r in train)
    assert main([*args[:2], str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]) == 2
    assert "is not a folder" in capsys.readouterr().err
