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
    mean,
    record_id,
    record_images,
    scored,
)

PROMPT = "Answer yes or no."
_MEANS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
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
        """Accuracy, precision, recall, F1 (positive class "yes"), yes-ratio and TP/FP/TN/FN over the predicted
        records, ``per_category``, ``per_file`` (several data files) and ``mean`` (over the categories, else the
        files: the number POPE tables report); one row per record with the parsed answer."""
        recs = scored(records, predictions)

        def metrics(rs: list[EvalRecord]) -> dict[str, Any]:
            return {**M.pope_metrics([predictions[r.id] for r in rs], [r.references[0] for r in rs]), "n": len(rs)}

        out = self.totals(scorer, **metrics(recs))
        cats, files = defaultdict(list), defaultdict(list)
        for r in recs:
            files[r.source].append(r)
            if r.extra.get("category"):
                cats[r.extra["category"]].append(r)
        if cats:
            out["per_category"] = {c: metrics(rs) for c, rs in sorted(cats.items())}
        if len(files) > 1:
            out["per_file"] = {f: metrics(rs) for f, rs in files.items()}
        groups = out.get("per_category") if len(cats) > 1 else out.get("per_file")
        if groups:  # what papers report for POPE: the mean over the three categories
            out["mean"] = {k: mean(g[k] for g in groups.values()) for k in _MEANS}
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

    def summary(self, totals: Mapping[str, Any]) -> str | None:
        """LLaVA ``eval_pope.py``'s printout for each category (or file), then the mean over them."""
        groups = totals.get("per_category") or totals.get("per_file") or {"all": totals}
        text = "\n".join(M.llava_pope_report(c, m) for c, m in groups.items())
        if "mean" in totals:
            m = totals["mean"]
            text += f"\nMean over {len(groups)}: " + ", ".join(f"{k} {m[k]:.3f}" for k in _MEANS)
        return text


TASK = Pope()
