"""Captioning: COCO-style reference captions, scored by pycocoevalcap's ``COCOEvalCap`` metrics.

Prompt: :data:`PROMPT` ("Describe this image in one short sentence."); pass ``prompt=""`` for a stage-1
(``caption`` template) model, which expects the image alone.

Inputs: COCO annotations (``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``, several
captions per image; images without ``file_name`` are looked up under COCO names), the Karpathy split file
``dataset_coco.json`` (``{"images": [{"filepath", "filename", "split", "sentences": [{"raw"}]}]}``, ``split``
defaults to ``test``), LAVIS Karpathy lists (``[{"image", "caption": str | [str]}]``), or JSONL
``{"id", "image", "captions": [str]}``. Blank reference captions are kept, as COCOEvalCap keeps them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...data.conversation import ImageLike
from ...data.formats import record_object
from .. import metrics as M
from .base import (
    Builder,
    EvalRecord,
    ReadOptions,
    Scores,
    Skip,
    Task,
    build_prompt,
    coco_image_path,
    field_str,
    record_id,
    record_images,
    scored,
)

PROMPT = "Describe this image in one short sentence."
_NO_JAVA = (
    "Java not found: METEOR missing; BLEU, ROUGE_L and CIDEr use minigpt's fallback tokenizer instead of "
    "PTBTokenizer (it differs on e-mail addresses, 'C#' and time ranges like 3:15-4:00; on captions full of such "
    "constructs BLEU-4 was off by 0.006 and CIDEr by 0.023)"
)


def _captions(value: Any) -> list[str]:
    """The reference captions of a record, blank ones included; ``Skip`` when there is none."""
    caps = [c for c in (value if isinstance(value, list) else [value]) if isinstance(c, str)]
    if not caps:
        raise Skip("no reference captions ('caption' / 'captions')")
    return caps


class Caption(Task):
    name = "caption"
    prompt = PROMPT
    max_new_tokens = 30
    scorers = {"coco": "pycocoevalcap COCOEvalCap (PTBTokenizer; BLEU-1..4, METEOR 1.5, ROUGE-L, CIDEr-D)"}
    inputs = "COCO/Karpathy captions"

    def read_file(self, b: Builder, path: Path, data: Any, root: Path, options: ReadOptions) -> None:
        prompt = options.instruction

        def record(id: str, images: list[ImageLike], refs: list[Any]) -> EvalRecord:
            return EvalRecord(id, build_prompt(prompt, len(images)), images, _captions(refs))

        if isinstance(data, dict) and "annotations" in data and "images" in data:  # COCO
            refs: dict[str, list[str]] = {}
            for i, ann in enumerate(data["annotations"]):
                if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
                    b.report.skip(f"{path}:annotations[{i}]", "annotation needs 'image_id' and a string 'caption'")
                    continue
                refs.setdefault(str(ann["image_id"]), []).append(ann["caption"])

            def parse_coco(img: dict[str, Any], _: str) -> EvalRecord:
                id = record_id(img, "id")
                name = img.get("file_name")
                image = str(root / name) if isinstance(name, str) and name else coco_image_path(root, id)
                return record(id, [image], refs.get(id, []))

            b.run(path, ((f"{path}:images[{i}]", img) for i, img in enumerate(data["images"])), parse_coco)
        elif isinstance(data, dict) and isinstance(data.get("images"), list):  # Karpathy dataset_*.json
            want = options.split or "test"

            def parse_karpathy(img: dict[str, Any], _: str) -> EvalRecord | None:
                split = img.get("split")
                if want != "all" and split != want and not (want == "train" and split == "restval"):
                    return None
                name = field_str(img, "filename")
                folder = img.get("filepath")
                image = str(root / folder / name) if isinstance(folder, str) else str(root / name)
                sents = img.get("sentences")
                if not isinstance(sents, list):
                    raise Skip("missing 'sentences' list")
                return record(
                    record_id(img, "cocoid", "imgid", "id"),
                    [image],
                    [s.get("raw") for s in sents if isinstance(s, dict)],
                )

            b.run(path, ((f"{path}:images[{i}]", img) for i, img in enumerate(data["images"])), parse_karpathy)
        elif isinstance(data, list):  # LAVIS Karpathy lists / JSONL: captions grouped by image
            self._read_list(b, path, data, root, record)
        else:
            raise ValueError(f"{path}: not a caption file (expected COCO annotations, a Karpathy split file or a list)")

    @staticmethod
    def _read_list(b: Builder, path: Path, data: list[tuple[str, Any]], root: Path, record: Any) -> None:
        grouped: dict[str, tuple[str, str, list[ImageLike], list[str]]] = {}  # key -> origin, id, images, refs
        for origin, rec in data:
            try:
                rec = record_object(rec, Skip)
                images = record_images(rec, root, "image", "images")
                caps = _captions(rec.get("captions", rec.get("caption", rec.get("references"))))
            except Skip as e:
                b.report.skip(origin, str(e))
                continue
            key = "|".join(str(i) for i in images)
            if key not in grouped:
                digits = re.search(r"(\d+)\.\w+$", str(images[0]))  # COCO_val2014_000000391895.jpg -> 391895
                default = (digits.group(1).lstrip("0") or "0") if digits else key
                grouped[key] = (origin, record_id(rec, "id", "image_id", default=default), images, [])
            grouped[key][3].extend(caps)
        for origin, id, images, caps in grouped.values():
            b.add(record(id, images, caps), path, origin)

    def score(
        self, records: Sequence[EvalRecord], predictions: Mapping[str, str], scorer: str, meteor: bool | None = None
    ) -> Scores:
        """BLEU-1..4, METEOR, ROUGE-L, CIDEr-D over the predicted images (as COCOEvalCap scores the ids of its
        results), and the same per image. Without Java: METEOR ``None`` and a ``notes`` entry saying so."""
        recs = scored(records, predictions)
        pred = {r.id: predictions[r.id] for r in recs}
        totals, per_image = M.caption_scores(pred, {r.id: r.references for r in recs}, meteor=meteor)
        out = self.totals(scorer, **totals, n=len(recs))
        if not M.java_available():
            out["reference"] += " [fallback tokenizer, no METEOR]"
            out["notes"] = [_NO_JAVA]
        elif meteor is False:
            out["notes"] = ["METEOR skipped (--no-meteor)"]
        rows = [{"id": id, **scores, "prediction": pred[id]} for id, scores in per_image.items()]
        return Scores(out, rows)


TASK = Caption()
