"""The README's "Fine-tune on your own pictures" walk, run line by line as written, on a small generated folder with a
tiny LLM (the only changes: the tiny LLM's folder for SmolLM2's, and a few steps instead of hundreds)."""

from __future__ import annotations

import io
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
from PIL import Image

from minigpt.cli import main
from minigpt.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "~/.cache/minigpt/smollm2-135m-instruct"
#: What the test appends to a command: a fast quickstart and a short training run.
FASTER = {
    "quickstart": "--llm tiny --stage1-steps 2 --stage2-steps 2 --train-size 20 --test-size 10 --device cpu",
    "train": "run.max_steps=4 run.eval_every=2 run.save_every=4 run.batch_size=2",
}


def walk_commands() -> list[str]:
    """The commands of the README section's bash block, continuation lines joined, comments dropped."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Fine-tune on your own pictures", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [" ".join(line.split("#", 1)[0].split()) for line in lines if line.strip()]


def _pictures(root: Path) -> None:
    """Two classes of small JPEGs, named as in the README's chat line (cats/001.jpg)."""
    for name, colour in (("cats", (200, 120, 40)), ("dogs", (60, 60, 200))):
        (root / name).mkdir(parents=True)
        for i in range(1, 9):
            Image.new("RGB", (24, 24), tuple(c + 3 * i for c in colour)).save(root / name / f"{i:03d}.jpg")


def test_readme_walk_runs_as_written(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn", reason="the walk starts with the digits quickstart, which needs scikit-learn")
    monkeypatch.chdir(tmp_path)
    _pictures(tmp_path / "pictures")
    tiny_llm = tmp_path / "runs" / "quickstart" / "tiny-llm"
    commands = walk_commands()
    assert [c.split()[1] for c in commands] == ["quickstart", "data", "data", "data", "train", "eval", "eval", "chat"]
    for command in commands:
        args = shlex.split(command.replace(SMOLLM2, str(tiny_llm)))
        assert args[0] == "minigpt"
        args = args[1:] + shlex.split(FASTER.get(args[1], ""))
        if args[0] == "train":
            args[1] = str(ROOT / args[1])  # configs/ of the repository
        if args[0] == "chat":
            monkeypatch.setattr(sys, "stdin", io.StringIO("What is in the picture?\n:quit\n"))
        assert main(args) == 0, command
    out = capsys.readouterr().out
    assert "16 pictures imported, 0 left out" in out and "clean" in out
    history = [json.loads(line) for line in (tmp_path / "runs" / "mine" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history if "loss" in r][-1] == 4
    for task in ("vqa", "mcq"):
        (metrics,) = (tmp_path / "eval").glob(f"final-{task}-*/metrics.json")
        data = json.loads(metrics.read_text())
        assert data["status"] == "done" and data["counts"]["records"] == data["counts"]["predicted"] == 2, data
        assert not data["problems"] and data["counts"]["skipped_on_read"] == 0  # the 2 held-out pictures, all read
    assert (tmp_path / "runs" / "mine" / "final" / "config.json").is_file()


def test_gpu_config_validates():
    config = load_config(ROOT / "configs" / "own_pictures_gpu.yaml")
    assert config.model.lora is not None and config.model.freeze["vision"] and config.model.freeze["llm"]
    cpu = load_config(ROOT / "configs" / "own_pictures_cpu.yaml")
    assert cpu.model.lora is None and not cpu.model.freeze["projector"] and cpu.model.freeze["vision"]
