"""What ``minigpt quickstart`` shows: the loss curve, a grid of held-out pictures with their answers before and after
training (right in green, wrong in red), and the results table printed at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .shapes import QUESTIONS, SCORED, ShapeItem, named

RIGHT, WRONG = "#1a7f37", "#cf222e"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(histories: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Training and held-out loss of each stage, one after the other on the step axis (log scale)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    offset = 0
    for name, records in histories.items():
        train = [(offset + r["step"], r["loss"]) for r in records if r.get("loss") is not None]
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


def answer_grid(
    items: list[ShapeItem],
    root: Path,
    before: list[str],
    after: list[str],
    path: Path,
    columns: int = 4,
) -> Path:
    """Held-out pictures, each with its truth and the answers to "Describe the image." before and after training,
    marked right (both colour and shape named, green) or wrong (red)."""
    import numpy as np
    from PIL import Image

    plt = _pyplot()
    rows = -(-len(items) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 3.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, item, old, new in zip(axes.flat, items, before, after):
        with Image.open(root / item.image) as img:
            ax.imshow(np.asarray(img.convert("RGB")))
        ax.set_title(f"truth: {item.caption}", fontsize=9)
        for y, label, answer in ((-0.08, "before", old), (-0.2, "after", new)):
            ok = named(answer, item)["both"]
            ax.text(
                0.5,
                y,
                f"{'✓' if ok else '✗'} {label}: {_clip(answer)}",
                transform=ax.transAxes,
                ha="center",
                va="top",
                fontsize=8,
                color=RIGHT if ok else WRONG,
            )
    fig.suptitle('"Describe the image." on held-out pictures, before and after training', fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97), h_pad=2.5)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _clip(text: str, width: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def print_summary(summary: dict[str, Any]) -> None:
    """The results table: accuracy per question type before and after, losses, examples, times and files."""
    accuracy = summary["question_accuracy"]
    print(f"\n=== quickstart results ({summary['held_out_pictures']} held-out pictures) ===")
    print(f"{'the answer names':<18} {'asked':<32} {'before':>7} {'after':>7}")
    labels = {"colour": "the colour", "shape": "the shape", "both": "colour and shape"}
    for kind, (phrasings, _) in QUESTIONS.items():
        print(
            f"{labels[SCORED[kind]]:<18} {phrasings[0]!r:<32} {accuracy['before'][kind]:>7.0%} "
            f"{accuracy['after'][kind]:>7.0%}"
        )
    losses = ", ".join(
        f"{stage} {v['start']:.2f} -> {v['end']:.2f}" for stage, v in summary["held_out_loss"].items() if v
    )
    print(f"held-out loss: {losses}")
    for ex in summary["examples"]:
        print(f"  {ex['truth']:<18} before: {_clip(ex['before'])!r:<38} after: {ex['after']!r}")
    seconds = summary["phase_seconds"]
    phases = ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items() if name != "total")
    print(f"time: {phases}; total {_minutes(seconds['total'])}")
    print(
        f"loss curve: {summary['plot']}\nanswers before/after: {summary['grid']}\n"
        f"detailed log: {summary['log']}\nmodel: {summary['model']}"
    )


def _minutes(seconds: float) -> str:
    return f"{int(seconds) // 60} min {int(seconds) % 60:02d} s"
