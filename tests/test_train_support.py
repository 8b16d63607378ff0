"""Helpers shared by the ``test_train_*`` files: a synthetic coloured-shapes set and tiny training configs.

(Imported by the other files; the tests here only check the helpers themselves.)
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")


def draw(colour: str, shape: str, size: int, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (size, size), tuple(rng.randint(225, 255) for _ in range(3)))
    d = ImageDraw.Draw(img)
    extent = rng.randint(size // 2, size * 8 // 10)
    x, y = rng.randint(0, size - extent), rng.randint(0, size - extent)
    if shape == "circle":
        d.ellipse((x, y, x + extent, y + extent), fill=COLOURS[colour])
    elif shape == "square":
        d.rectangle((x, y, x + extent, y + extent), fill=COLOURS[colour])
    else:
        d.polygon([(x + extent / 2, y), (x, y + extent), (x + extent, y + extent)], fill=COLOURS[colour])
    return img


def make_shapes(root: Path, n: int, seed: int = 0, size: int = 32, name: str = "train") -> Path:
    """``n`` pictures (colour x shape cycled) and ``root/{name}.json`` in the captions_json format."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    records = []
    for i in range(n):
        colour, shape = combos[i % len(combos)]
        rel = f"images/{name}_{i:04d}.png"
        draw(colour, shape, size, rng).save(root / rel)
        records.append({"image": rel, "caption": f"a {colour} {shape}"})
    rng.shuffle(records)
    path = root / f"{name}.json"
    path.write_text(json.dumps(records))
    return path


def tiny_config(llm_dir: Path, train_json: Path, output_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A config dict for the tiny model (random tiny BLIP-2 + 2-layer LLaMA) on ``train_json``; ``sections``
    update the model / data / run sections."""
    config: dict[str, Any] = {
        "model": {"llm": str(llm_dir), "vision": "tiny", "template": "caption", "max_txt_len": 16},
        "data": {"datasets": [{"format": "captions_json", "path": str(train_json)}], "num_workers": 0},
        "run": {
            "output_dir": str(output_dir), "seed": 7, "batch_size": 4, "epochs": 1, "device": "cpu",
            "optimizer": {"lr": 1e-2, "weight_decay": 0.05},
            "schedule": {"name": "constant"},
            "save_every": 1000, "log_every": 1000,
        },
    }
    for name, values in sections.items():
        config[name].update(values)
    return config


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def losses(records: list[dict[str, Any]]) -> list[float]:
    return [r["loss"] for r in records if "loss" in r]


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line]


def test_make_shapes_writes_a_readable_caption_set(tmp_path):
    from minigpt.data.formats import read_captions_json

    samples = read_captions_json(make_shapes(tmp_path, 12))
    assert len(samples) == 12
    captions = {s.conversation.turns[-1].text for s in samples}
    assert len(captions) == 12 and all(Path(s.images[0]).is_file() for s in samples)
