"""VQA: VQAv2-style questions with the annotators' answers, scored by VQA accuracy.

Prompt: ``{question}\\n`` + :data:`PROMPT` ("Answer the question using a single word or phrase.").

Inputs: VQAv2 questions (``{"data_subtype", "questions": [{"question_id", "image_id", "question"}]}``) with the
annotations file (``{"annotations": [{"question_id", "answers": [{"answer"}], "answer_type"}]}``) as a second data
file or ``annotations=``; without annotations the records have no references (predictions only). Or JSON/JSONL
``{"id", "image", "question", "answers": [str]}``: those raw answers are VQA-normalised when read (as the VQAv2
annotation files carry them).

Scoring (:data:`~minigpt.eval.metrics.VQA_LOGICS`): ``lavis`` (default) is LAVIS's ``vqa_eval.py``, question by
question, its quirks included; ``vqaeval2021`` the current GT-Vision-Lab ``vqaEval.py``; with ``+evalai`` the
predictions first go through LLaVA's ``EvalAIAnswerProcessor``, as LLaVA's VQAv2 numbers did. Questions with fewer than
:data:`ANNOTATORS` answers are scored by exact match of the normalised prediction (the leave-one-out formula
would give a single answer 0); ``n_exact_match`` counts them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
    TaskData,
    answer_list,
    build_prompt,
    coco_image_path,
    field_str,
    load_any,
    mean,
    record_id,
    record_images,
    scored,
)

PROMPT = "Answer the question using a single word or phrase."
#: VQAv2 has 10 answers per question; its leave-one-out formula needs that many.
ANNOTATORS = 10


def record_accuracy(prediction: str, answers: Sequence[str], logic: str) -> float:
    """:func:`~minigpt.eval.metrics.vqa_accuracy` with 10 or more answers; with fewer, 1.0 when the normalised
    prediction equals a normalised answer, else 0."""
    if len(answers) >= ANNOTATORS:
        return M.vqa_accuracy(prediction, answers, logic)
    pred = M.normalize_vqa_answer(M.evalai_answer(prediction) if logic.endswith(M.EVALAI) else prediction)
    return float(any(pred == M.normalize_vqa_answer(a) for a in answers))


def _annotations(path: Path, data: Any) -> dict[str, Any]:
    if not (isinstance(data, dict) and isinstance(data.get("annotations"), list)):
        raise ValueError(f"{path}: not a VQAv2 annotations file (no 'annotations' list)")
    return {str(a["question_id"]): a for a in data["annotations"] if isinstance(a, dict) and "question_id" in a}


@dataclass
class _Options(ReadOptions):
    answers: dict[str, Any] | None = None  # VQAv2 annotations by question id; None: no annotations given


class VQA(Task):
    name = "vqa"
    prompt = PROMPT
    scorers = dict(M.VQA_LOGICS)
    inputs = "VQAv2 questions (+ annotations) or JSON(L)"

    def read(self, loaded: list[tuple[Path, Any]], options: ReadOptions) -> TaskData:
        """Annotation files among ``loaded`` (or ``options.annotations``) give the questions their answers."""
        ann_files = [(p, d) for p, d in loaded if isinstance(d, dict) and "annotations" in d and "questions" not in d]
        if options.annotations:
            ann_files.append((options.annotations, load_any(options.annotations)))
        answers = {k: v for p, d in ann_files for k, v in _annotations(p, d).items()} if ann_files else None
        questions = [(p, d) for p, d in loaded if not any(p == a for a, _ in ann_files)]
        if not questions:
            raise ValueError("only annotation files given: pass the VQAv2 questions file too")
        return super().read(questions, _Options(options.instruction, options.root, options.split, answers=answers))

    def read_file(self, b: Builder, path: Path, data: Any, root: Path, options: ReadOptions) -> None:
        instruction = options.instruction

        def text(question: str) -> str:
            return f"{question.strip()}\n{instruction}" if instruction else question.strip()

        if isinstance(data, dict) and isinstance(data.get("questions"), list):  # VQAv2 questions file
            subtype = data.get("data_subtype") if isinstance(data.get("data_subtype"), str) else None
            anns = getattr(options, "answers", None)  # set by read(): the annotations, if any

            def parse_v2(q: dict[str, Any], _: str) -> EvalRecord:
                qid = record_id(q, "question_id")
                question = field_str(q, "question")
                if isinstance(q.get("image"), str):
                    image = str(root / q["image"])
                else:
                    image = coco_image_path(root, record_id(q, "image_id"), subtype)
                extra: dict[str, Any] = {}
                refs: list[str] = []
                if anns is not None:
                    ann = anns.get(qid)
                    if ann is None:
                        raise Skip(f"question {qid} has no annotation")
                    refs = answer_list(ann.get("answers"))
                    if isinstance(ann.get("answer_type"), str):
                        extra["answer_type"] = ann["answer_type"]
                return EvalRecord(qid, build_prompt(text(question)), [image], refs, extra)

            b.run(path, ((f"{path}:questions[{i}]", q) for i, q in enumerate(data["questions"])), parse_v2)
        elif isinstance(data, list):

            def parse_simple(rec: dict[str, Any], origin: str) -> EvalRecord:
                images = record_images(rec, root, "image", "images")
                question = field_str(rec, "question", "text")
                answers = rec.get("answers", rec.get("answer"))
                if answers is None:
                    raise Skip("missing 'answers'")
                id = record_id(rec, "id", "question_id", default=origin.rsplit(":", 1)[-1])
                extra = {"answer_type": rec["answer_type"]} if isinstance(rec.get("answer_type"), str) else {}
                refs = [M.normalize_vqa_answer(a) for a in answer_list(answers)]
                return EvalRecord(id, build_prompt(text(question), len(images)), images, refs, extra)

            b.run(path, data, parse_simple)
        else:
            raise ValueError(f"{path}: not a VQA file (expected VQAv2 questions or a list of question records)")

    def score(
        self, records: Sequence[EvalRecord], predictions: Mapping[str, str], scorer: str, meteor: bool | None = None
    ) -> Scores:
        """``accuracy`` (mean over the predicted questions with answers), ``per_answer_type``; one row per
        question with its accuracy."""
        recs = [r for r in scored(records, predictions) if r.references]
        if not recs:
            return Scores(self.totals(scorer, accuracy=None, n=0, note="no reference answers (predictions only)"), [])
        acc = {r.id: record_accuracy(predictions[r.id], r.references, scorer) for r in recs}
        out = self.totals(scorer, accuracy=mean(acc.values()), n=len(recs))
        few = sum(len(r.references) < ANNOTATORS for r in recs)
        if few:
            out["n_exact_match"] = few
            out["notes"] = [f"{few} question(s) with fewer than {ANNOTATORS} answers scored by exact match"]
        types = defaultdict(list)
        for r in recs:
            if r.extra.get("answer_type"):
                types[r.extra["answer_type"]].append(acc[r.id])
        if types:
            out["per_answer_type"] = {t: mean(v) for t, v in sorted(types.items())}
        rows = [
            {
                "id": r.id,
                "accuracy": acc[r.id],
                "prediction": predictions[r.id],
                **({"answer_type": r.extra["answer_type"]} if "answer_type" in r.extra else {}),
            }
            for r in recs
        ]
        return Scores(out, rows)


TASK = VQA()
