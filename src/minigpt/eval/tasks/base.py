"""What every eval task shares: the record, the reading machinery and the :class:`Task` interface.

A task module (caption, vqa, mcq, pope...) subclasses :class:`Task`: its readers turn input files into
:class:`EvalRecord` s, its :attr:`~Task.prompt` is the default instruction, and its :meth:`~Task.score` computes
the metrics (totals and one row per record or question) with a named reference logic (:attr:`~Task.scorers`).

Like :mod:`minigpt.data.formats`, readers do not open images (paths, or encoded bytes for TSV files that embed
them); a malformed record is skipped with a logged warning naming its origin and counted in the
:class:`~minigpt.data.formats.ReadReport` of the returned :class:`TaskData`.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ...data.conversation import Conversation, Image, ImageLike, Text, Turn, parse_content
from ...data.formats import ReadReport, read_json_any, record_object


@dataclass
class EvalRecord:
    """One question of an eval set.

    ``references``: reference captions (caption), annotators' answers (vqa), ``[answer letter]`` (mcq) or
    ``[label]`` (pope). ``group``: the question a circular copy belongs to (its own id otherwise).
    ``extra``: task details kept for scoring and written to the predictions file (``options``, ``category``,
    ``rotation``, ``answer_type``). ``source``: the data file's name without extension; ``local_id``: the id
    within that file (``id`` has the ``source/`` prefix when several files are read); ``row``: the position of
    the record's row in its file (0-based, skipped rows counted: lmms-eval's ``doc_id``).
    """

    id: str
    prompt: Conversation
    images: list[ImageLike]
    references: list[str]
    extra: dict[str, Any] = field(default_factory=dict)
    origin: str = ""
    group: str = ""
    source: str = ""
    local_id: str = ""
    row: int | None = None

    def __post_init__(self) -> None:
        self.group = self.group or self.id
        self.local_id = self.local_id or self.id

    @property
    def prompt_text(self) -> str:
        """The prompt as text, images shown as ``<ImageHere>``."""
        return "\n".join(t.text for t in self.prompt.turns)


@dataclass
class TaskData:
    """The records of an eval set, the task they belong to and what reading them skipped."""

    task: str
    records: list[EvalRecord]
    report: ReadReport
    sources: list[str]

    def __len__(self) -> int:
        return len(self.records)


@dataclass
class ReadOptions:
    """How to read an eval set: ``root`` (folder image paths are relative to; ``None``: each data file's),
    ``instruction`` (the task's prompt or its replacement), Karpathy/ScienceQA ``split``, MMBench ``circular``,
    VQAv2 ``annotations`` file."""

    instruction: str
    root: Path | None = None
    split: str | None = None
    circular: bool = False
    annotations: Path | None = None


@dataclass
class Scores:
    """A task's scores: ``totals`` (the metrics, with ``scorer`` and ``reference``: the logic that produced them)
    and ``rows`` (one per record, or per question for circular multiple choice)."""

    totals: dict[str, Any]
    rows: list[dict[str, Any]]


class Skip(ValueError):
    """A malformed record: skipped and counted, never fatal."""


class Task:
    """One eval task: readers, default prompt and scoring. Subclasses set the class attributes and implement
    :meth:`read_file` and :meth:`score`."""

    name: ClassVar[str]
    #: The default instruction (``prompt=`` replaces it).
    prompt: ClassVar[str]
    #: Default answer length for generation.
    max_new_tokens: ClassVar[int] = 10
    #: Scoring logics: name -> the reference implementation it reproduces; the first is the default.
    scorers: ClassVar[dict[str, str]]
    #: One-line description of the accepted input files (CLI help).
    inputs: ClassVar[str] = ""

    def read(self, loaded: list[tuple[Path, Any]], options: ReadOptions) -> TaskData:
        """Records of the ``(path, content)`` data files (ids prefixed with the file name when several)."""
        if options.annotations:
            raise ValueError(f"annotations= is for the vqa task (VQAv2 annotations); {self.name} reads one file each")
        b = Builder(self.name, [p for p, _ in loaded], prefix=len(loaded) > 1)
        for path, content in loaded:
            self.read_file(b, path, content, options.root if options.root is not None else path.parent, options)
        return b.finish([p for p, _ in loaded])

    def read_file(self, b: Builder, path: Path, data: Any, root: Path, options: ReadOptions) -> None:
        raise NotImplementedError

    def score(
        self, records: Sequence[EvalRecord], predictions: Mapping[str, str], scorer: str, meteor: bool | None = None
    ) -> Scores:
        """Metrics of ``predictions`` (``{record id: answer}``) over ``records``, by logic ``scorer``."""
        raise NotImplementedError

    def summary(self, totals: Mapping[str, Any]) -> str | None:
        """Text the CLI prints after the metrics (the reference tool's own report), or ``None``."""
        return None

    def check_scorer(self, scorer: str | None) -> str:
        """``scorer`` (default: the first of :attr:`scorers`); ``ValueError`` naming the choices when unknown."""
        if scorer is None:
            return next(iter(self.scorers))
        if scorer not in self.scorers:
            raise ValueError(f"unknown scorer {scorer!r} for task {self.name}; choose from {', '.join(self.scorers)}")
        return scorer

    def totals(self, scorer: str, **metrics: Any) -> dict[str, Any]:
        """``metrics`` led by the scorer's name and the reference it reproduces."""
        return {"scorer": scorer, "reference": self.scorers[scorer], **metrics}


def scored(records: Sequence[EvalRecord], predictions: Mapping[str, str]) -> list[EvalRecord]:
    """The records that have a prediction; ``ValueError`` when none has."""
    recs = [r for r in records if r.id in predictions]
    if not recs:
        raise ValueError("no predictions to score")
    return recs


def mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def build_prompt(text: str, num_images: int = 1) -> Conversation:
    """One user turn: the image slot(s), then ``" " + text`` (MiniGPT-4's ``<Img><ImageHere></Img> question``).

    When the text has image placeholders (``<image>``, ``<ImageHere>``...) the images go there instead; their
    number must then match ``num_images`` (``ValueError`` otherwise).
    """
    parsed = parse_content(text)
    slots = sum(isinstance(p, Image) for p in parsed)
    if slots:
        if slots != num_images:
            raise Skip(f"the text has {slots} image placeholder(s) but the record {num_images} image(s)")
        return Conversation([Turn("user", parsed)])
    parts: list[Any] = [Image() for _ in range(num_images)]
    if text:
        parts.append(Text((" " if num_images else "") + text))
    return Conversation([Turn("user", parts)])


# ---------------------------------------------------------------------------------------------- helpers


def load_any(path: Path) -> Any:
    """A JSON object, or ``(origin, record | InvalidRecord)`` pairs for JSON lists, JSONL and TSV."""
    return read_tsv(path) if path.suffix == ".tsv" else read_json_any(path)


def read_tsv(path: Path) -> list[tuple[str, Any]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images are long fields
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        if not reader.fieldnames:
            raise ValueError(f"{path}: empty TSV file")
        return [(f"{path}:{i + 2}", dict(row)) for i, row in enumerate(reader)]


def field_str(rec: Mapping[str, Any], *keys: str, required: bool = True) -> str | None:
    for key in keys:
        value = rec.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise Skip(f"{key!r} must be a string, got {type(value).__name__}")
        if value.strip():
            return value
    if required:
        raise Skip(f"missing or empty {' / '.join(repr(k) for k in keys)}")
    return None


def record_id(rec: Mapping[str, Any], *keys: str, default: Any = None) -> str:
    for key in keys:
        if rec.get(key) is not None and not isinstance(rec[key], (dict, list, bool)):
            return str(rec[key])
    if default is None:
        raise Skip(f"missing id ({' / '.join(repr(k) for k in keys)})")
    return str(default)


def record_images(rec: Mapping[str, Any], root: Path, *keys: str) -> list[ImageLike]:
    for key in keys:
        value = rec.get(key)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, str) and v.strip() for v in values):
            raise Skip(f"{key!r} must be a non-empty string or list of strings, got {value!r}")
        return [str(root / v) for v in values]
    raise Skip(f"missing image ({' / '.join(repr(k) for k in keys)})")


def answer_list(value: Any) -> list[str]:
    values = value if isinstance(value, list) else [value]
    out = []
    for v in values:
        if isinstance(v, dict):
            v = v.get("answer")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str):
            raise Skip(f"answers must be strings or {{'answer': str}} objects, got {v!r}")
        out.append(v)
    if not out:
        raise Skip("empty answer list")
    return out


_COCO_LAYOUT: dict[tuple[str, str | None], int] = {}  # (root, subtype) -> index of the layout found last


def coco_image_path(root: Path, image_id: int | str, subtype: str | None = None) -> str:
    """Where a COCO image lies under ``root``: the first existing of the usual layouts (``COCO_val2014_{id:012d}.jpg``
    in ``root`` or ``root/val2014``, ``{id:012d}.jpg`` for 2017), else the first guess. The layout found is tried
    first for the next id, so a large set costs about one ``stat`` per image."""
    try:
        num = int(image_id)
    except (TypeError, ValueError):
        return str(root / str(image_id))
    subtypes = [subtype] if subtype else ["val2014", "train2014", "test2015", "val2017", "train2017"]
    candidates = []
    for sub in subtypes:
        name = f"COCO_{sub}_{num:012d}.jpg" if sub.endswith(("2014", "2015")) else f"{num:012d}.jpg"
        candidates += [root / name, root / sub / name]
    candidates.append(root / f"{num:012d}.jpg")
    key = (str(root), subtype)
    last = _COCO_LAYOUT.get(key)
    if last is not None and candidates[last].is_file():
        return str(candidates[last])
    for i, c in enumerate(candidates):
        if c.is_file():
            _COCO_LAYOUT[key] = i
            return str(c)
    return str(candidates[last or 0])


class Builder:
    """Collects records, checks ids are unique, reports skipped records."""

    def __init__(self, task: str, sources: Sequence[Path], prefix: bool) -> None:
        self.task, self.prefix = task, prefix
        self.report = ReadReport(", ".join(str(s) for s in sources))
        self.records: list[EvalRecord] = []
        self.ids: set[str] = set()

    def run(
        self,
        source: Path,
        rows: Iterable[tuple[str, Any]],
        parse: Callable[[Any, str], EvalRecord | list[EvalRecord] | None],
    ) -> None:
        for row, (origin, rec) in enumerate(rows):
            try:
                parsed = parse(record_object(rec, Skip), origin)
            except Skip as e:
                self.report.skip(origin, str(e))
                continue
            for record in [parsed] if isinstance(parsed, EvalRecord) else parsed or []:
                self.add(record, source, origin, row)

    def add(self, record: EvalRecord, source: Path, origin: str, row: int | None = None) -> None:
        record.source, record.local_id, record.row = source.stem, record.id, row
        if self.prefix:
            record.id = f"{source.stem}/{record.id}"
            record.group = f"{source.stem}/{record.group}"
        if record.id in self.ids:
            self.report.skip(origin, f"duplicate id {record.id!r}")
            return
        record.origin = origin
        self.ids.add(record.id)
        self.records.append(record)

    def finish(self, sources: Sequence[Path]) -> TaskData:
        self.report.read = len(self.records)
        self.report.finish()
        return TaskData(self.task, self.records, self.report, [str(s) for s in sources])
