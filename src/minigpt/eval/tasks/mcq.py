"""Multiple choice (MMBench, ScienceQA, MMStar, SEED...): one letter per question, MMBench CircularEval.

Prompt: ``{hint}\\n{question}\\nA. {option}\\nB. {option}...\\n`` + :data:`PROMPT` ("Answer with the option's letter
from the given choices directly."); the hint line only when there is one.

Inputs: MMBench/VLMEvalKit TSV (``index, question, hint, A, B, ..., answer, category``, ``image`` as base64 or
``image_path``; an ``index`` >= 1,000,000 marks a circular copy of question ``index % 1,000,000``); ScienceQA
``problems.json`` (records with an image, ``split`` defaults to ``test``; images at ``{split}/{pid}/{image}``); or
JSON/JSONL ``{"id", "image", "question", "options": [str] | {"A": str}, "answer": letter | index | text, "hint"?,
"category"?}`` (``choices`` is accepted for ``options``). Without options, they are parsed from the question text
(MMStar: ``"...\\nOptions: A: x, B: y"``). ``circular=True`` adds MMBench CircularEval rotations.

Scoring: the answer letter is extracted by VLMEvalKit's exact matcher (``vlmevalkit``, default: its rules up to
August 2025; ``vlmevalkit2025`` and ``vlmevalkit2026`` its later rules) or minigpt's own
(``minigpt``), see :data:`~minigpt.eval.metrics.CHOICE_EXTRACTORS`. As in VLMEvalKit, every question of the data
counts: one without a prediction, or whose answer names no option, is a miss; a circular question is a hit only
when every rotation is.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...data.conversation import ImageLike
from .. import metrics as M
from ..metrics import LETTERS, circular_answer, circular_options
from .base import (
    Builder,
    EvalRecord,
    ReadOptions,
    Scores,
    Skip,
    Task,
    build_prompt,
    field_str,
    mean,
    record_id,
    record_images,
)

PROMPT = "Answer with the option's letter from the given choices directly."
#: MMBench TSVs mark circular copies with ``index = question_index + k * CIRCULAR_OFFSET``.
CIRCULAR_OFFSET = 1_000_000


def mcq_prompt_text(question: str, options: Mapping[str, str], hint: str = "", instruction: str = PROMPT) -> str:
    """``{hint}\\n{question}\\nA. ...\\nB. ...\\n{instruction}`` (the LLaVA MMBench/ScienceQA prompt)."""
    lines = [hint.strip()] if hint and hint.strip() else []
    lines.append(question.strip())
    lines += [f"{k}. {v}" for k, v in options.items()]
    if instruction:
        lines.append(instruction)
    return "\n".join(lines)


_INLINE_OPTIONS = re.compile(r"(?:^|\n|\s)Options?\s*:\s*", re.I)
_OPTION_MARK = re.compile(r"(?:^|(?<=[\s,;]))\(?([A-H])\s*[:.)]\s+")


def split_inline_options(question: str) -> tuple[str, dict[str, str]]:
    """``"What is it?\\nOptions: A: cat, B: dog"`` -> ``("What is it?", {"A": "cat", "B": "dog"})`` (MMStar).

    Also reads option lines (``"A. cat\\nB. dog"``) after the question. Returns ``(question, {})`` when the
    letters found are not A, B, C... in order.
    """
    m = _INLINE_OPTIONS.search(question)
    if m:
        stem, rest = question[: m.start()], question[m.end() :]
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
        value = rest[mk.end() : nxt.start() if nxt else len(rest)].strip().rstrip(",;").strip()
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
            raise Skip(f"{key!r} must be a list or an object, got {type(value).__name__}")
        if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in opts.values()):
            raise Skip(f"{key!r} values must be strings")
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
        raise Skip(f"missing or invalid 'answer' {value!r}")
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        index = int(value)  # ScienceQA: 0-based index into the choices
        if not 0 <= index < len(options):
            raise Skip(f"answer index {index} out of range for {len(options)} options")
        return list(options)[index]
    if not isinstance(value, str):
        raise Skip(f"'answer' must be a letter, an index or an option text, got {type(value).__name__}")
    text = value.strip()
    m = re.fullmatch(r"\(?([A-Za-z])\)?\.?", text)
    if m and m.group(1).upper() in options:
        return m.group(1).upper()
    matches = [k for k, v in options.items() if v.strip().lower() == text.lower()]
    if len(matches) == 1:
        return matches[0]
    raise Skip(f"answer {value!r} is not one of the option letters {', '.join(options)}")


@dataclass(frozen=True)
class _Question:
    """One multiple-choice question as a file gives it: ``options`` may be empty (then parsed from the question
    text); ``group``/``rotation`` place a TSV's circular copy (``group`` "" means its own ``id``)."""

    id: str
    question: str
    options: dict[str, str]
    answer: Any
    images: list[ImageLike]
    hint: str = ""
    category: str | None = None
    group: str = ""
    rotation: int = 0


def _mcq_records(q: _Question, instruction: str, circular: bool) -> list[EvalRecord]:
    """One record, or with ``circular`` one per MMBench CircularEval rotation: ids ``{id}@{r}``, the options of
    rotation ``r`` are ``options[r:] + options[:r]`` (rotation 0 is the original order), all in group ``id``."""
    question, options, images, id = q.question, q.options, q.images, q.id
    if not options:
        question, options = split_inline_options(question)
    if len(options) < 2:
        raise Skip("fewer than two options (give 'options' or A, B, ... columns)")
    if list(options) != list(LETTERS[: len(options)]):
        raise Skip(f"option letters must be A, B, C... in order, got {', '.join(options)}")
    letter = _answer_letter(q.answer, options)
    rotations = list(enumerate(circular_options(options))) if circular else [(q.rotation, list(options.values()))]
    out = []
    for rot, texts in rotations:
        opts = dict(zip(LETTERS, texts))
        extra: dict[str, Any] = {"options": opts, "rotation": rot}
        if q.category:
            extra["category"] = q.category
        text = mcq_prompt_text(question, opts, q.hint, instruction)
        key = f"{id}@{rot}" if circular else id
        answer_r = circular_answer(letter, len(opts), rot) if circular else letter
        out.append(EvalRecord(key, build_prompt(text, len(images)), images, [answer_r], extra, group=q.group or id))
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
        raise Skip("no 'image' (base64) or 'image_path' column")
    if key not in cache:  # rows sharing an image share its bytes
        try:
            cache[key] = base64.b64decode(data, validate=False)
        except (binascii.Error, ValueError) as e:
            raise Skip(f"'image' is not valid base64 ({e})") from None
    return [cache[key]]


class MultipleChoice(Task):
    name = "mcq"
    prompt = PROMPT
    scorers = {name: reference for name, (_, reference) in M.CHOICE_EXTRACTORS.items()}
    inputs = "MMBench TSV / ScienceQA problems.json / JSON(L)"

    def read_file(self, b: Builder, path: Path, data: Any, root: Path, options: ReadOptions) -> None:
        split, instruction, circular = options.split, options.instruction, options.circular
        if path.suffix == ".tsv":
            by_index = {str(row.get("index", "")).strip(): row for _, row in data}
            # A TSV that holds circular copies already (index >= 1e6) is evaluated as it is (copies dropped unless
            # circular): it is not rotated again.
            copies = any(i.isdigit() and int(i) >= CIRCULAR_OFFSET for i in by_index)
            decoded: dict[str, bytes] = {}

            def parse_tsv(row: dict[str, Any], _: str) -> list[EvalRecord] | None:
                index = field_str(row, "index").strip()
                group, rotation = index, 0
                if index.isdigit() and int(index) >= CIRCULAR_OFFSET:
                    if not circular:
                        return None
                    group, rotation = str(int(index) % CIRCULAR_OFFSET), int(index) // CIRCULAR_OFFSET
                hint = row.get("hint") or ""
                hint = "" if hint.strip().lower() == "nan" else hint
                question = _Question(
                    index,
                    field_str(row, "question"),
                    _options(row),
                    row.get("answer"),
                    _tsv_image(row, by_index, root, decoded),
                    hint,
                    row.get("category") or None,
                    group,
                    rotation,
                )
                return _mcq_records(question, instruction, circular and not copies)

            b.run(path, data, parse_tsv)
        elif isinstance(data, dict) and data and all(isinstance(v, dict) and "choices" in v for v in data.values()):
            want = split or "test"  # ScienceQA problems.json: {pid: problem}

            def parse_sqa(rec: dict[str, Any], origin: str) -> EvalRecord | None:
                if (want != "all" and rec.get("split") != want) or not rec.get("image"):
                    return None  # other split, or a question without an image (not in ScienceQA-IMG)
                pid = origin.rsplit(":", 1)[-1]
                image = str(root / str(rec.get("split")) / pid / str(rec["image"]))
                question = _Question(
                    pid,
                    field_str(rec, "question"),
                    _options(rec),
                    rec.get("answer"),
                    [image],
                    rec.get("hint") or "",
                    rec.get("subject"),
                )
                return _mcq_records(question, instruction, circular)

            b.run(path, ((f"{path}:{pid}", rec) for pid, rec in data.items()), parse_sqa)
        elif isinstance(data, list):

            def parse_json(rec: dict[str, Any], origin: str) -> list[EvalRecord]:
                images = record_images(rec, root, "image", "images")
                id = record_id(rec, "id", "index", "question_id", default=origin.rsplit(":", 1)[-1])
                hint = rec.get("hint") if isinstance(rec.get("hint"), str) else ""
                category = rec.get("category") if isinstance(rec.get("category"), str) else None
                question = _Question(
                    id, field_str(rec, "question"), _options(rec), rec.get("answer"), images, hint, category
                )
                return _mcq_records(question, instruction, circular)

            b.run(path, data, parse_json)
        else:
            raise ValueError(f"{path}: not a multiple-choice file (expected a TSV, ScienceQA problems.json or a list)")

    def score(
        self, records: Sequence[EvalRecord], predictions: Mapping[str, str], scorer: str, meteor: bool | None = None
    ) -> Scores:
        """``accuracy`` over the questions in their original option order (rotation 0), ``unparsed`` (predictions
        naming no option), ``missing`` (records without a prediction); with rotations ``circular_accuracy`` over
        ``n_circular`` questions (``incomplete_questions``: those with a rotation missing); ``per_category``.
        One row per question: ``hit`` and each rotation's answer, choice and prediction."""
        extract = M.CHOICE_EXTRACTORS[scorer][0]
        predicted = [r for r in records if r.id in predictions]
        if not predicted:
            raise ValueError("no predictions to score")
        choice = {r.id: extract(predictions[r.id], r.extra["options"]) for r in predicted}
        right = {r.id: r.id in choice and choice[r.id] == r.references[0] for r in records}
        groups: dict[str, list[EvalRecord]] = defaultdict(list)
        for r in records:
            groups[r.group].append(r)
        hits = {g: all(right[r.id] for r in rs) for g, rs in groups.items()}
        first = [r for r in records if not r.extra.get("rotation")]
        out = self.totals(
            scorer,
            accuracy=mean(right[r.id] for r in first),
            n=len(first),
            unparsed=mean(c is None for c in choice.values()),
            missing=len(records) - len(predicted),
        )
        circular = any(len(rs) > 1 for rs in groups.values())
        if circular:
            out["circular_accuracy"] = mean(hits.values())
            out["n_circular"] = len(groups)
            out["incomplete_questions"] = sum(any(r.id not in choice for r in rs) for rs in groups.values())
        cats: dict[str, list[bool]] = defaultdict(list)
        for r in first if not circular else [rs[0] for rs in groups.values()]:
            if r.extra.get("category"):
                cats[r.extra["category"]].append(hits[r.group] if circular else right[r.id])
        if cats:
            out["per_category"] = {c: mean(v) for c, v in sorted(cats.items())}
        rows = [
            {
                "group": g,
                "hit": int(hits[g]),
                "rotations": [
                    {
                        "id": r.id,
                        "answer": r.references[0],
                        "choice": choice.get(r.id),
                        "prediction": predictions.get(r.id),
                    }
                    for r in rs
                ],
            }
            for g, rs in groups.items()
        ]
        return Scores(out, rows)


TASK = MultipleChoice()
