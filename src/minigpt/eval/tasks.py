"""Eval-set readers: each benchmark's input formats -> :class:`EvalRecord` s (id, images, prompt, references).

Like :mod:`minigpt.data.formats`, readers do not open images (paths, or encoded bytes for TSV files that embed
them); a malformed record is skipped with a :class:`~minigpt.data.formats.DataWarning` naming its origin and counted
in the :class:`~minigpt.data.formats.ReadReport` of the returned :class:`TaskData`.

Prompts (one user turn: the image(s), a space, then the text; ``prompt=`` replaces the instruction):

- ``caption``: :data:`CAPTION_PROMPT` ("Describe this image in one short sentence."); pass ``prompt=""`` for a
  stage-1 (``caption`` template) model, which expects the image alone.
- ``vqa``: ``{question}\\n`` + :data:`VQA_INSTRUCTION` ("Answer the question using a single word or phrase.").
- ``mcq``: ``{hint}\\n{question}\\nA. {option}\\nB. {option}...\\n`` + :data:`MCQ_INSTRUCTION` ("Answer with the
  option's letter from the given choices directly."); the hint line only when there is one.
- ``pope``: ``{question}\\n`` + :data:`POPE_INSTRUCTION` ("Answer yes or no.").

Input formats (detected from the content; several ``data`` files are concatenated, their ids prefixed with the
file name when more than one file is read):

- ``caption``: COCO annotations (``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``,
  several captions per image; images without ``file_name`` are looked up under COCO names), the Karpathy split
  file ``dataset_coco.json`` (``{"images": [{"filepath", "filename", "split", "sentences": [{"raw"}]}]}``,
  ``split`` defaults to ``test``), LAVIS Karpathy lists (``[{"image", "caption": str | [str]}]``), or JSONL
  ``{"id", "image", "captions": [str]}``.
- ``vqa``: VQAv2 questions (``{"data_subtype", "questions": [{"question_id", "image_id", "question"}]}``) with the
  annotations file (``{"annotations": [{"question_id", "answers": [{"answer"}], "answer_type"}]}``) as a second
  ``data`` file or ``annotations=``; without annotations the records have no references (predictions only). Or
  JSON/JSONL ``{"id", "image", "question", "answers": [str]}``; those raw answers are VQA-normalised for scoring.
- ``mcq``: MMBench/VLMEvalKit TSV (``index, question, hint, A, B, ..., answer, category``, ``image`` as base64 or
  ``image_path``; an ``index`` >= 1,000,000 marks a circular copy of question ``index % 1,000,000``); ScienceQA
  ``problems.json`` (records with an image, ``split`` defaults to ``test``; images at ``{split}/{pid}/{image}``);
  or JSON/JSONL ``{"id", "image", "question", "options": [str] | {"A": str}, "answer": letter | index | text,
  "hint"?, "category"?}`` (``choices`` is accepted for ``options``). Without options, they are parsed from the
  question text (MMStar: ``"...\\nOptions: A: x, B: y"``). ``circular=True`` adds MMBench CircularEval rotations.
- ``pope``: POPE JSON/JSONL ``{"question_id", "image", "text", "label": "yes"|"no"}`` (``question``/``answer``
  accepted too); the category (random/popular/adversarial) comes from a ``category`` field or the file name.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.conversation import Conversation, Image, ImageLike, Text, Turn, parse_content
from ..data.formats import DataWarning, ReadReport, read_json_any, record_object  # noqa: F401  (DataWarning re-exported for callers)
from .metrics import LETTERS, circular_answer, circular_options

TASKS: tuple[str, ...] = ("caption", "vqa", "mcq", "pope")
CAPTION_PROMPT = "Describe this image in one short sentence."
VQA_INSTRUCTION = "Answer the question using a single word or phrase."
MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
POPE_INSTRUCTION = "Answer yes or no."
DEFAULT_PROMPTS: dict[str, str] = {
    "caption": CAPTION_PROMPT, "vqa": VQA_INSTRUCTION, "mcq": MCQ_INSTRUCTION, "pope": POPE_INSTRUCTION,
}
#: MMBench TSVs mark circular copies with ``index = question_index + k * CIRCULAR_OFFSET``.
CIRCULAR_OFFSET = 1_000_000
POPE_CATEGORIES = ("random", "popular", "adversarial")


@dataclass
class EvalRecord:
    """One question of an eval set.

    ``references``: reference captions (caption), annotators' answers (vqa), ``[answer letter]`` (mcq) or
    ``[label]`` (pope). ``group``: the question a circular copy belongs to (its own id otherwise).
    ``extra``: task details kept for scoring and written to the predictions file (``options``, ``category``,
    ``rotation``, ``answer_type``, ``normalize_answers``).
    """

    id: str
    prompt: Conversation
    images: list[ImageLike]
    references: list[str]
    extra: dict[str, Any] = field(default_factory=dict)
    origin: str = ""
    group: str = ""

    def __post_init__(self) -> None:
        self.group = self.group or self.id

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


class _Skip(ValueError):
    """A malformed record: skipped and counted, never fatal."""


def build_prompt(text: str, num_images: int = 1) -> Conversation:
    """One user turn: the image slot(s), then ``" " + text`` (MiniGPT-4's ``<Img><ImageHere></Img> question``).

    When the text has image placeholders (``<image>``, ``<ImageHere>``...) the images go there instead; their
    number must then match ``num_images`` (``ValueError`` otherwise).
    """
    parsed = parse_content(text)
    slots = sum(isinstance(p, Image) for p in parsed)
    if slots:
        if slots != num_images:
            raise _Skip(f"the text has {slots} image placeholder(s) but the record {num_images} image(s)")
        return Conversation([Turn("user", parsed)])
    parts: list[Any] = [Image() for _ in range(num_images)]
    if text:
        parts.append(Text((" " if num_images else "") + text))
    return Conversation([Turn("user", parts)])


def mcq_prompt_text(
    question: str, options: Mapping[str, str], hint: str = "", instruction: str = MCQ_INSTRUCTION
) -> str:
    """``{hint}\\n{question}\\nA. ...\\nB. ...\\n{instruction}`` (the LLaVA MMBench/ScienceQA prompt)."""
    lines = [hint.strip()] if hint and hint.strip() else []
    lines.append(question.strip())
    lines += [f"{k}. {v}" for k, v in options.items()]
    if instruction:
        lines.append(instruction)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- helpers


def _load_any(path: Path) -> Any:
    """A JSON object, or ``(origin, record | InvalidRecord)`` pairs for JSON lists, JSONL and TSV."""
    return _read_tsv(path) if path.suffix == ".tsv" else read_json_any(path)


def _read_tsv(path: Path) -> list[tuple[str, Any]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images are long fields
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        if not reader.fieldnames:
            raise ValueError(f"{path}: empty TSV file")
        return [(f"{path}:{i + 2}", dict(row)) for i, row in enumerate(reader)]


def _str(rec: Mapping[str, Any], *keys: str, required: bool = True) -> str | None:
    for key in keys:
        value = rec.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise _Skip(f"{key!r} must be a string, got {type(value).__name__}")
        if value.strip():
            return value
    if required:
        raise _Skip(f"missing or empty {' / '.join(repr(k) for k in keys)}")
    return None


def _id_of(rec: Mapping[str, Any], *keys: str, default: Any = None) -> str:
    for key in keys:
        if rec.get(key) is not None and not isinstance(rec[key], (dict, list, bool)):
            return str(rec[key])
    if default is None:
        raise _Skip(f"missing id ({' / '.join(repr(k) for k in keys)})")
    return str(default)


def _images(rec: Mapping[str, Any], root: Path, *keys: str) -> list[ImageLike]:
    for key in keys:
        value = rec.get(key)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, str) and v.strip() for v in values):
            raise _Skip(f"{key!r} must be a non-empty string or list of strings, got {value!r}")
        return [str(root / v) for v in values]
    raise _Skip(f"missing image ({' / '.join(repr(k) for k in keys)})")


def _answers(value: Any) -> list[str]:
    values = value if isinstance(value, list) else [value]
    out = []
    for v in values:
        if isinstance(v, dict):
            v = v.get("answer")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str):
            raise _Skip(f"answers must be strings or {{'answer': str}} objects, got {v!r}")
        out.append(v)
    if not out:
        raise _Skip("empty answer list")
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


class _Builder:
    """Collects records, checks ids are unique, reports skipped records."""

    def __init__(self, task: str, sources: Sequence[Path], prefix: bool) -> None:
        self.task, self.prefix = task, prefix
        self.report = ReadReport(", ".join(str(s) for s in sources))
        self.records: list[EvalRecord] = []
        self.ids: set[str] = set()

    def run(
        self, source: Path, rows: Iterable[tuple[str, Any]],
        parse: Callable[[Any, str], EvalRecord | list[EvalRecord] | None],
    ) -> None:
        for origin, rec in rows:
            try:
                parsed = parse(record_object(rec, _Skip), origin)
            except _Skip as e:
                self.report.skip(origin, str(e))
                continue
            for record in [parsed] if isinstance(parsed, EvalRecord) else parsed or []:
                self.add(record, source, origin)

    def add(self, record: EvalRecord, source: Path, origin: str) -> None:
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


# ---------------------------------------------------------------------------------------------- caption


def _read_caption(b: _Builder, path: Path, data: Any, root: Path, split: str | None, prompt: str) -> None:
    def record(id: str, images: list[ImageLike], refs: list[str]) -> EvalRecord:
        refs = [r for r in refs if isinstance(r, str) and r.strip()]
        if not refs:
            raise _Skip("no reference captions")
        return EvalRecord(id, build_prompt(prompt, len(images)), images, refs)

    if isinstance(data, dict) and "annotations" in data and "images" in data:  # COCO
        refs: dict[str, list[str]] = {}
        for i, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
                b.report.skip(f"{path}:annotations[{i}]", "annotation needs 'image_id' and a string 'caption'")
                continue
            refs.setdefault(str(ann["image_id"]), []).append(ann["caption"])

        def parse_coco(img: dict[str, Any], _: str) -> EvalRecord:
            id = _id_of(img, "id")
            name = img.get("file_name")
            image = str(root / name) if isinstance(name, str) and name else coco_image_path(root, id)
            return record(id, [image], refs.get(id, []))

        b.run(path, ((f"{path}:images[{i}]", img) for i, img in enumerate(data["images"])), parse_coco)
    elif isinstance(data, dict) and isinstance(data.get("images"), list):  # Karpathy dataset_*.json
        want = split or "test"

        def parse_karpathy(img: dict[str, Any], _: str) -> EvalRecord | None:
            if want != "all" and img.get("split") != want and not (want == "train" and img.get("split") == "restval"):
                return None
            name = _str(img, "filename")
            image = str(root / img["filepath"] / name) if isinstance(img.get("filepath"), str) else str(root / name)
            sents = img.get("sentences")
            if not isinstance(sents, list):
                raise _Skip("missing 'sentences' list")
            return record(_id_of(img, "cocoid", "imgid", "id"), [image],
                          [s.get("raw") for s in sents if isinstance(s, dict)])

        b.run(path, ((f"{path}:images[{i}]", img) for i, img in enumerate(data["images"])), parse_karpathy)
    elif isinstance(data, list):  # LAVIS Karpathy lists / JSONL: captions grouped by image
        grouped: dict[str, tuple[str, str, list[ImageLike], list[str]]] = {}  # key -> origin, id, images, refs
        for origin, rec in data:
            try:
                rec = record_object(rec, _Skip)
                images = _images(rec, root, "image", "images")
                caps = rec.get("captions", rec.get("caption", rec.get("references")))
                caps = [c for c in (caps if isinstance(caps, list) else [caps]) if isinstance(c, str) and c.strip()]
                if not caps:
                    raise _Skip("no reference captions ('caption' / 'captions')")
            except _Skip as e:
                b.report.skip(origin, str(e))
                continue
            key = "|".join(str(i) for i in images)
            if key not in grouped:
                digits = re.search(r"(\d+)\.\w+$", str(images[0]))  # COCO_val2014_000000391895.jpg -> 391895
                default = (digits.group(1).lstrip("0") or "0") if digits else key
                grouped[key] = (origin, _id_of(rec, "id", "image_id", default=default), images, [])
            grouped[key][3].extend(caps)
        for origin, id, images, caps in grouped.values():
            b.add(record(id, images, caps), path, origin)
    else:
        raise ValueError(f"{path}: not a caption file (expected COCO annotations, a Karpathy split file or a list)")



# ---------------------------------------------------------------------------------------------- vqa


def _read_vqa(
    b: _Builder, path: Path, data: Any, root: Path, annotations: Mapping[str, Any] | None, instruction: str
) -> None:
    def text(question: str) -> str:
        return f"{question.strip()}\n{instruction}" if instruction else question.strip()

    if isinstance(data, dict) and isinstance(data.get("questions"), list):  # VQAv2 questions file
        subtype = data.get("data_subtype") if isinstance(data.get("data_subtype"), str) else None
        anns = annotations or {}

        def parse_v2(q: dict[str, Any], _: str) -> EvalRecord:
            qid = _id_of(q, "question_id")
            question = _str(q, "question")
            if isinstance(q.get("image"), str):
                image = str(root / q["image"])
            else:
                image = coco_image_path(root, _id_of(q, "image_id"), subtype)
            extra: dict[str, Any] = {"normalize_answers": False}
            refs: list[str] = []
            if annotations is not None:
                ann = anns.get(qid)
                if ann is None:
                    raise _Skip(f"question {qid} has no annotation")
                refs = _answers(ann.get("answers"))
                if isinstance(ann.get("answer_type"), str):
                    extra["answer_type"] = ann["answer_type"]
            return EvalRecord(qid, build_prompt(text(question)), [image], refs, extra)

        b.run(path, ((f"{path}:questions[{i}]", q) for i, q in enumerate(data["questions"])), parse_v2)
    elif isinstance(data, list):

        def parse_simple(rec: dict[str, Any], origin: str) -> EvalRecord:
            images = _images(rec, root, "image", "images")
            question = _str(rec, "question", "text")
            answers = rec.get("answers", rec.get("answer"))
            if answers is None:
                raise _Skip("missing 'answers'")
            id = _id_of(rec, "id", "question_id", default=origin.rsplit(":", 1)[-1])
            extra: dict[str, Any] = {"normalize_answers": True}
            if isinstance(rec.get("answer_type"), str):
                extra["answer_type"] = rec["answer_type"]
            return EvalRecord(id, build_prompt(text(question), len(images)), images, _answers(answers), extra)

        b.run(path, data, parse_simple)
    else:
        raise ValueError(f"{path}: not a VQA file (expected VQAv2 questions or a list of question records)")


def _vqa_annotations(path: Path, data: Any) -> dict[str, Any]:
    if not (isinstance(data, dict) and isinstance(data.get("annotations"), list)):
        raise ValueError(f"{path}: not a VQAv2 annotations file (no 'annotations' list)")
    return {str(a["question_id"]): a for a in data["annotations"] if isinstance(a, dict) and "question_id" in a}


# ---------------------------------------------------------------------------------------------- mcq

_INLINE_OPTIONS = re.compile(r"(?:^|\n|\s)Options?\s*:\s*", re.I)
_OPTION_MARK = re.compile(r"(?:^|(?<=[\s,;]))\(?([A-H])\s*[:.)]\s+")


def split_inline_options(question: str) -> tuple[str, dict[str, str]]:
    """``"What is it?\\nOptions: A: cat, B: dog"`` -> ``("What is it?", {"A": "cat", "B": "dog"})`` (MMStar).

    Also reads option lines (``"A. cat\\nB. dog"``) after the question. Returns ``(question, {})`` when the
    letters found are not A, B, C... in order.
    """
    m = _INLINE_OPTIONS.search(question)
    if m:
        stem, rest = question[: m.start()], question[m.end():]
    else:
        lines = question.split("\n")
        first = next((i for i, line in enumerate(lines) if re.match(r"\s*\(?A\s*[:.)]\s", line)), None)
        if first is None:
            return question, {}
        stem, rest = "\n".join(lines[:first]), "\n".join(lines[first:])
    marks = list(_OPTION_MARK.finditer(rest))
    letters = [mk.group(1) for mk in marks]
    if len(marks) < 2 or letters != list(LETTERS[: len(marks)]) or rest[: marks[0].start()].strip():
        return question, {}
    options = {}
    for mk, nxt in zip(marks, marks[1:] + [None]):
        value = rest[mk.end(): nxt.start() if nxt else len(rest)].strip().rstrip(",;").strip()
        options[mk.group(1)] = value
    return stem.strip(), options


def _options(rec: Mapping[str, Any]) -> dict[str, str]:
    for key in ("options", "choices"):
        value = rec.get(key)
        if value is None:
            continue
        if isinstance(value, dict):
            opts = {str(k).strip().upper(): v for k, v in value.items()}
        elif isinstance(value, list):
            opts = dict(zip(LETTERS, value))
        else:
            raise _Skip(f"{key!r} must be a list or an object, got {type(value).__name__}")
        if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in opts.values()):
            raise _Skip(f"{key!r} values must be strings")
        return {k: str(v) for k, v in opts.items()}
    opts = {}
    for letter in LETTERS[:8]:  # MMBench/VLMEvalKit columns A, B, ...; empty or "nan" means absent
        value = rec.get(letter)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            value = str(value)
        if isinstance(value, str) and value.strip() and value.strip().lower() != "nan":
            opts[letter] = value
        else:
            break
    return opts


def _answer_letter(value: Any, options: Mapping[str, str]) -> str:
    if isinstance(value, bool) or value is None:
        raise _Skip(f"missing or invalid 'answer' {value!r}")
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        index = int(value)  # ScienceQA: 0-based index into the choices
        if not 0 <= index < len(options):
            raise _Skip(f"answer index {index} out of range for {len(options)} options")
        return list(options)[index]
    if not isinstance(value, str):
        raise _Skip(f"'answer' must be a letter, an index or an option text, got {type(value).__name__}")
    text = value.strip()
    m = re.fullmatch(r"\(?([A-Za-z])\)?\.?", text)
    if m and m.group(1).upper() in options:
        return m.group(1).upper()
    matches = [k for k, v in options.items() if v.strip().lower() == text.lower()]
    if len(matches) == 1:
        return matches[0]
    raise _Skip(f"answer {value!r} is not one of the option letters {', '.join(options)}")


def _mcq_records(
    id: str, question: str, options: dict[str, str], answer: Any, images: list[ImageLike], hint: str,
    category: str | None, instruction: str, circular: bool, group: str = "", rotation: int = 0,
) -> list[EvalRecord]:
    """One record, or with ``circular`` one per MMBench CircularEval rotation: ids ``{id}@{r}``, the options of
    rotation ``r`` are ``options[r:] + options[:r]`` (rotation 0 is the original order), all in group ``id``."""
    if not options:
        question, options = split_inline_options(question)
    if len(options) < 2:
        raise _Skip("fewer than two options (give 'options' or A, B, ... columns)")
    if list(options) != list(LETTERS[: len(options)]):
        raise _Skip(f"option letters must be A, B, C... in order, got {', '.join(options)}")
    letter = _answer_letter(answer, options)
    rotations = list(enumerate(circular_options(options))) if circular else [(rotation, list(options.values()))]
    out = []
    for rot, texts in rotations:
        opts = dict(zip(LETTERS, texts))
        extra: dict[str, Any] = {"options": opts, "rotation": rot}
        if category:
            extra["category"] = category
        text = mcq_prompt_text(question, opts, hint, instruction)
        key = f"{id}@{rot}" if circular else id
        answer_r = circular_answer(letter, len(opts), rot) if circular else letter
        out.append(EvalRecord(key, build_prompt(text, len(images)), images, [answer_r], extra, group=group or id))
    return out


def _tsv_image(
    row: Mapping[str, Any], rows_by_index: Mapping[str, Mapping[str, Any]], root: Path, cache: dict[str, bytes]
) -> list[ImageLike]:
    if row.get("image_path"):
        paths = row["image_path"]
        try:
            parsed = json.loads(paths) if paths.startswith("[") else paths
        except json.JSONDecodeError:
            parsed = paths
        return [str(root / p) for p in (parsed if isinstance(parsed, list) else [parsed])]
    data = row.get("image") or ""
    key = str(row.get("index", "")).strip()
    if len(data) < 64 and data.strip().isdigit():  # VLMEvalKit: the image of another row
        key = data.strip()
        data = (rows_by_index.get(key) or {}).get("image") or ""
    if not data:
        raise _Skip("no 'image' (base64) or 'image_path' column")
    if key not in cache:  # rows sharing an image share its bytes
        try:
            cache[key] = base64.b64decode(data, validate=False)
        except (binascii.Error, ValueError) as e:
            raise _Skip(f"'image' is not valid base64 ({e})") from None
    return [cache[key]]


def _read_mcq(
    b: _Builder, path: Path, data: Any, root: Path, split: str | None, instruction: str, circular: bool
) -> None:
    if path.suffix == ".tsv":
        by_index = {str(row.get("index", "")).strip(): row for _, row in data}
        # A TSV that holds circular copies already (index >= 1e6) is evaluated as it is (copies dropped unless
        # circular): it is not rotated again.
        copies = any(i.isdigit() and int(i) >= CIRCULAR_OFFSET for i in by_index)
        decoded: dict[str, bytes] = {}

        def parse_tsv(row: dict[str, Any], _: str) -> list[EvalRecord] | None:
            index = _str(row, "index").strip()
            group, rotation = index, 0
            if index.isdigit() and int(index) >= CIRCULAR_OFFSET:
                if not circular:
                    return None
                group, rotation = str(int(index) % CIRCULAR_OFFSET), int(index) // CIRCULAR_OFFSET
            hint = row.get("hint") or ""
            hint = "" if hint.strip().lower() == "nan" else hint
            return _mcq_records(
                index, _str(row, "question"), _options(row), row.get("answer"),
                _tsv_image(row, by_index, root, decoded), hint, row.get("category") or None, instruction,
                circular and not copies, group, rotation,
            )

        b.run(path, data, parse_tsv)
    elif isinstance(data, dict) and data and all(isinstance(v, dict) and "choices" in v for v in data.values()):
        want = split or "test"  # ScienceQA problems.json: {pid: problem}

        def parse_sqa(rec: dict[str, Any], origin: str) -> EvalRecord | None:
            if (want != "all" and rec.get("split") != want) or not rec.get("image"):
                return None  # other split, or a question without an image (not in ScienceQA-IMG)
            pid = origin.rsplit(":", 1)[-1]
            image = str(root / str(rec.get("split")) / pid / str(rec["image"]))
            return _mcq_records(pid, _str(rec, "question"), _options(rec), rec.get("answer"), [image],
                                rec.get("hint") or "", rec.get("subject"), instruction, circular)

        b.run(path, ((f"{path}:{pid}", rec) for pid, rec in data.items()), parse_sqa)
    elif isinstance(data, list):

        def parse_json(rec: dict[str, Any], origin: str) -> list[EvalRecord]:
            images = _images(rec, root, "image", "images")
            id = _id_of(rec, "id", "index", "question_id", default=origin.rsplit(":", 1)[-1])
            hint = rec.get("hint") if isinstance(rec.get("hint"), str) else ""
            category = rec.get("category") if isinstance(rec.get("category"), str) else None
            return _mcq_records(id, _str(rec, "question"), _options(rec), rec.get("answer"), images, hint,
                                category, instruction, circular)

        b.run(path, data, parse_json)
    else:
        raise ValueError(f"{path}: not a multiple-choice file (expected a TSV, ScienceQA problems.json or a list)")


# ---------------------------------------------------------------------------------------------- pope


def _read_pope(b: _Builder, path: Path, data: Any, root: Path, instruction: str) -> None:
    if not isinstance(data, list):
        raise ValueError(f"{path}: not a POPE file (expected JSON lines or a list of question records)")
    file_category = next((c for c in POPE_CATEGORIES if c in path.stem.lower()), None)

    def parse(rec: dict[str, Any], origin: str) -> EvalRecord:
        images = _images(rec, root, "image", "image_source", "images")
        if "image_source" in rec and "image" not in rec and not Path(images[0]).suffix:
            images = [images[0] + ".jpg"]
        question = _str(rec, "text", "question")
        label = _str(rec, "label", "answer").strip().lower()
        if label not in ("yes", "no"):
            raise _Skip(f"label must be 'yes' or 'no', got {label!r}")
        id = _id_of(rec, "question_id", "id", default=origin.rsplit(":", 1)[-1])
        text = f"{question.strip()}\n{instruction}" if instruction else question.strip()
        category = rec.get("category") if isinstance(rec.get("category"), str) else file_category
        extra = {"category": category} if category else {}
        return EvalRecord(id, build_prompt(text, len(images)), images, [label], extra)

    b.run(path, data, parse)


# ---------------------------------------------------------------------------------------------- entry point


def load_task(
    task: str,
    data: str | Path | Sequence[str | Path],
    images: str | Path | None = None,
    *,
    annotations: str | Path | None = None,
    split: str | None = None,
    prompt: str | None = None,
    circular: bool = False,
) -> TaskData:
    """Read an eval set. ``images``: folder the image paths are relative to (default: each data file's folder).
    ``prompt``: replaces the task's instruction (caption: the whole prompt). ``split``: Karpathy/ScienceQA split
    (default ``test``; ``all`` keeps every split). ``circular``: MMBench CircularEval rotations (mcq)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")
    paths = [Path(p) for p in ([data] if isinstance(data, (str, Path)) else data)]
    if not paths:
        raise ValueError("no data file given")
    for p in [*paths, *([Path(annotations)] if annotations else [])]:
        if not p.is_file():
            raise FileNotFoundError(f"data file not found: {p}")
    instruction = DEFAULT_PROMPTS[task] if prompt is None else prompt
    loaded = [(p, _load_any(p)) for p in paths]

    vqa_anns: dict[str, Any] | None = None
    if task == "vqa":
        ann_files = [(p, d) for p, d in loaded if isinstance(d, dict) and "annotations" in d and "questions" not in d]
        if annotations:
            ann_files.append((Path(annotations), _load_any(Path(annotations))))
        if ann_files:
            vqa_anns = {}
            for p, d in ann_files:
                vqa_anns.update(_vqa_annotations(p, d))
        loaded = [(p, d) for p, d in loaded if not any(p == a for a, _ in ann_files)]
        if not loaded:
            raise ValueError("only annotation files given: pass the VQAv2 questions file too")
    elif annotations:
        raise ValueError("annotations= is for the vqa task (VQAv2 annotations); other tasks read one file each")

    b = _Builder(task, [p for p, _ in loaded], prefix=len(loaded) > 1)
    for path, content in loaded:
        root = Path(images) if images is not None else path.parent
        if task == "caption":
            _read_caption(b, path, content, root, split, instruction)
        elif task == "vqa":
            _read_vqa(b, path, content, root, vqa_anns, instruction)
        elif task == "mcq":
            _read_mcq(b, path, content, root, split, instruction, circular)
        else:
            _read_pope(b, path, content, root, instruction)
    return b.finish([p for p, _ in loaded])


def apply_limit(records: Sequence[EvalRecord], limit: int | None) -> list[EvalRecord]:
    """The records of the first ``limit`` questions (all rotations of a circular question count as one)."""
    if limit is None:
        return list(records)
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    keep: set[str] = set()
    for r in records:
        if len(keep) >= limit:
            break
        keep.add(r.group)
    return [r for r in records if r.group in keep]
