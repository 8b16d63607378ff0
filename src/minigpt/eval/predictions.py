"""Read an existing predictions file, to score it without a model.

Formats, detected per entry (JSON Lines, a JSON list, or JSON with a ``logs`` list, whatever the extension):

- minigpt's ``predictions.jsonl``: ``{"id", "prediction", ...}``;
- LLaVA-style answer files: ``{"question_id", "text", ...}`` (``round_id``: the CircularEval rotation of LLaVA's
  MMBench answers, matched to record ``{question_id}@{round_id}``);
- lmms-eval sample logs (``--log_samples``): up to v0.3 ``{"doc_id", "doc", "target", "resps", "filtered_resps",
  ...}``, matched by the document's ``question_id`` / ``index`` / ``id`` / ``pid`` (a COCO file name such as
  ``COCO_val2014_000000391895.jpg`` also matches image id ``391895``); from v0.4 on the ``doc`` is dropped, and the
  same ids are read from the per-sample metric objects the task logs (POPE's ``{"question_id", ...}``, MMBench's
  ``{"index", ...}``), else the ``doc_id`` (the row's position in the task's dataset split) is matched to the
  row's position in the data file (one data file only).

An entry's ids are tried against the records' ids, then against their ids within their own data file (ids are
prefixed with the file name when several are read); the ``category`` and ``target`` an lmms-eval entry carries
must agree with the record's. Matching is one to one: an entry that matches no record, several records, or a
record another entry matched stops the scoring with a :class:`PredictionMatchError` naming the entries (a
number computed on wrongly attached answers is worse than none). Malformed entries are reported by file and
line in the returned :class:`~minigpt.eval.runner.Problems`.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .tasks import EvalRecord

_DOC_ID_KEYS = ("question_id", "index", "id", "pid")
_COCO_NAME = re.compile(r"(\d+)\.\w+$")
#: Entries named in a :class:`PredictionMatchError` (the rest are counted).
MAX_NAMED = 5


class PredictionMatchError(ValueError):
    """Predictions that cannot be attached one to one to the eval set's records."""


class _Problems(Protocol):
    def add(self, kind: str, where: str, message: str) -> None: ...


@dataclass
class Entry:
    """One prediction of a file: its answer and what identifies its record."""

    origin: str
    answer: str
    ids: list[str]
    doc_id: int | None = None
    checks: dict[str, str] = field(default_factory=dict)  # lmms-eval: category / target the record must have


def _entries(path: Path) -> Iterator[tuple[str, Any]]:
    """``(origin, entry)`` for each line of a JSONL file, or each element of a JSON list / ``logs`` list."""
    text = path.read_text(encoding="utf-8-sig")
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")):
        try:
            whole = json.loads(text)
        except ValueError:
            whole = None  # JSONL
        if isinstance(whole, dict) and isinstance(whole.get("logs"), list):
            whole = whole["logs"]
        if isinstance(whole, list):
            yield from ((f"{path}[{i}]", e) for i, e in enumerate(whole))
            return
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except ValueError as e:
                yield f"{path}:{lineno}", e


def _text(value: Any) -> str | None:
    """The first string in a (nested) list of responses."""
    while isinstance(value, list) and value:
        value = value[0]
    return value if isinstance(value, str) else None


def _lmms_doc(entry: dict[str, Any]) -> dict[str, Any]:
    """What identifies an lmms-eval sample's document: its ``doc`` (up to v0.3), else the fields of the per-sample
    metric objects (v0.4+ logs drop ``doc``; tasks log ``question_id`` / ``index`` there)."""
    if isinstance(entry.get("doc"), dict):
        return entry["doc"]
    merged: dict[str, Any] = {}
    for value in entry.values():
        if isinstance(value, dict) and any(k in value for k in _DOC_ID_KEYS):
            merged = {**value, **merged}
    return merged


def _lmms_entry(origin: str, entry: dict[str, Any]) -> Entry | None:
    answer = _text(entry.get("filtered_resps"))
    answer = answer if answer is not None else _text(entry.get("resps"))
    if answer is None:
        return None
    doc = _lmms_doc(entry)
    ids = [str(doc[k]) for k in _DOC_ID_KEYS if isinstance(doc.get(k), (str, int)) and not isinstance(doc[k], bool)]
    ids += [m.group(1).lstrip("0") or "0" for i in ids if (m := _COCO_NAME.search(i))]
    checks = {"category": doc["category"]} if isinstance(doc.get("category"), str) else {}
    if isinstance(entry.get("target"), str) and entry["target"].strip():
        checks["target"] = entry["target"]
    doc_id = entry["doc_id"] if isinstance(entry.get("doc_id"), int) else None
    return Entry(origin, answer, ids, None if ids else doc_id, checks)


def parse_entry(origin: str, entry: dict[str, Any]) -> Entry | None:
    """The :class:`Entry` of a minigpt, LLaVA or lmms-eval prediction; ``None``: not a known format."""
    if "prediction" in entry and "id" in entry:
        answer = _text(entry["prediction"])
        return None if answer is None else Entry(origin, answer, [str(entry["id"])])
    if "doc_id" in entry and ("filtered_resps" in entry or "resps" in entry):
        return _lmms_entry(origin, entry)
    if "question_id" in entry and "text" in entry:
        answer = _text(entry["text"])
        qid = str(entry["question_id"])
        rotation = [f"{qid}@{entry['round_id']}"] if isinstance(entry.get("round_id"), int) else []
        return None if answer is None else Entry(origin, answer, [*rotation, qid])
    return None


class _Index:
    """The records, by id, by id within their file and by row, to match entries against."""

    def __init__(self, records: Sequence[EvalRecord]) -> None:
        self.by_id = {r.id: r for r in records}
        self.by_local: dict[str, list[EvalRecord]] = defaultdict(list)
        self.by_row: dict[int, list[EvalRecord]] = defaultdict(list)
        for r in records:
            self.by_local[r.local_id].append(r)
            if r.row is not None:
                self.by_row[r.row].append(r)

    def match(self, e: Entry) -> tuple[list[EvalRecord], str]:
        """The records ``e`` may belong to, and what was looked up."""
        for id in e.ids:
            found = [self.by_id[id]] if id in self.by_id else self.by_local.get(id, [])
            found = [r for r in found if _agrees(r, e.checks)]
            if found:
                return found, f"id {id}"
        if e.doc_id is not None:  # rows of several data files, or rotations of one row: ambiguous
            return [r for r in self.by_row.get(e.doc_id, []) if _agrees(r, e.checks)], f"doc_id {e.doc_id} (a row)"
        return [], f"id {' / '.join(e.ids)}" if e.ids else "no id"


def _agrees(record: EvalRecord, checks: dict[str, str]) -> bool:
    """Whether an lmms-eval entry's ``category`` and ``target`` (when both sides have one) are the record's."""
    category = record.extra.get("category")
    if "category" in checks and isinstance(category, str) and category != checks["category"]:
        return False
    if "target" in checks and len(record.references) == 1:
        return record.references[0].strip().lower() == checks["target"].strip().lower()
    return True


def read_prediction_file(
    path: str | Path, records: Sequence[EvalRecord], problems: _Problems, source: str | None = None
) -> dict[str, str]:
    """``{record id: prediction}`` from a predictions file in any of the formats above, matched one to one to
    ``records`` (only those of data file ``source``, a file name without extension, when given).

    Malformed entries (``bad_prediction_line``) are reported in ``problems``; an entry that matches no record,
    several records, or a record already matched raises :class:`PredictionMatchError` naming the entries.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file not found: {path}")
    index = _Index([r for r in records if source is None or r.source == source])
    out: dict[str, str] = {}
    first: dict[str, str] = {}
    failures: list[str] = []
    for origin, raw in _entries(path):
        entry = parse_entry(origin, raw) if isinstance(raw, dict) else None
        if entry is None:
            why = f"not a JSON object ({raw})" if not isinstance(raw, dict) else _EXPECTED
            problems.add("bad_prediction_line", origin, why)
            continue
        found, looked_up = index.match(entry)
        if not found:
            failures.append(f"{origin}: no record has {looked_up}{_checked(entry)}")
        elif len(found) > 1:
            names = ", ".join(r.id for r in found[:3]) + (", ..." if len(found) > 3 else "")
            failures.append(f"{origin}: {looked_up} fits {len(found)} records ({names})")
        elif found[0].id in out:
            failures.append(f"{origin}: a second prediction for record {found[0].id!r} (first: {first[found[0].id]})")
        else:
            out[found[0].id] = entry.answer
            first[found[0].id] = origin
    if failures:
        more = f"; and {len(failures) - MAX_NAMED} more" if len(failures) > MAX_NAMED else ""
        raise PredictionMatchError(
            f"{path}: {len(failures)} prediction(s) cannot be matched one to one to the records of the eval set "
            f"(nothing scored): {'; '.join(failures[:MAX_NAMED])}{more}"
        )
    return out


_EXPECTED = (
    "expected {'id', 'prediction'} (minigpt), {'question_id', 'text'} (LLaVA) or {'doc_id', 'filtered_resps'} "
    "(lmms-eval) with a string answer"
)


def _checked(entry: Entry) -> str:
    return "".join(f" and {k} {v!r}" for k, v in entry.checks.items())
