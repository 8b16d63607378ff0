"""Weight files get the mode the umask gives (0644 under umask 022), as config.json and torch.save do: safetensors
alone writes 0600, which leaves a shared model folder unreadable to others."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_model_folder_weights_follow_the_umask(tiny_model_factory, tmp_path, umask):
    model = tiny_model_factory()
    model.save_pretrained(tmp_path / "m")
    files = ["projector.safetensors", "vision.safetensors", "llm/model.safetensors", "llm/config.json", "config.json"]
    assert {name: oct(mode(tmp_path / "m" / name)) for name in files} == dict.fromkeys(files, oct(0o666 & ~umask))


def test_checkpoint_and_vision_weights_follow_the_umask(tmp_path, umask):
    from minigpt.model.vision import VISION_WEIGHTS, VisionConfig, save_vision
    from minigpt.train.checkpoint import WEIGHTS, save_checkpoint

    folder = save_checkpoint(tmp_path / "run", 1, {"w": torch.zeros(2)}, {})
    vision = save_vision(tmp_path / "vision", VisionConfig.tiny(), {"w": torch.zeros(2)})
    torch.save({}, tmp_path / "plain.pt")
    want = 0o666 & ~umask
    assert mode(tmp_path / "plain.pt") == want  # what torch.save gives, for comparison
    assert mode(folder / WEIGHTS) == want
    assert mode(vision / VISION_WEIGHTS) == want
