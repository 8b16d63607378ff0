"""``minigpt data import``: a folder of pictures -> training data (LLaVA JSON) and a held-out split ``minigpt eval``
scores directly.

Three layouts are read:

- **class folders** (``FOLDER/cats/*.jpg``, ``FOLDER/dogs/*.jpg``): every picture gets a question ("What is in the
  picture?", in several phrasings) answered with its folder's name (``_``/``-`` read as spaces); the questions and
  the answer templates (``{label}``) are configurable. Also written: stage-1 captions (``captions.json``, from a
  caption template), and the held-out split as VQA JSONL (``{image, question, answers: [label]}``, the exact class
  name) and as multiple choice JSONL (``{image, question, options, answer}``: the class and other classes).
- **a captions file** (CSV, TSV or JSONL with ``image`` and ``caption``): caption pairs for stage 1, in LLaVA JSON
  (a caption instruction and the caption, as LLaVA's pretraining set) and in ``captions_json``; held out as caption
  JSONL (``{image, captions}``).
- **a question/answer file** (``image``, ``question``, ``answer``): instruction pairs for stage 2; held out as VQA
  JSONL.

Every picture is checked on the way in: it must lie inside FOLDER (``..``, absolute paths and symlinks that resolve
elsewhere are refused), exist, be within the pixel limit (read from its header) and decode fully. Bad pictures are
named and counted in the report (``import_report.json``), never silently dropped or kept. The pictures that pass are
hard-linked (or copied) into ``OUT/images/`` and every path written is relative to OUT, so OUT can move as a whole and
no reader needs ``allow_outside_root``. The held-out split is drawn per class (class folders) or per picture (all
rows of one picture on the same side), seeded.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .images import DEFAULT_MAX_PIXELS, ImageError, ImageTooLargeError, load_image

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
DEFAULT_QUESTIONS: tuple[str, ...] = (
    "What is in the picture?",
    "What is this?",
    "What do you see in the image?",
    "What is shown in this picture?",
)
DEFAULT_ANSWERS: tuple[str, ...] = ("{label}",)
DEFAULT_CAPTION = "a picture of {label}"
#: LLaVA's pretraining instructions for caption pairs (a few of ``blip_laion_cc_sbu_558k``'s).
CAPTION_INSTRUCTIONS: tuple[str, ...] = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Write a terse but informative summary of the picture.",
    "Share a concise interpretation of the image provided.",
)
#: The short-answer instruction ``minigpt eval --task vqa`` appends (LLaVA's); each class question is also trained
#: with it, so the held-out VQA split is asked the way training asked.
SHORT_ANSWER = "Answer the question using a single word or phrase."
MCQ_OPTIONS = 4
COLUMNS: dict[str, tuple[str, ...]] = {
    "image": ("image", "file", "filename", "file_name", "path"),
    "caption": ("caption", "text"),
    "question": ("question",),
    "answer": ("answer",),
}


@dataclass(frozen=True)
class ImportOptions:
    questions: tuple[str, ...] = DEFAULT_QUESTIONS
    answers: tuple[str, ...] = DEFAULT_ANSWERS
    caption: str = DEFAULT_CAPTION
    eval_fraction: float = 0.1
    eval_size: int | None = None  # total held-out pictures (overrides eval_fraction)
    seed: int = 0
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    copy: bool = False  # copy instead of hard-linking
    workers: int = 4


@dataclass
class Problem:
    path: str
    kind: str  # outside_folder, missing_image, oversized_image, undecodable_image, bad_row, not_an_image
    reason: str


@dataclass
class ImportReport:
    folder: str
    out: str
    layout: str  # classes, captions, qa
    images: int = 0  # pictures that passed
    train: int = 0  # training records
    held_out: int = 0  # held-out pictures
    classes: dict[str, int] = field(default_factory=dict)  # label -> good pictures
    bad: list[Problem] = field(default_factory=list)  # pictures (and rows) left out, by name
    ignored: list[Problem] = field(default_factory=list)  # files that are not pictures
    files: dict[str, str] = field(default_factory=dict)

    def summary(self, examples: int = 10) -> str:
        lines = [
            f"{self.folder} ({self.layout}): {self.images} pictures imported, {len(self.bad)} left out, "
            f"{len(self.ignored)} other files ignored"
        ]
        if self.classes:
            lines.append(f"  {len(self.classes)} classes: " + ", ".join(f"{k} {v}" for k, v in self.classes.items()))
        lines.append(f"  {self.train} training records, {self.held_out} held-out pictures")
        for title, problems in (("left out", self.bad), ("ignored", self.ignored)):
            counts = Counter(p.kind for p in problems)
            if counts:
                lines.append(f"  {title}: " + ", ".join(f"{k} {n}" for k, n in sorted(counts.items())))
            lines += [f"    {p.path}: {p.reason}" for p in problems[:examples]]
            if len(problems) > examples:
                lines.append(f"    ... and {len(problems) - examples} more (all in import_report.json)")
        lines += [f"  wrote {name}: {path}" for name, path in self.files.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        data = dict(vars(self))
        data["bad"], data["ignored"] = [vars(p) for p in self.bad], [vars(p) for p in self.ignored]
        return data


@dataclass(frozen=True)
class _Row:
    """One imported record: a picture (relative to the folder) and its texts."""

    image: str
    label: str = ""
    caption: str = ""
    question: str = ""
    answer: str = ""


def label_of(folder_name: str) -> str:
    """A class folder's name as the answer: ``golden_retriever`` -> ``golden retriever``."""
    return " ".join(folder_name.replace("_", " ").replace("-", " ").split())


def import_folder(
    folder: str | Path,
    out: str | Path,
    captions: str | Path | None = None,
    qa: str | Path | None = None,
    options: ImportOptions | None = None,
) -> ImportReport:
    """Import ``folder`` into ``out`` (see the module doc); ``captions`` / ``qa`` name a table of its pictures."""
    options = options or ImportOptions()
    _check_options(options)
    if captions and qa:
        raise ValueError("give a captions file or a question/answer file, not both")
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    root = folder.resolve()
    if out.resolve() == root or out.resolve().is_relative_to(root):
        raise ValueError(f"the output {out} is inside {folder}: choose a folder outside it")
    if (out / "train.json").exists():
        raise ValueError(f"{out} already holds an import (train.json): choose a new folder or remove it")
    layout = "captions" if captions else "qa" if qa else "classes"
    report = ImportReport(str(folder), str(out), layout)
    if layout == "classes":
        rows = _class_rows(folder, report)
    else:
        table = Path(captions or qa)  # type: ignore[arg-type]
        rows = _table_rows(table, ("image", "caption") if captions else ("image", "question", "answer"), report)
    rows = _check_images(root, rows, options, report)
    if not rows:
        raise ValueError(f"{folder}: no usable picture ({len(report.bad)} left out; see the report above)")
    train, held = _split(rows, layout, options)
    out.mkdir(parents=True, exist_ok=True)
    _place_images(root, out, sorted({r.image for r in rows}), options.copy)
    report.images = len({r.image for r in rows})
    report.held_out = len({r.image for r in held})
    if layout == "classes":
        report.classes = dict(sorted(Counter(r.label for r in rows).items()))
    _write(out, layout, train, held, options, report)
    report.files["report"] = str(_dump(out / "import_report.json", report.to_dict()))
    return report


def _check_options(options: ImportOptions) -> None:
    if not options.questions or not all(q.strip() for q in options.questions):
        raise ValueError("questions must be non-empty texts")
    for template in (*options.answers, options.caption):
        if "{label}" not in template:
            raise ValueError(f"template {template!r} must contain {{label}}")
        try:
            template.format(label="x")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"template {template!r}: only {{label}} can be filled in ({err})") from None
    if not 0 < options.eval_fraction < 1:
        raise ValueError(f"eval fraction must be between 0 and 1, got {options.eval_fraction}")
    if options.eval_size is not None and options.eval_size < 1:
        raise ValueError(f"eval size must be at least 1, got {options.eval_size}")


# ---------------------------------------------------------------------------------------------- reading


def _class_rows(folder: Path, report: ImportReport) -> list[_Row]:
    """Every file under each class subfolder (recursively; symlinked folders are not followed, and say so)."""
    rows: list[_Row] = []
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            report.ignored.append(Problem(path.name, "not_in_a_class", "a file outside the class folders"))
    for cls in classes:
        label = label_of(cls.name)
        if not label:
            report.ignored.append(Problem(cls.name, "no_label", "the folder name gives no class name"))
            continue
        for dirpath, dirnames, filenames in os.walk(cls):
            dirnames.sort()
            here = Path(dirpath)
            for d in dirnames:
                if (here / d).is_symlink():
                    rel = (here / d).relative_to(folder).as_posix()
                    report.ignored.append(Problem(rel, "symlinked_folder", "a symlinked folder is not followed"))
            for name in sorted(filenames):
                rel = (here / name).relative_to(folder).as_posix()
                if name.startswith("."):
                    report.ignored.append(Problem(rel, "hidden", "a hidden file"))
                    continue
                if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                    report.ignored.append(Problem(rel, "not_an_image", "not a picture's file extension"))
                    continue
                rows.append(_Row(rel, label=label))
    if len({r.label for r in rows}) < 2 and rows:
        raise ValueError(f"{folder}: class folders need at least two classes, found {sorted({r.label for r in rows})}")
    if not rows:
        raise ValueError(
            f"{folder}: no pictures in class subfolders (FOLDER/CLASS/*.jpg); for a flat folder give --captions or --qa"
        )
    return rows


def _table_rows(path: Path, wanted: Sequence[str], report: ImportReport) -> list[_Row]:
    """The rows of a CSV/TSV/JSONL table with the ``wanted`` columns; bad rows are named and counted."""
    if not path.is_file():
        raise ValueError(f"{path} not found")
    rows: list[_Row] = []
    for origin, record in _table_records(path):
        if not isinstance(record, dict):
            report.bad.append(Problem(origin, "bad_row", f"a JSON {type(record).__name__}, not an object"))
            continue
        values, missing = {}, []
        for name in wanted:
            key = next((k for k in COLUMNS[name] if k in record), None)
            value = record.get(key) if key else None
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "image":
                value = str(value)
            if not isinstance(value, str) or not value.strip():
                missing.append(name)
            else:
                values[name] = value.strip()
        if missing:
            report.bad.append(Problem(origin, "bad_row", f"missing or empty {', '.join(missing)}"))
            continue
        rows.append(_Row(**values))
    return rows


def _table_records(path: Path) -> Iterable[tuple[str, Any]]:
    if path.suffix.lower() in (".jsonl", ".json"):
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield f"{path}:{lineno}", json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{lineno}: invalid JSON at column {e.colno}: {e.msg}") from None
        return
    if path.suffix.lower() not in (".csv", ".tsv", ".txt"):
        raise ValueError(f"{path}: a captions or question/answer file must be .csv, .tsv or .jsonl")
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() in (".tsv", ".txt") else ",")
        header = [h.strip() for h in reader.fieldnames or []]
        if not any(h in COLUMNS["image"] for h in header):
            raise ValueError(f"{path}:1: no image column in the header {header} (one of {', '.join(COLUMNS['image'])})")
        try:
            for record in reader:
                yield f"{path}:{reader.line_num}", {(k or "").strip(): v for k, v in record.items()}
        except csv.Error as e:
            raise ValueError(f"{path}:{reader.line_num}: {e}") from None


# ---------------------------------------------------------------------------------------------- checking


def _check_images(root: Path, rows: list[_Row], options: ImportOptions, report: ImportReport) -> list[_Row]:
    """The rows whose picture passes :func:`image_problem`, each with its path relative to ``root`` (normalised);
    every other picture is named once, as written, in ``report.bad``."""
    normal = {image: _relative(root, image) for image in {r.image for r in rows}}
    images = sorted({n for n in normal.values() if n is not None})
    with ThreadPoolExecutor(max(1, options.workers)) as pool:
        problems = dict(zip(images, pool.map(lambda rel: image_problem(root, rel, options.max_pixels), images)))
    outside = "resolves outside the folder (a '..' or an absolute path)"
    report.bad += [Problem(image, "outside_folder", outside) for image, n in sorted(normal.items()) if n is None]
    report.bad += [p for p in problems.values() if p is not None]
    return [replace(r, image=n) for r in rows if (n := normal[r.image]) is not None and problems[n] is None]


def _relative(root: Path, image: str) -> str | None:
    """``image`` (relative to ``root``, or absolute) as a normalised relative POSIX path; None when, as written, it
    leaves ``root``."""
    relative = os.path.relpath(os.path.normpath(os.path.join(root, image)), root)
    return None if relative == os.curdir or relative.split(os.sep)[0] == os.pardir else Path(relative).as_posix()


def image_problem(root: Path, relative: str, max_pixels: int | None) -> Problem | None:
    """Why the picture ``root/relative`` cannot be imported (None: it can): outside ``root`` (after resolving
    ``..``, an absolute path or symlinks), missing, over ``max_pixels`` (header only) or not decodable."""
    path = root / relative
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        real = None
    if real is not None and not real.is_relative_to(root) or real is None and ".." in Path(relative).parts:
        return Problem(relative, "outside_folder", f"resolves outside {root} (a '..', absolute path or symlink)")
    if real is None or not real.is_file():
        return Problem(relative, "missing_image", "not found" if real is None else "not a file")
    try:
        load_image(real, max_pixels=max_pixels)
    except ImageTooLargeError as e:
        return Problem(relative, "oversized_image", str(e))
    except ImageError as e:
        return Problem(relative, "undecodable_image", str(e))
    return None


# ---------------------------------------------------------------------------------------------- splitting, writing


def _split(rows: list[_Row], layout: str, options: ImportOptions) -> tuple[list[_Row], list[_Row]]:
    """(train, held-out): per class for class folders, else by picture; seeded, each side in a seeded order."""
    rng = random.Random(options.seed)
    stratum = {r.image: r.label if layout == "classes" else "" for r in rows}
    groups: dict[str, list[str]] = defaultdict(list)  # stratum -> pictures
    for image in sorted(stratum):
        groups[stratum[image]].append(image)
    total = sum(len(v) for v in groups.values())
    want = options.eval_size if options.eval_size is not None else max(1, round(total * options.eval_fraction))
    if want >= total:
        raise ValueError(f"a held-out split of {want} leaves nothing to train on ({total} pictures)")
    quotas = _largest_remainder({k: len(v) * want / total for k, v in groups.items()})
    held: set[str] = set()
    for key, images in sorted(groups.items()):
        held |= set(rng.sample(images, min(quotas[key], len(images) - 1)))
    train = [r for r in rows if r.image not in held]
    test = [r for r in rows if r.image in held]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def _largest_remainder(shares: dict[str, float]) -> dict[str, int]:
    floors = {k: int(v) for k, v in shares.items()}
    left = round(sum(shares.values())) - sum(floors.values())
    for key in sorted(shares, key=lambda k: (floors[k] - shares[k], k))[:left]:
        floors[key] += 1
    return floors


def _place_images(root: Path, out: Path, images: list[str], copy: bool) -> None:
    """Hard-link (or copy) each picture to ``out/images/<its path in the folder>``."""
    for rel in images:
        source, target = (root / rel).resolve(), out / "images" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target.unlink()
        if not copy:
            try:
                os.link(source, target)
                continue
            except OSError:  # another file system, or links not allowed: copy
                pass
        shutil.copyfile(source, target)


def _llava(index: int, image: str, question: str, answer: str) -> dict[str, Any]:
    return {
        "id": f"{index:06d}",
        "image": image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer},
        ],
    }


def training_questions(questions: Sequence[str]) -> list[str]:
    """The phrasings a class question is trained with: each question, and each followed by :data:`SHORT_ANSWER`."""
    return [q for question in questions for q in (question, f"{question}\n{SHORT_ANSWER}")]


def _write(
    out: Path, layout: str, train: list[_Row], held: list[_Row], options: ImportOptions, report: ImportReport
) -> None:
    rng = random.Random(options.seed + 1)
    image = lambda row: f"images/{row.image}"  # noqa: E731
    files = report.files
    if layout == "classes":
        phrasings = training_questions(options.questions)
        labels = sorted({r.label for r in train + held})

        def qa(rows: list[_Row], first: bool) -> list[dict[str, Any]]:
            return [
                _llava(
                    i,
                    image(r),
                    options.questions[0] if first else rng.choice(phrasings),
                    (options.answers[0] if first else rng.choice(options.answers)).format(label=r.label),
                )
                for i, r in enumerate(rows)
            ]

        files["train"] = str(_dump(out / "train.json", qa(train, False)))
        files["eval"] = str(_dump(out / "eval.json", qa(held, True)))
        captions = lambda rows: [{"image": image(r), "caption": options.caption.format(label=r.label)} for r in rows]  # noqa: E731
        files["captions"] = str(_dump(out / "captions.json", captions(train)))
        files["eval_captions"] = str(_dump(out / "eval_captions.json", captions(held)))
        question = options.questions[0]
        vqa = [
            {"id": f"{i:06d}", "image": image(r), "question": question, "answers": [r.label]}
            for i, r in enumerate(held)
        ]
        files["eval_vqa"] = str(_dump_lines(out / "eval_vqa.jsonl", vqa))
        mcq = []
        for i, r in enumerate(held):
            others = rng.sample([x for x in labels if x != r.label], min(MCQ_OPTIONS, len(labels)) - 1)
            options_ = rng.sample([r.label, *others], len(others) + 1)
            answer = "ABCDEFGHIJ"[options_.index(r.label)]
            mcq.append(
                {"id": f"{i:06d}", "image": image(r), "question": question, "options": options_, "answer": answer}
            )
        files["eval_mcq"] = str(_dump_lines(out / "eval_mcq.jsonl", mcq))
        report.train = len(train)
    elif layout == "captions":
        pairs = lambda rows: [
            _llava(i, image(r), rng.choice(CAPTION_INSTRUCTIONS), r.caption) for i, r in enumerate(rows)
        ]  # noqa: E731
        files["train"] = str(_dump(out / "train.json", pairs(train)))
        files["eval"] = str(_dump(out / "eval.json", pairs(held)))
        files["captions"] = str(
            _dump(out / "captions.json", [{"image": image(r), "caption": r.caption} for r in train])
        )
        grouped: dict[str, list[str]] = defaultdict(list)
        for r in held:
            grouped[r.image].append(r.caption)
        refs = [{"id": f"{i:06d}", "image": f"images/{k}", "captions": v} for i, (k, v) in enumerate(grouped.items())]
        files["eval_caption"] = str(_dump_lines(out / "eval_caption.jsonl", refs))
        report.train = len(train)
    else:
        files["train"] = str(
            _dump(out / "train.json", [_llava(i, image(r), r.question, r.answer) for i, r in enumerate(train)])
        )
        files["eval"] = str(
            _dump(out / "eval.json", [_llava(i, image(r), r.question, r.answer) for i, r in enumerate(held)])
        )
        vqa = [
            {"id": f"{i:06d}", "image": image(r), "question": r.question, "answers": [r.answer]}
            for i, r in enumerate(held)
        ]
        files["eval_vqa"] = str(_dump_lines(out / "eval_vqa.jsonl", vqa))
        report.train = len(train)


def next_steps(report: ImportReport) -> str:
    """The commands that check, train on and evaluate an import (the README's walk-through)."""
    out = report.out
    lines = [
        "next:",
        f"  minigpt data check {out}/train.json -f llava",
        f"  minigpt data analyze {out}/train.json -f llava --tokenizer LLM --template hf",
        f"  minigpt train configs/own_pictures_cpu.yaml data.datasets.0.path={out}/train.json "
        f"data.eval.0.path={out}/eval.json model.init_from=MODEL",
    ]
    if "eval_vqa" in report.files:
        lines.append(f"  minigpt eval RUN/final --task vqa --data {report.files['eval_vqa']}")
    if "eval_mcq" in report.files:
        lines.append(f"  minigpt eval RUN/final --task mcq --data {report.files['eval_mcq']}")
    if "eval_caption" in report.files:
        lines.append(f"  minigpt eval RUN/final --task caption --data {report.files['eval_caption']}")
    return "\n".join(lines)


def _dump(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _dump_lines(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


__all__ = ["ImportOptions", "ImportReport", "Problem", "import_folder", "image_problem", "label_of", "next_steps"]
