"""A synthetic image-caption and instruction set: one coloured shape per picture.

Small enough to learn on a CPU in minutes, rich enough to check that the model looks at the
image: the colour and the shape can only be named from the pixels. Shapes are centred: a vision
transformer trained from scratch on a few thousand pictures does not learn translation invariance.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from .quickstart_task import Question, Stage, TaskData

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 200, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

#: Question type -> (phrasings, the first one asked in evaluation; answer). Each type is scored on what it asks.
QUESTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "colour": (
        (
            "What colour is the shape?",
            "What colour is the shape in the picture?",
            "What color is it?",
            "Which colour do you see?",
        ),
        "The shape is {colour}.",
    ),
    "shape": (
        (
            "What shape is in the picture?",
            "What shape is it?",
            "Which shape do you see?",
            "What is the shape in the picture?",
        ),
        "The shape is a {shape}.",
    ),
    "description": (
        ("Describe the image.", "What is in the picture?", "What do you see?", "Describe the picture briefly."),
        "A {colour} {shape} on a light background.",
    ),
}
#: What an answer to each question type must name (keys of :func:`named`).
SCORED: dict[str, str] = {"colour": "colour", "shape": "shape", "description": "both"}


@dataclass(frozen=True)
class ShapeItem:
    image: str
    colour: str
    shape: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape}"


def draw_shape(colour: str, shape: str, size: int, rng: random.Random) -> Image.Image:
    """A light, slightly noisy background with one centred shape of random size and slightly varied colour."""
    bg = tuple(rng.randint(225, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    extent = rng.randint(size // 2, size * 8 // 10)
    x0 = y0 = (size - extent) // 2
    box = (x0, y0, x0 + extent, y0 + extent)
    fill = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[colour])
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + extent / 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=fill)
    return img


def make_shapes(root: str | Path, n: int, seed: int = 0, size: int = 64) -> list[ShapeItem]:
    """Write ``n`` pictures under ``root/images`` (balanced over colour x shape) and return them."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    items = []
    for i in range(n):
        colour, shape = combos[i % len(combos)] if i < len(combos) else rng.choice(combos)
        name = f"images/{seed}_{i:05d}.png"
        draw_shape(colour, shape, size, rng).save(root / name)
        items.append(ShapeItem(name, colour, shape))
    rng.shuffle(items)
    return items


def write_caption_json(items: list[ShapeItem], path: str | Path) -> Path:
    """Stage-1 data in the ``captions_json`` format: ``[{"image", "caption"}]``."""
    path = Path(path)
    path.write_text(json.dumps([{"image": it.image, "caption": it.caption} for it in items], indent=1))
    return path


def write_instruction_json(items: list[ShapeItem], path: str | Path, seed: int = 0) -> Path:
    """Stage-2 data in the LLaVA format, one question per picture: the types of :data:`QUESTIONS` in turn, each
    in a random phrasing."""
    rng = random.Random(seed)
    kinds = list(QUESTIONS)
    records = []
    for i, it in enumerate(items):
        phrasings, answer = QUESTIONS[kinds[i % len(kinds)]]
        question = rng.choice(phrasings)
        records.append(
            {
                "id": f"shape-{i}",
                "image": it.image,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{question}"},
                    {"from": "gpt", "value": answer.format(colour=it.colour, shape=it.shape)},
                ],
            }
        )
    path = Path(path)
    path.write_text(json.dumps(records, indent=1))
    return path


def named(answer: str, item: ShapeItem) -> dict[str, bool]:
    """Whether the answer names exactly the right colour, the right shape, and both."""
    words = answer.lower().replace(".", " ").replace(",", " ").split()
    colour = {w for w in words if w in COLOURS} == {item.colour}
    shape = {w for w in words if w in SHAPES} == {item.shape}
    return {"colour": colour, "shape": shape, "both": colour and shape}


class ShapesTask:
    """The quickstart's ``shapes`` task: 480 drawn pictures (48 held out), three questions about each."""

    name = "shapes"
    questions = tuple(
        Question(kind, phrasings[0], {"colour": "the colour", "shape": "the shape", "both": "colour and shape"}[key])
        for (kind, (phrasings, _)), key in zip(QUESTIONS.items(), SCORED.values())
    )
    grid_question = "description"
    # Stage 1 trains the ViT with the projector on captions; stage 2 keeps the ViT and trains the projector alone, at
    # a higher rate and in small batches (many updates: carrying what stage 1 learned into the chat template is its
    # whole job).
    stage1 = Stage(300, 16, 3e-3, True, bf16=False)
    stage2 = Stage(400, 4, 2e-2)
    train_size = 480
    test_size = 48

    def make_data(self, out: Path, train_size: int, test_size: int, seed: int) -> TaskData:
        data = out / "data"
        train_items = make_shapes(data, train_size, seed=seed)
        test_items = make_shapes(data, test_size, seed=seed + 1000)
        return TaskData(
            data,
            write_caption_json(train_items, data / "captions.json"),
            write_caption_json(test_items, data / "captions_eval.json"),
            write_instruction_json(train_items, data / "instructions.json", seed=seed),
            write_instruction_json(test_items, data / "instructions_eval.json", seed=seed + 1),
            len(train_items),
            test_items,
        )

    def correct(self, kind: str, answer: str, item: ShapeItem) -> bool:
        return named(answer, item)[SCORED[kind]]

    def words(self) -> list[str]:
        texts = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
        for phrasings, answer in QUESTIONS.values():
            texts += list(phrasings) + [answer.format(colour=c, shape=s) for c in COLOURS for s in SHAPES]
        return texts

    def results(self, answers: dict[str, dict[str, list[str]]], items: list[ShapeItem], out: Path) -> dict[str, Any]:
        """How often the description names the colour, the shape, and both (``naming_accuracy``)."""

        def share(when: str, key: str) -> float:
            hits = sum(named(a, it)[key] for a, it in zip(answers[when]["description"], items))
            return round(hits / max(len(items), 1), 4)

        return {"naming_accuracy": {when: {k: share(when, k) for k in ("colour", "shape", "both")} for when in answers}}
