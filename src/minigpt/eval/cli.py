"""``minigpt eval MODEL --task TASK --data FILE``: batched benchmark evaluation, resumable, with metrics.

Writes ``{output}/predictions.jsonl`` (id, prompt, prediction, references, task details),
``{output}/metrics.json`` (model, data, settings, metrics with the reference logic that produced them, counts,
problems, throughput) and ``{output}/scores.jsonl`` (per-record scores); rerunning the same command continues an
interrupted run from the predictions file. ``minigpt eval --predictions FILE --task TASK --data FILE`` scores an
existing predictions file instead, without a model.

Under ``torchrun --nproc-per-node N -m minigpt.cli eval MODEL ...`` each process loads the model on its own device,
predicts every N-th record into ``predictions.rankR-of-N.jsonl``, and rank 0 merges them into
``predictions.jsonl`` (in the records' order, as one process writes it), scores once and prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..infer.decoding import add_decoding_arguments
from .tasks import REGISTRY, TASKS


def add_generation_args(parser: argparse.ArgumentParser, max_new_tokens: int | None = None) -> None:
    """Decoding flags mapping onto :class:`~minigpt.infer.generate.GenerationOptions` (greedy by default)."""
    g = parser.add_argument_group("generation")
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=max_new_tokens,
        help="tokens to generate at most (default: per task, caption 30, others 10)",
    )
    g.add_argument("--num-beams", type=int, default=1, help="beam search width (default 1: greedy)")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--length-penalty", type=float, default=1.0)
    g.add_argument("--min-new-tokens", type=int, default=0)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="extra stop string (repeatable)")
    g.add_argument("--seed", type=int, default=None)
    add_decoding_arguments(g)


def options_from_args(args: argparse.Namespace, task: str | None = None) -> Any:
    from ..infer.generate import GenerationOptions

    max_new = args.max_new_tokens or (REGISTRY[task].max_new_tokens if task in REGISTRY else 300)
    return GenerationOptions(
        max_new_tokens=max_new,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        num_beams=args.num_beams,
        repetition_penalty=args.repetition_penalty,
        length_penalty=args.length_penalty,
        min_new_tokens=args.min_new_tokens,
        stop=list(args.stop),
        seed=args.seed,
    )


def register(subparsers: Any) -> None:
    from ..infer.args import add_loading_arguments

    p = subparsers.add_parser(
        "eval",
        help="evaluate a model on captioning, VQA, multiple-choice or POPE",
        description="Evaluate a minigpt model directory on a benchmark file (rerun the same command to resume), "
        "or score an existing predictions file (--predictions, no MODEL).",
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        nargs="?",
        help="model directory (written by save_pretrained / training); omit with --predictions",
    )
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="FILE",
        help="eval file(s): "
        + "; ".join(f"{n}: {t.inputs}" for n, t in REGISTRY.items())
        + " (several files are joined)",
    )
    p.add_argument(
        "--predictions",
        metavar="FILE",
        nargs="+",
        help="score this predictions file instead of running a model: minigpt predictions.jsonl, "
        "LLaVA answers ({question_id, text}) or lmms-eval sample logs; or one file per --data file, in order",
    )
    p.add_argument(
        "--scorer",
        metavar="NAME",
        help="reference logic: "
        + "; ".join(f"{n}: {', '.join(t.scorers)}" for n, t in REGISTRY.items())
        + " (default: the first)",
    )
    p.add_argument("--annotations", metavar="FILE", help="VQAv2 annotations file (or give it as a second --data)")
    p.add_argument("--images", metavar="DIR", help="folder the image paths are relative to (default: the data file's)")
    p.add_argument("--split", help="Karpathy / ScienceQA split to evaluate (default test; 'all' for every split)")
    p.add_argument("--prompt", help="replace the task's instruction (caption: the whole prompt; '' for none)")
    p.add_argument("--circular", action="store_true", help="mcq: MMBench CircularEval (every option rotation)")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate the first N questions only")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="records per generate call (default 8)")
    p.add_argument("--workers", type=int, default=2, help="threads decoding images ahead of the model (default 2)")
    p.add_argument(
        "--output", "-o", metavar="DIR", help="output folder (default: eval/<model name>-<task>-<data name>)"
    )
    p.add_argument("--no-resume", action="store_true", help="start over instead of continuing the predictions file")
    p.add_argument("--no-meteor", action="store_true", help="caption: skip METEOR (it needs java and ~20 s)")
    p.add_argument(
        "--allow-fallback-tokenizer",
        action="store_true",
        help="caption: score without java (no METEOR; a pure-Python stand-in for PTBTokenizer, not the published "
        "numbers' tokenizer)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_loading_arguments(p)
    add_generation_args(p)
    p.set_defaults(func=run)


def default_output(name: str, task: str, data: list[str]) -> Path:
    return Path("eval") / f"{name}-{task}-{Path(data[0]).stem}"


def run(args: argparse.Namespace) -> int:
    from .tasks import get_task, load_task

    if (args.model is None) == (args.predictions is None):
        raise ValueError("give a MODEL directory to evaluate, or --predictions FILE to score (not both)")
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be >= 1")
    get_task(args.task).check_scorer(args.scorer)
    _check_java(args)
    data = load_task(
        args.task,
        args.data,
        args.images,
        annotations=args.annotations,
        split=args.split,
        prompt=args.prompt,
        circular=args.circular,
    )
    info = {
        "data": [str(Path(d).resolve()) for d in args.data]
        + ([str(Path(args.annotations).resolve())] if args.annotations else []),
        "images": str(Path(args.images).resolve()) if args.images else None,
    }
    meteor = False if args.no_meteor else None
    if args.predictions:
        from .runner import score_predictions

        out = Path(args.output) if args.output else default_output(Path(args.predictions[0]).stem, args.task, args.data)
        result = score_predictions(
            args.task,
            data,
            args.predictions,
            metrics_path=out / "metrics.json",
            scorer=args.scorer,
            meteor=meteor,
            limit=args.limit,
            info=info,
        )
        written = [out / "metrics.json"]
    else:
        result, out, main = _evaluate_model(args, data, info, meteor)
        written = [out / "predictions.jsonl", out / "metrics.json"]
        if not main:  # another rank of a torchrun evaluation: rank 0 reports
            return 0
    report = result.report
    counts = report["counts"]
    print(json.dumps(report["metrics"], indent=2))
    tp = report.get("throughput", {})
    rate = f", {tp['samples_per_s']} samples/s" if tp.get("samples_per_s") else ""
    metrics = report["metrics"]
    print(f"scored with {metrics['scorer']}: {metrics['reference']}", file=sys.stderr)
    summary = REGISTRY[args.task].summary(metrics)
    if summary:
        print(summary, file=sys.stderr)
    for note in metrics.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    print(
        f"{counts['predicted']}/{counts['records']} predicted ({counts.get('resumed', 0)} resumed, "
        f"{counts['failed']} failed, {counts['empty_predictions']} empty{rate}); "
        f"wrote {', '.join(map(str, written))} and {out / 'scores.jsonl'}",
        file=sys.stderr,
    )
    return 0


def _check_java(args: argparse.Namespace) -> None:
    """Captions are scored as published (PTBTokenizer, METEOR: java) unless the fallback is asked for."""
    from .metrics import java_available

    if args.task == "caption" and not args.allow_fallback_tokenizer and not java_available():
        raise RuntimeError(
            "caption scores need java (PTBTokenizer, METEOR) and it is not on PATH: install a Java runtime "
            "(bash scripts/install.sh does, or apt-get install default-jre-headless), or pass "
            "--allow-fallback-tokenizer to score with the pure-Python tokenizer (no METEOR)"
        )


def _evaluate_model(args: argparse.Namespace, data: Any, info: dict[str, Any], meteor: bool | None) -> Any:
    from ..device import launched_world_size, start_process_group
    from ..infer.args import spec_from_args
    from ..infer.engine import load_engine
    from .runner import EvalFiles, EvalSettings, run_eval
    from .shards import Shard

    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    options = options_from_args(args, args.task)
    spec = spec_from_args(args)
    shard = Shard()
    if launched_world_size() > 1:
        if spec.device_map:
            raise ValueError("--device-map under torchrun: each process would spread over every device; use one")
        spec = replace(spec, device=str(start_process_group(spec.device)))
        shard = Shard.current()
    engine = load_engine(spec)

    out = Path(args.output) if args.output else default_output(Path(args.model).resolve().name, args.task, args.data)
    settings = {
        "prompt": args.prompt,
        "circular": args.circular,
        "split": args.split,
        "decoding": "static" if engine.static(options.num_beams) else "plain",
    }
    run = EvalSettings(
        batch_size=args.batch_size,
        limit=args.limit,
        resume=not args.no_resume,
        workers=args.workers,
        meteor=meteor,
        scorer=args.scorer,
        progress=not args.no_progress and shard.main,
        recorded=settings,
    )
    try:
        result = run_eval(
            engine,
            args.task,
            data,
            options,
            run,
            files=EvalFiles(out / "predictions.jsonl", out / "metrics.json"),
            info={"model": str(Path(args.model).resolve()), **info},
            shard=shard,
        )
    finally:
        shard.close()
    return result, out, shard.main
