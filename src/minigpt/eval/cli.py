"""``minigpt eval MODEL --task TASK --data FILE``: batched benchmark evaluation, resumable, with metrics.

Writes ``{output}/predictions.jsonl`` (id, prompt, prediction, references, task details) and
``{output}/metrics.json`` (model, data, settings, metrics, counts, problems, throughput); rerunning the same
command continues an interrupted run from the predictions file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..infer.decoding import add_decoding_arguments, settings_from_args
from .tasks import TASKS


def add_generation_args(parser: argparse.ArgumentParser, max_new_tokens: int | None = None) -> None:
    """Decoding flags mapping onto :class:`~minigpt.infer.generate.GenerationOptions` (greedy by default)."""
    g = parser.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help="tokens to generate at most (default: per task, caption 30, others 10)")
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


#: Default answer lengths: short answers for VQA/MCQ/POPE, a sentence for captions.
DEFAULT_MAX_NEW_TOKENS = {"caption": 30, "vqa": 10, "mcq": 10, "pope": 10}


def generation_options(args: argparse.Namespace, task: str | None = None) -> Any:
    from ..infer.generate import GenerationOptions

    max_new = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS.get(task or "", 300)
    return GenerationOptions(
        max_new_tokens=max_new, do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, num_beams=args.num_beams, repetition_penalty=args.repetition_penalty,
        length_penalty=args.length_penalty, min_new_tokens=args.min_new_tokens, stop=list(args.stop),
        seed=args.seed,
    )


def register(subparsers: Any) -> None:
    from ..device import add_device_argument

    p = subparsers.add_parser(
        "eval",
        help="evaluate a model on captioning, VQA, multiple-choice or POPE",
        description="Evaluate a minigpt model directory on a benchmark file. Rerun the same command to resume.",
    )
    p.add_argument("model", metavar="MODEL", help="model directory (written by save_pretrained / training)")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--data", required=True, nargs="+", metavar="FILE",
                   help="eval file(s): COCO/Karpathy captions; VQAv2 questions (+ annotations) or JSONL; "
                        "MMBench TSV / ScienceQA problems.json / JSON(L); POPE JSON(L) (several files are joined)")
    p.add_argument("--annotations", metavar="FILE", help="VQAv2 annotations file (or give it as a second --data)")
    p.add_argument("--images", metavar="DIR", help="folder the image paths are relative to (default: the data file's)")
    p.add_argument("--split", help="Karpathy / ScienceQA split to evaluate (default test; 'all' for every split)")
    p.add_argument("--prompt", help="replace the task's instruction (caption: the whole prompt; '' for none)")
    p.add_argument("--circular", action="store_true", help="mcq: MMBench CircularEval (every option rotation)")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate the first N questions only")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="records per generate call (default 8)")
    p.add_argument("--workers", type=int, default=2, help="threads decoding images ahead of the model (default 2)")
    p.add_argument("--output", "-o", metavar="DIR",
                   help="output folder (default: eval/<model name>-<task>-<data name>)")
    p.add_argument("--no-resume", action="store_true", help="start over instead of continuing the predictions file")
    p.add_argument("--no-meteor", action="store_true", help="caption: skip METEOR (it needs java and ~20 s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_argument(p)
    p.add_argument("--dtype", help="LLM dtype override (float32, bfloat16, float16)")
    add_generation_args(p)
    p.set_defaults(func=run)


def default_output(model: str, task: str, data: list[str]) -> Path:
    return Path("eval") / f"{Path(model).resolve().name}-{task}-{Path(data[0]).stem}"


def run(args: argparse.Namespace) -> int:
    from ..device import resolve_device
    from ..model.minigpt import MiniGPT
    from .runner import run_eval
    from .tasks import load_task

    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be >= 1")
    options = generation_options(args, args.task)
    data = load_task(args.task, args.data, args.images, annotations=args.annotations, split=args.split,
                     prompt=args.prompt, circular=args.circular)
    device = resolve_device(args.device)
    overrides = {"llm_dtype": args.dtype} if args.dtype else {}
    model = MiniGPT.from_pretrained(args.model, **overrides).to(device).eval()
    model.decoding = settings_from_args(args)

    out = Path(args.output) if args.output else default_output(args.model, args.task, args.data)
    info = {
        "model": str(Path(args.model).resolve()),
        "data": [str(Path(d).resolve()) for d in args.data] + ([str(Path(args.annotations).resolve())]
                                                              if args.annotations else []),
        "images": str(Path(args.images).resolve()) if args.images else None,
    }
    settings = {"prompt": args.prompt, "circular": args.circular, "split": args.split,
                "decoding": model.decoding.mode if model.decoding.use_static(device, options.num_beams) else "plain"}
    result = run_eval(
        model, args.task, data, options,
        predictions_path=out / "predictions.jsonl", metrics_path=out / "metrics.json",
        batch_size=args.batch_size, limit=args.limit, resume=not args.no_resume, workers=args.workers,
        meteor=False if args.no_meteor else None, progress=not args.no_progress, info=info, settings=settings,
    )
    report = result.report
    counts = report["counts"]
    print(json.dumps(report["metrics"], indent=2))
    tp = report["throughput"]
    rate = f", {tp['samples_per_s']} samples/s" if tp.get("samples_per_s") else ""
    print(f"{counts['predicted']}/{counts['records']} predicted ({counts['resumed']} resumed, "
          f"{counts['failed']} failed, {counts['empty_predictions']} empty{rate}); "
          f"wrote {out / 'predictions.jsonl'} and {out / 'metrics.json'}", file=sys.stderr)
    return 0
