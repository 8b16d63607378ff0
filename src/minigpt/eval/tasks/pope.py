"""POPE: yes/no questions about objects in the image, scored as RUCAIBox/POPE ``evaluate.py`` scores them.

Prompt: ``{question}\\n`` + :data:`PROMPT` ("Answer yes or no.").

Inputs: POPE JSON/JSONL ``{"question_id", "image", "text", "label": "yes"|"no"}`` (``question``/``answer``
accepted too); the category (random/popular/adversarial) comes from a ``category`` field or the file name.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import metrics as M
from .base import (
    Builder,
    EvalRecord,
    ReadOptions,
    Scores,
    Skip,
    Task,
    build_prompt,
    field_str,
    record_id,
    record_images,
    scored,
)

PROMPT = "Answer yes or no."
CATEGORIES = ("random", "popular", "adversarial")


class Pope(Task):
    name = "pope"
    prompt = PROMPT
    scorers = {"pope": "RUCAIBox/POPE evaluate.py (its yes/no parsing included)"}
    inputs = "POPE JSON(L)"

    def read_file(self, b: Builder, path: Path, data: Any, root: Path, options: ReadOptions) -> None:
        if not isinstance(data, list):
            raise ValueError(f"{path}: not a POPE file (expected JSON lines or a list of question records)")
        file_category = next((c for c in CATEGORIES if c in path.stem.lower()), None)
        instruction = options.instruction

        def parse(rec: dict[str, Any], origin: str) -> EvalRecord:
            images = record_images(rec, root, "image", "image_source", "images")
            if "image_source" in rec and "image" not in rec and not Path(images[0]).suffix:
                images = [images[0] + ".jpg"]
            question = field_str(rec, "text", "question")
            label = field_str(rec, "label", "answer").strip().lower()
            if label not in ("yes", "no"):
                raise Skip(f"label must be 'yes' or 'no', got {label!r}")
            id = record_id(rec, "question_id", "id", default=origin.rsplit(":", 1)[-1])
            text = f"{question.strip()}\n{instruction}" if instruction else question.strip()
            category = rec.get("category") if isinstance(rec.get("category"), str) else file_category
            extra = {"category": category} if category else {}
            return EvalRecord(id, build_prompt(text, len(images)), images, [label], extra)

        b.run(path, data, parse)

    def score(
        self, records: Sequence[EvalRecord], predictions: Mapping[str, str], scorer: str, meteor: bool | None = None
    ) -> Scores:
        """Accuracy, precision, recall, F1 (positive class "yes"), yes-ratio over the predicted records, and
        ``per_category``; one row per record with the parsed answer."""
        recs = scored(records, predictions)

        def metrics(rs: list[EvalRecord]) -> dict[str, Any]:
            return {**M.pope_metrics([predictions[r.id] for r in rs], [r.references[0] for r in rs]), "n": len(rs)}

        out = self.totals(scorer, **metrics(recs))
        cats = defaultdict(list)
        for r in recs:
            if r.extra.get("category"):
                cats[r.extra["category"]].append(r)
        if cats:
            out["per_category"] = {c: metrics(rs) for c, rs in sorted(cats.items())}
        rows = []
        for r in recs:
            parsed = M.parse_yes_no(predictions[r.id])
            category = {"category": r.extra["category"]} if r.extra.get("category") else {}
            rows.append(
                {
                    "id": r.id,
                    "parsed": parsed,
                    "label": r.references[0],
                    "correct": parsed == r.references[0],
                    "prediction": predictions[r.id],
                    **category,
                }
            )
        return Scores(out, rows)


TASK = Pope()
