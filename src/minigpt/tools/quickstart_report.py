"""What ``minigpt quickstart`` shows: the loss curve, a grid of held-out pictures with their answers before and after
training (right in green, wrong in red), a confusion matrix (digits), and the results table printed at the end."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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
    items: list[Any],
    root: Path,
    before: list[str],
    after: list[str],
    correct: Callable[[str, Any], bool],
    prompt: str,
    path: Path,
    columns: int = 4,
) -> Path:
    """Held-out pictures (``.image`` under ``root``), each with its truth (``.caption``) and the answers to ``prompt``
    before and after training, marked right (green) or wrong (red) by ``correct(answer, item)``."""
    import numpy as np
    from PIL import Image

    plt = _pyplot()
    rows = -(-len(items) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 3.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, item, old, new in zip(axes.flat, items, before, after):
        with Image.open(root / item.image) as img:
            ax.imshow(np.asarray(img.convert("RGB")), interpolation="nearest")
        ax.set_title(f"truth: {item.caption}", fontsize=9)
        for y, label, answer in ((-0.08, "before", old), (-0.2, "after", new)):
            ok = correct(answer, item)
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
    fig.suptitle(f"{prompt!r} on held-out pictures, before and after training", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97), h_pad=2.5)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _clip(text: str, width: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def confusion_matrix(truths: Sequence[str], answers: Sequence[str | None], labels: Sequence[str], path: Path) -> Path:
    """A confusion matrix PNG: rows the true label, columns the label the answer named (``None``: none or several,
    the last column), counts in the cells."""
    import numpy as np

    plt = _pyplot()
    columns = [*labels, "none or several"]
    counts = np.zeros((len(labels), len(columns)), dtype=int)
    for truth, answer in zip(truths, answers):
        counts[labels.index(truth), columns.index(answer) if answer in labels else len(labels)] += 1
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(columns), 1 + 0.6 * len(labels)))
    ax.imshow(counts, cmap="Blues")
    for (r, c), n in np.ndenumerate(counts):
        if n:
            ax.text(
                c, r, str(n), ha="center", va="center", fontsize=8, color="white" if n > counts.max() / 2 else "black"
            )
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("the answer names")
    ax.set_ylabel("truth")
    right = int(np.trace(counts[:, : len(labels)]))
    ax.set_title(f"held-out answers after training: {right}/{len(truths)} right", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def print_summary(summary: dict[str, Any]) -> None:
    """The results table: accuracy per question before and after, losses, examples, times and files."""
    accuracy = summary["question_accuracy"]
    print(f"\n=== quickstart results: {summary['task']} ({summary['held_out_pictures']} held-out pictures) ===")
    print(f"{'the answer names':<18} {'asked':<32} {'before':>7} {'after':>7}")
    for q in summary["questions"]:
        kind = q["kind"]
        print(f"{q['names']:<18} {q['prompt']!r:<32} {accuracy['before'][kind]:>7.0%} {accuracy['after'][kind]:>7.0%}")
    losses = ", ".join(
        f"{stage} {v['start']:.2f} -> {v['end']:.2f}" for stage, v in summary["held_out_loss"].items() if v
    )
    print(f"held-out loss: {losses}")
    for ex in summary["examples"]:
        print(f"  {ex['truth']:<18} before: {_clip(ex['before'])!r:<38} after: {ex['after']!r}")
    seconds = summary["phase_seconds"]
    phases = ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items() if name != "total")
    print(f"time: {phases}; total {_minutes(seconds['total'])}")
    extra = f"confusion matrix: {summary['confusion']}\n" if summary.get("confusion") else ""
    print(
        f"loss curve: {summary['plot']}\nanswers before/after: {summary['grid']}\n{extra}"
        f"detailed log: {summary['log']}\nmodel: {summary['model']}"
    )


def _minutes(seconds: float) -> str:
    return f"{int(seconds) // 60} min {int(seconds) % 60:02d} s"
