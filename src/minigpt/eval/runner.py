"""Batched prediction over eval records, resumable from its predictions file, then the task's metrics.

:func:`run_eval` is what ``minigpt eval`` runs: it skips the records already in the predictions JSONL (matched by
id, and by prompt text so a changed prompt is predicted again), generates the rest in batches (longest prompts
first, images decoded by a thread pool one batch ahead), appends each batch to the JSONL as it finishes, and
writes a metrics JSON with the model, data, settings, counts, problems and throughput, and a scores JSONL with
the per-record scores (per image, question or circular group). :func:`score_predictions` scores an existing
predictions file (minigpt's, LLaVA answers or lmms-eval sample logs) the same way, without a model.

:func:`evaluate_task` is the hook for training loops: same batching and metrics, no files, model put in eval
mode and restored.

Bad input never stops a run halfway: a missing or unreadable image, a record the model fails on (a failed batch
is retried one record at a time) and an empty prediction each get a warning logged naming the record, and
are counted in the metrics JSON (``counts`` and ``problems``). Records without a prediction are left out of the
metrics, except for multiple choice, where they count as misses (as in VLMEvalKit). Only when the first records
of a run all fail (a wrong ``--images`` folder, a broken model) does it stop, with the first error.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..console import progress_bar
from ..data.images import load_image
from ..files import atomic_open, atomic_write_text
from ..infer.generate import GenerationOptions
from .predictions import read_prediction_file
from .shards import Shard
from .tasks import EvalRecord, Scores, TaskData, apply_limit, get_task

log = logging.getLogger(__name__)

MAX_WARNINGS = 10  # per kind of problem; the rest are summarised in one warning
MAX_EXAMPLES = 20  # per kind, kept in the metrics JSON
#: A run whose first this-many records all fail stops (a wrong image folder, a broken model).
ABORT_AFTER = 32
#: The per-record scores, written next to the metrics JSON.
SCORES_FILE = "scores.jsonl"


@dataclass
class Problems:
    """Counts and examples of bad input, by kind: ``missing_image`` (missing or unreadable image),
    ``generation_failed``, ``empty_prediction``, ``bad_prediction_line`` (a corrupt line of a resumed predictions
    file) and ``stale_prediction`` (a resumed prediction whose prompt differs, predicted again)."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, kind: str, where: str, message: str) -> None:
        self.counts[kind] += 1
        if len(self.examples[kind]) < MAX_EXAMPLES:
            self.examples[kind].append(f"{where}: {message}")
        if self.counts[kind] <= MAX_WARNINGS:
            log.warning("%s: %s: %s", kind.replace("_", " "), where, message)

    def merge(self, other: Problems) -> None:
        """Add another process's problems (already warned about there)."""
        for kind, n in other.counts.items():
            self.counts[kind] += n
            room = MAX_EXAMPLES - len(self.examples[kind])
            self.examples[kind].extend(other.examples[kind][: max(room, 0)])

    def summarize(self) -> None:
        for kind, n in self.counts.items():
            if n > MAX_WARNINGS:
                log.warning("%d more %s problems (see the metrics JSON)", n - MAX_WARNINGS, kind.replace("_", " "))

    def to_dict(self) -> dict[str, Any]:
        return {k: {"count": n, "examples": self.examples[k]} for k, n in sorted(self.counts.items())}


@dataclass
class EvalResult:
    """What :func:`run_eval` produced; ``report`` is the metrics JSON's content."""

    metrics: dict[str, Any]
    predictions: dict[str, str]
    problems: Problems
    report: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- prediction


def _load_images(record: EvalRecord) -> list[Any]:
    return [load_image(img, origin=record.origin or record.id) for img in record.images]


def _prefetch(
    records: Sequence[EvalRecord], batch_size: int, workers: int
) -> Iterator[list[tuple[EvalRecord, list[Any] | Exception]]]:
    """Batches of ``(record, images or the error loading them)``; a pool decodes the next batch meanwhile."""

    def load(r: EvalRecord) -> list[Any] | Exception:
        try:
            return _load_images(r)
        except Exception as e:  # noqa: BLE001 - any unreadable image is a per-record problem
            return e

    batches = [records[i : i + batch_size] for i in range(0, len(records), batch_size)]
    if workers <= 0:
        for batch in batches:
            yield [(r, load(r)) for r in batch]
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="eval-images") as pool:
        pending: list[list[Future]] = []
        for i, batch in enumerate(batches):
            while len(pending) < 2 and i + len(pending) < len(batches):
                pending.append([pool.submit(load, r) for r in batches[i + len(pending)]])
            futures = pending.pop(0)
            yield [(r, f.result()) for r, f in zip(batch, futures)]


def _generate(model: Any, recs: list[EvalRecord], images: list[list[Any]], options: GenerationOptions) -> list[Any]:
    """Answers for a batch; when the batch fails, each record alone (an answer or the exception)."""
    try:
        answers = model.generate([r.prompt for r in recs], images, options)
        if not isinstance(answers, list) or len(answers) != len(recs):
            raise RuntimeError(f"generate returned {type(answers).__name__}, not {len(recs)} answers")
        return [answer.text for answer in answers]
    except Exception as e:  # noqa: BLE001 - one bad record must not sink its batch
        if len(recs) == 1:
            return [e]
        log.debug("batch of %d failed (%s); retrying one by one", len(recs), e)
        return [_generate(model, [r], [imgs], options)[0] for r, imgs in zip(recs, images)]


def predict(
    model: Any,
    records: Sequence[EvalRecord],
    options: GenerationOptions | None = None,
    *,
    batch_size: int = 8,
    workers: int = 2,
    problems: Problems | None = None,
    on_batch: Callable[[list[tuple[EvalRecord, str]]], None] | None = None,
    progress: bool | Any = False,
) -> dict[str, str]:
    """Predictions ``{id: answer}`` for ``records`` (those that fail are reported in ``problems`` and left out).

    Batches hold records of similar prompt length (longest first); ``on_batch`` gets each batch's results as it
    finishes; ``progress`` is True for a tqdm bar or a tqdm-like object to ``update``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    options = options or GenerationOptions()
    problems = problems if problems is not None else Problems()
    order = sorted(records, key=lambda r: (-len(r.prompt_text), -len(r.images)))
    bar = _bar(len(order), 0, "predict") if progress is True else (progress or None)
    out: dict[str, str] = {}
    attempted = 0
    first_error: str | None = None
    for batch in _prefetch(order, batch_size, workers):
        ready = [(r, imgs) for r, imgs in batch if not isinstance(imgs, Exception)]
        for r, err in batch:
            if isinstance(err, Exception):
                problems.add("missing_image", r.origin or r.id, str(err))
                first_error = first_error or str(err)
        answers = _generate(model, [r for r, _ in ready], [imgs for _, imgs in ready], options) if ready else []
        done = []
        for (r, _), answer in zip(ready, answers):
            if isinstance(answer, Exception):
                problems.add("generation_failed", r.origin or r.id, f"{type(answer).__name__}: {answer}")
                first_error = first_error or f"{type(answer).__name__}: {answer}"
            else:
                out[r.id] = answer
                done.append((r, answer))
        attempted += len(batch)
        if done and on_batch:
            on_batch(done)
        if bar is not None:
            bar.update(len(batch))
        if not out and attempted >= ABORT_AFTER:
            raise RuntimeError(f"the first {attempted} records all failed; first error: {first_error}")
    if not out and attempted:
        raise RuntimeError(f"all {attempted} records failed; first error: {first_error}")
    if bar is not None and progress is True:
        bar.close()
    return out


def _bar(total: int, initial: int, desc: str) -> Any:
    return progress_bar(total=total, initial=initial, desc=desc, unit=" samples", dynamic_ncols=True, smoothing=0.1)


# ---------------------------------------------------------------------------------------------- metrics


def score(
    task: str,
    records: Sequence[EvalRecord],
    predictions: Mapping[str, str],
    scorer: str | None = None,
    meteor: bool | None = None,
) -> Scores:
    """The task's scores of ``predictions`` (``{record id: answer}``) over ``records``, by the logic ``scorer``
    (default: the task's first, see each task's ``scorers``); ``meteor`` for captions, as in
    :func:`~minigpt.eval.metrics.caption_metrics`. Every ``totals`` names its ``scorer`` and ``reference``."""
    t = get_task(task)
    return t.score(records, predictions, t.check_scorer(scorer), meteor)


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"accuracy": .9, "per_category": {"x": .8}}`` -> ``{"accuracy": .9, "per_category/x": .8}``, numbers only."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, Mapping):
            out.update(flatten_metrics(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


# ---------------------------------------------------------------------------------------------- files


def prediction_row(record: EvalRecord, prediction: str) -> dict[str, Any]:
    """One predictions-JSONL line: id, prompt, prediction, references, then task details (options, rotation...)."""
    row: dict[str, Any] = {
        "id": record.id,
        "prompt": record.prompt_text,
        "prediction": prediction,
        "references": record.references,
        **record.extra,
    }
    if record.group != record.id:
        row["group"] = record.group
    return row


def read_predictions(
    path: str | Path, problems: Problems | None = None, repair: bool = True
) -> dict[str, dict[str, Any]]:
    """Rows of a predictions JSONL by id. Corrupt lines (an interrupted write) are reported and dropped, and (with
    ``repair``) the file rewritten without them, so appending continues on a clean line."""
    path = Path(path)
    problems = problems if problems is not None else Problems()
    rows: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return rows
    raw = path.read_bytes()
    bad = 0
    for lineno, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if (
                not isinstance(row, dict)
                or not isinstance(row.get("id"), str)
                or not isinstance(row.get("prediction"), str)
            ):
                raise ValueError("not an object with string 'id' and 'prediction'")
        except ValueError as e:
            problems.add("bad_prediction_line", f"{path}:{lineno}", str(e))
            bad += 1
            continue
        rows[row["id"]] = row
    if repair and (bad or (raw and not raw.endswith(b"\n"))):
        _write_rows(path, rows.values())
    return rows


def _write_rows(path: Path, rows: Any) -> None:
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _versions() -> dict[str, str]:
    import torch
    import transformers

    from .. import __version__

    return {
        "minigpt": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _device_info(engine: Any) -> dict[str, Any]:
    """The device and peak memory of an :class:`~minigpt.infer.engine.Engine`'s model (nothing for a stand-in)."""
    device = getattr(getattr(engine, "model", None), "device", None)
    if device is None:
        return {}
    from ..device import peak_memory_gib

    try:
        peak = peak_memory_gib(device)
    except Exception:  # noqa: BLE001 - informational only
        peak = None
    return {"device": str(device), "peak_memory_gib": None if peak is None else round(peak, 3)}


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


# ---------------------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class EvalSettings:
    """How :func:`run_eval` runs: records per ``generate`` call, the first ``limit`` records only, continuing the
    predictions file (``resume``), image-decoding threads, METEOR (captions; None: when java is there), the reference
    logic (``scorer``; None: the task's first), a progress bar, and ``recorded``: extra settings written to the
    metrics JSON (prompt, circular, decoding...)."""

    batch_size: int = 8
    limit: int | None = None
    resume: bool = True
    workers: int = 2
    meteor: bool | None = None
    scorer: str | None = None
    progress: bool = True
    recorded: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalFiles:
    """Where :func:`run_eval` writes: the predictions JSONL (which a run resumes from) and the metrics JSON (with the
    per-record scores next to it, ``scores.jsonl``); None: that file is not written."""

    predictions: str | Path | None = None
    metrics: str | Path | None = None


def run_eval(
    model: Any,
    task: str,
    data: TaskData | Sequence[EvalRecord],
    options: GenerationOptions | None = None,
    run: EvalSettings | None = None,
    *,
    files: EvalFiles = EvalFiles(),
    info: Mapping[str, Any] | None = None,
    shard: Shard | None = None,
) -> EvalResult:
    """Predict (resuming from ``files.predictions``), score and write the metrics JSON and the per-record scores
    (``scores.jsonl`` next to the metrics JSON); the predictions file ends in the records' order.

    ``info``: descriptive fields for the metrics JSON (``model``, ``data``, ``images``...). A resumed run must use
    the same task, model and generation options as the one that wrote ``files.metrics`` (it is written with
    ``"status": "running"`` at the start); otherwise ``ValueError`` (use ``EvalSettings(resume=False)``).

    ``shard``: this process's part of a multi-process run (:class:`~minigpt.eval.shards.Shard`): each rank predicts
    its records into its own file (resumed from it and from the merged file), rank 0 merges the predictions in the
    records' order, scores once and writes the files; every rank returns rank 0's result.
    """
    options = options or GenerationOptions()
    run = run or EvalSettings()
    shard = shard or Shard()
    batch_size, limit, workers, meteor, scorer = run.batch_size, run.limit, run.workers, run.meteor, run.scorer
    records = list(data.records if isinstance(data, TaskData) else data)
    records = apply_limit(records, limit)
    if not records:
        raise ValueError("no records to evaluate")
    problems = Problems()
    info = dict(info or {})
    run_settings = {"task": task, "model": info.get("model"), "generation": options.to_dict(), **dict(run.recorded)}
    all_settings = {**run_settings, "batch_size": batch_size, "limit": limit, "meteor": meteor, "scorer": scorer}
    pred_path = Path(files.predictions) if files.predictions else None
    met_path = Path(files.metrics) if files.metrics else None
    local_path = shard.local_path(pred_path) if pred_path is not None else None

    done: dict[str, str] = {}
    kept: dict[str, dict[str, Any]] = {}  # rows of the merged file for records outside this run
    if pred_path is not None and local_path is not None:
        pred_path.parent.mkdir(parents=True, exist_ok=True)
        if run.resume and (pred_path.exists() or local_path.exists()):
            _check_resumable(met_path, run_settings)
            # every rank reads the merged file; rank 0 alone repairs it and counts its problems
            done, kept = _resumed(pred_path, records, problems if shard.main else Problems(), repair=shard.main)
            if shard.distributed:
                done.update(_resumed(local_path, records, problems, repair=True)[0])
        elif not run.resume:
            for path in (pred_path, local_path) if shard.main else (local_path,):
                path.unlink(missing_ok=True)
    if met_path is not None and shard.main:
        _write_json(met_path, {"status": "running", **info, "settings": all_settings})

    mine = shard.part(records)
    pending = [r for r in mine if r.id not in done]
    if done:
        log.info("resuming: %d of %d records already predicted in %s", len(done), len(records), pred_path)
    restore = _eval_mode(model)
    fout = open(local_path, "a", encoding="utf-8") if local_path is not None else None  # noqa: SIM115

    def write(batch: list[tuple[EvalRecord, str]]) -> None:
        if fout is not None:
            for r, answer in batch:
                fout.write(json.dumps(prediction_row(r, answer), ensure_ascii=False) + "\n")
            fout.flush()

    bar = _bar(len(mine), len(mine) - len(pending), task) if run.progress else None
    start = time.perf_counter()
    try:
        new = (
            predict(
                model,
                pending,
                options,
                batch_size=batch_size,
                workers=workers,
                problems=problems,
                on_batch=write,
                progress=bar,
            )
            if pending
            else {}
        )
    finally:
        seconds = time.perf_counter() - start
        if bar is not None:
            bar.close()
        if fout is not None:
            fout.close()
        restore()
    mine_done = {r.id: done[r.id] for r in mine if r.id in done}
    parts = shard.gather((mine_done, new, problems, seconds, len(pending)))
    if parts is None:  # not rank 0: its part is in; the result is rank 0's
        return shard.share(None)
    resumed = {id: p for part in parts for id, p in part[0].items()}
    generated = {id: p for part in parts for id, p in part[1].items()}
    for part in parts[1:]:
        problems.merge(part[2])
    seconds = max(part[3] for part in parts)
    predictions = {**resumed, **generated}
    if pred_path is not None:
        _write_in_order(pred_path, records, predictions, kept)
        for path in shard.all_local_paths(pred_path) if shard.distributed else ():
            path.unlink(missing_ok=True)
    counts = {
        "records": len(records),
        "predicted": len(predictions),
        "resumed": len(resumed),
        "generated": len(generated),
        "failed": problems.counts["missing_image"] + problems.counts["generation_failed"],
    }
    attempted = sum(part[4] for part in parts)
    throughput = {
        "samples": attempted,
        "seconds": round(seconds, 3),
        "samples_per_s": round(attempted / seconds, 3) if attempted and seconds > 0 else None,
        "batch_size": batch_size,
        "processes": shard.world_size,
        **_device_info(model),
    }
    result = _finish(
        task,
        data,
        Predicted(records, predictions, problems, counts),
        run,
        metrics_path=met_path,
        header={**info, "task": task, "settings": all_settings},
        more={"throughput": throughput},
    )
    return shard.share(result)


def _resumed(
    path: Path, records: Sequence[EvalRecord], problems: Problems, repair: bool
) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """The predictions of a predictions file for ``records`` (``{id: answer}``; a changed prompt is predicted
    again) and its rows for other records (kept in the file)."""
    by_id = {r.id: r for r in records}
    done: dict[str, str] = {}
    others: dict[str, dict[str, Any]] = {}
    for id, row in read_predictions(path, problems, repair).items():
        r = by_id.get(id)
        if r is None:
            others[id] = row
        elif row.get("prompt") != r.prompt_text:
            problems.add("stale_prediction", id, "prompt differs from this run's; predicted again")
        else:
            done[id] = row["prediction"]
    return done, others


def _write_in_order(
    path: Path, records: Sequence[EvalRecord], predictions: Mapping[str, str], kept: Mapping[str, dict[str, Any]]
) -> None:
    """The predictions file in the records' order (the same file whatever the batching or the number of processes),
    then the rows kept for records outside this run."""
    rows = [prediction_row(r, predictions[r.id]) for r in records if r.id in predictions]
    _write_rows(path, [*rows, *(row for id, row in kept.items() if id not in predictions)])


def score_predictions(
    task: str,
    data: TaskData | Sequence[EvalRecord],
    predictions_path: str | Path | Sequence[str | Path],
    *,
    metrics_path: str | Path | None = None,
    scorer: str | None = None,
    meteor: bool | None = None,
    limit: int | None = None,
    info: Mapping[str, Any] | None = None,
) -> EvalResult:
    """Score an existing predictions file (see :mod:`minigpt.eval.predictions` for the formats) against ``data``,
    as :func:`run_eval` scores its own predictions: same metrics, metrics JSON and scores JSONL.

    Several predictions files (LLaVA writes one per POPE split) pair with the data files in order, each matched
    to its own file's records only. Entries that cannot be matched one to one raise
    :class:`~minigpt.eval.predictions.PredictionMatchError`."""
    every = list(data.records if isinstance(data, TaskData) else data)
    records = apply_limit(every, limit)
    if not records:
        raise ValueError("no records to score")
    paths = [predictions_path] if isinstance(predictions_path, (str, Path)) else list(predictions_path)
    problems = Problems()
    if len(paths) == 1:
        found = read_prediction_file(paths[0], every, problems)
    else:
        sources = list(dict.fromkeys(r.source for r in every))
        if len(paths) != len(sources):
            raise ValueError(
                f"{len(paths)} predictions files for {len(sources)} data files: give one predictions file, "
                "or one per data file in the same order"
            )
        found = {}
        for path, source in zip(paths, sources):
            found.update(read_prediction_file(path, every, problems, source=source))
    keep = {r.id for r in records}
    predictions = {id: answer for id, answer in found.items() if id in keep}
    if not predictions:
        raise ValueError(f"{', '.join(map(str, paths))}: no prediction for the records scored")
    header = {
        **dict(info or {}),
        "task": task,
        "predictions": [str(Path(p).resolve()) for p in paths] if len(paths) > 1 else str(Path(paths[0]).resolve()),
        "settings": {"task": task, "limit": limit, "meteor": meteor, "scorer": scorer},
    }
    counts = {"records": len(records), "predicted": len(predictions), "failed": 0}
    return _finish(
        task,
        data,
        Predicted(records, predictions, problems, counts),
        EvalSettings(meteor=meteor, scorer=scorer),
        metrics_path=Path(metrics_path) if metrics_path else None,
        header=header,
    )


@dataclass
class Predicted:
    """What a run (or a predictions file) brings to scoring: the records scored, their answers, the problems met and
    the counts for the metrics JSON."""

    records: list[EvalRecord]
    predictions: dict[str, str]
    problems: Problems
    counts: dict[str, Any]


def _finish(
    task: str,
    data: TaskData | Sequence[EvalRecord],
    predicted: Predicted,
    run: EvalSettings,
    *,
    metrics_path: Path | None,
    header: dict[str, Any],
    more: Mapping[str, Any] | None = None,
) -> EvalResult:
    """Score (with ``run``'s scorer and METEOR choice), then write the metrics JSON and the scores JSONL next to it."""
    records, predictions, problems, counts = (
        predicted.records,
        predicted.predictions,
        predicted.problems,
        predicted.counts,
    )
    by_id = {r.id: r for r in records}
    for id, answer in predictions.items():
        if not answer.strip():
            problems.add("empty_prediction", by_id[id].origin or id, "the model answered nothing")
    problems.summarize()
    scores = score(task, records, predictions, run.scorer, run.meteor)
    read_skipped = len(data.report.skipped) if isinstance(data, TaskData) else 0
    report = {
        "status": "done",
        **header,
        "metrics": scores.totals,
        "counts": {**counts, "empty_predictions": problems.counts["empty_prediction"], "skipped_on_read": read_skipped},
        "problems": problems.to_dict(),
        **(more or {}),
        "versions": _versions(),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if isinstance(data, TaskData) and data.report.skipped:
        report["problems"]["malformed_record"] = {
            "count": read_skipped,
            "examples": [f"{o}: {m}" for o, m in data.report.skipped[:MAX_EXAMPLES]],
        }
    if metrics_path is not None:
        _write_json(metrics_path, report)
        _write_rows(metrics_path.with_name(SCORES_FILE), scores.rows)
    return EvalResult(scores.totals, predictions, problems, report, scores.rows)


def _check_resumable(metrics_path: Path | None, settings: Mapping[str, Any]) -> None:
    if metrics_path is None or not metrics_path.is_file():
        return
    try:
        old = json.loads(metrics_path.read_text()).get("settings", {})
    except (ValueError, AttributeError):
        return
    differ = [k for k in settings if k in old and old[k] != settings[k]]
    if differ:
        raise ValueError(
            f"the predictions next to {metrics_path} were made with other settings ({', '.join(differ)} differ); "
            "pass --no-resume to start over or write to another --output"
        )


def _eval_mode(model: Any) -> Callable[[], None]:
    """Put a torch module in eval mode; return the function that restores its mode."""
    training = getattr(model, "training", None)
    if training and hasattr(model, "train"):
        model.eval()
        return lambda: model.train(True)
    return lambda: None


#: :func:`evaluate_task`'s default: no METEOR (it starts a JVM, ~20 s), no progress bar.
IN_TRAINING = EvalSettings(meteor=False, progress=False)


def evaluate_task(
    model: Any,
    task: str,
    records: TaskData | Sequence[EvalRecord],
    options: GenerationOptions | None = None,
    run: EvalSettings = IN_TRAINING,
) -> dict[str, float]:
    """Evaluate during training: predictions for the first ``run.limit`` records and the task's metrics, flattened
    (``{"accuracy": ..., "per_category/x": ...}``, numbers only, ``n`` = records scored). No files written (``run``'s
    ``resume`` and ``recorded`` do not apply); the model is put in eval mode and restored; problems are warned about
    as in :func:`run_eval`."""
    recs = apply_limit(list(records.records if isinstance(records, TaskData) else records), run.limit)
    if not recs:
        raise ValueError("no records to evaluate")
    restore = _eval_mode(model)
    try:
        problems = Problems()
        predictions = predict(
            model,
            recs,
            options or GenerationOptions(),
            batch_size=run.batch_size,
            workers=run.workers,
            problems=problems,
            progress=run.progress,
        )
    finally:
        restore()
    for id, answer in predictions.items():
        if not answer.strip():
            problems.add("empty_prediction", id, "the model answered nothing")
    problems.summarize()
    out = flatten_metrics(score(task, recs, predictions, run.scorer, run.meteor).totals)
    out["failed"] = problems.counts["missing_image"] + problems.counts["generation_failed"]
    return out
