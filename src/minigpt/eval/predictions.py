"""Read an existing predictions file, to score it without a model.

Formats, detected per entry:

- minigpt's ``predictions.jsonl``: ``{"id", "prediction", ...}``;
- LLaVA-style answer files: ``{"question_id", "text", ...}`` (``round_id``: the CircularEval rotation of LLaVA's
  MMBench answers, matched to record ``{question_id}@{round_id}``);
- lmms-eval sample logs (``--log_samples``; JSONL, or JSON with a ``logs`` list): ``{"doc_id", "doc",
  "filtered_resps", "resps", ...}``, matched by the document's ``question_id`` / ``index`` / ``id`` / ``pid``
  (a COCO file name such as ``COCO_val2014_000000391895.jpg`` also matches image id ``391895``), else by ``doc_id``.

Entries are matched to the eval set's record ids; one that matches none, or that is malformed, is reported by
file and line in the returned :class:`~minigpt.eval.runner.Problems`, never fatal.
"""

from __future__ import annotations

import json
import re
from collections.abc import Container, Iterator
from pathlib import Path
from typing import Any, Protocol

_DOC_ID_KEYS = ("question_id", "index", "id", "pid")
_COCO_NAME = re.compile(r"(\d+)\.\w+$")


class _Problems(Protocol):
    def add(self, kind: str, where: str, message: str) -> None: ...


def _entries(path: Path) -> Iterator[tuple[str, Any]]:
    """``(origin, entry)`` for each line of a JSONL file, or each element of a JSON list / ``logs`` list."""
    text = path.read_text(encoding="utf-8")
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


def _candidates(entry: dict[str, Any]) -> tuple[list[str], str | None]:
    """Possible record ids of an entry, most specific first, and its prediction (``None``: not a known format)."""
    if "prediction" in entry and "id" in entry:
        return [str(entry["id"])], _text(entry["prediction"])
    if "doc_id" in entry and ("filtered_resps" in entry or "resps" in entry):
        doc = entry.get("doc") if isinstance(entry.get("doc"), dict) else {}
        ids = [str(doc[k]) for k in _DOC_ID_KEYS if isinstance(doc.get(k), (str, int))]
        ids += [m.group(1).lstrip("0") or "0" for i in ids if (m := _COCO_NAME.search(i))]
        answer = _text(entry.get("filtered_resps"))
        return ids or [str(entry["doc_id"])], answer if answer is not None else _text(entry.get("resps"))
    if "question_id" in entry and "text" in entry:
        qid = str(entry["question_id"])
        rotation = [f"{qid}@{entry['round_id']}"] if isinstance(entry.get("round_id"), int) else []
        return [*rotation, qid], _text(entry["text"])
    return [], None


def read_prediction_file(path: str | Path, record_ids: Container[str], problems: _Problems) -> dict[str, str]:
    """``{record id: prediction}`` from a predictions file in any of the formats above. Malformed entries
    (``bad_prediction_line``), entries matching no record (``unmatched_prediction``) and repeated ids
    (``duplicate_prediction``, the last one kept) are reported in ``problems``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file not found: {path}")
    out: dict[str, str] = {}
    for origin, entry in _entries(path):
        if isinstance(entry, Exception) or not isinstance(entry, dict):
            problems.add("bad_prediction_line", origin, f"not a JSON object ({entry})")
            continue
        ids, answer = _candidates(entry)
        if answer is None:
            problems.add(
                "bad_prediction_line",
                origin,
                "expected {'id', 'prediction'} (minigpt), {'question_id', "
                "'text'} (LLaVA) or {'doc_id', 'doc', 'filtered_resps'} (lmms-eval) with a string answer",
            )
            continue
        id = next((i for i in ids if i in record_ids), None)
        if id is None:
            problems.add("unmatched_prediction", origin, f"no record of the eval set has id {' / '.join(ids)}")
            continue
        if id in out:
            problems.add("duplicate_prediction", origin, f"a second prediction for {id!r} (the last one is kept)")
        out[id] = answer
    return out
