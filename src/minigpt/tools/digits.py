"""The quickstart's ``digits`` task: real handwriting that nobody here drew.

scikit-learn ships 1,797 scans of handwritten digits (8x8 pixels, 16 grey levels; UCI's "optical recognition of
handwritten digits", ``sklearn.datasets.load_digits``: no download). They are written out as class folders
(``digits/seven/0042.png``, dark ink on white) and brought in with ``minigpt data import``, exactly as a user's own
folder would be: stage 1 learns captions ("a handwritten seven"), stage 2 the question "What digit is this?" (and
phrasings) answered as stage 1 captions them ("a handwritten seven": the ViT and projector, trained again in stage 2,
start from what stage 1 taught them, and stage 2 learns faster than with the bare name), and the held-out scans are
asked "What digit is this?".
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .quickstart_task import Question, Stage, TaskData

NAMES: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
QUESTIONS: tuple[str, ...] = (
    "What digit is this?",
    "Which digit is written here?",
    "What number is in the picture?",
    "Which digit do you see?",
)
CAPTION = "a handwritten {label}"
ANSWER = CAPTION  # stage 2 answers phrased as stage 1's captions
LOSS_RECORDS = 64  # held-out records the training loop's eval loss uses (all are asked before and after)


@dataclass(frozen=True)
class DigitItem:
    image: str
    label: str

    @property
    def caption(self) -> str:
        return CAPTION.format(label=self.label)


def write_digit_folders(folder: Path) -> int:
    """Write the 1,797 scans as ``folder/<name>/<index>.png`` (8x8 grey, ink dark on white); returns how many."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise RuntimeError(
            "the digits task needs scikit-learn (its scans ship in the wheel): pip install scikit-learn"
        ) from None
    import numpy as np
    from PIL import Image

    digits = load_digits()
    for name in NAMES:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for index, (pixels, target) in enumerate(zip(digits.images, digits.target)):
        grey = np.clip(255 - np.rint(pixels * 255 / 16), 0, 255).astype(np.uint8)
        Image.fromarray(grey, mode="L").save(folder / NAMES[target] / f"{index:04d}.png")
    return len(digits.images)


def named_digits(answer: str) -> set[str]:
    """The digits an answer names, by word ("seven") or numeral ("7")."""
    words = re.findall(r"[a-z]+|\d", answer.lower())
    return {NAMES[int(w)] if w.isdigit() else w for w in words if w.isdigit() or w in NAMES}


class DigitsTask:
    """1,797 scans as class folders, imported; 300 held out (stratified), the rest trained on."""

    name = "digits"
    questions = (Question("digit", QUESTIONS[0], "the digit"),)
    grid_question = "digit"
    stage1 = Stage(300, 16, 3e-3, True)
    stage2 = Stage(500, 4, 3e-3, True)
    train_size = 0  # all scans not held out
    test_size = 300

    def make_data(self, out: Path, train_size: int, test_size: int, seed: int) -> TaskData:
        from ..data.importer import ImportOptions, import_folder

        folder, data = out / "digits", out / "data"
        for old in (folder, data):
            shutil.rmtree(old, ignore_errors=True)
        write_digit_folders(folder)
        options = ImportOptions(
            questions=QUESTIONS, answers=(ANSWER,), caption=CAPTION, eval_size=test_size, seed=seed, workers=2
        )
        report = import_folder(folder, data, options=options)
        if report.bad:
            raise RuntimeError(f"digits import left out {len(report.bad)} scans: {report.bad[0]}")
        train = _keep(data / "train.json", train_size)
        captions = _keep(data / "captions.json", train_size)
        items = [
            DigitItem(r["image"], r["answers"][0])
            for r in map(json.loads, (data / "eval_vqa.jsonl").read_text().splitlines())
        ]
        return TaskData(
            data,
            data / "captions.json",
            _subset(data / "eval_captions.json", LOSS_RECORDS, data / "eval_captions_loss.json"),
            data / "train.json",
            _subset(data / "eval.json", LOSS_RECORDS, data / "eval_loss.json"),
            min(train, captions),
            items,
        )

    def correct(self, kind: str, answer: str, item: DigitItem) -> bool:
        return named_digits(answer) == {item.label}

    def words(self) -> list[str]:
        return [
            *QUESTIONS,
            *NAMES,
            *(CAPTION.format(label=n) for n in NAMES),
            "Answer the question using a single word",
        ]

    def results(self, answers: dict[str, dict[str, list[str]]], items: list[DigitItem], out: Path) -> dict[str, Any]:
        """``accuracy`` before/after (the answer names the right digit) and the confusion matrix after training."""
        from .quickstart_report import confusion_matrix

        accuracy = {
            when: round(sum(self.correct("digit", a, it) for a, it in zip(got["digit"], items)) / len(items), 4)
            for when, got in answers.items()
        }
        said = [next(iter(n)) if len(n := named_digits(a)) == 1 else None for a in answers["after"]["digit"]]
        path = confusion_matrix([it.label for it in items], said, NAMES, out / "confusion.png")
        return {"accuracy": accuracy, "confusion": str(path)}


def _keep(path: Path, n: int) -> int:
    """Keep the first ``n`` records of a JSON list (0: all); returns how many are left."""
    records = json.loads(path.read_text())[: n or None]
    path.write_text(json.dumps(records, indent=1) + "\n")
    return len(records)


def _subset(path: Path, n: int, target: Path) -> Path:
    """The first ``n`` records of a JSON list, written to ``target``."""
    target.write_text(json.dumps(json.loads(path.read_text())[:n], indent=1) + "\n")
    return target
