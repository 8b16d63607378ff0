"""Errors that say what is wrong: non-finite decoding settings, and a model folder moved away from the folders it
references by relative paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from minigpt.infer.generate import GenerationOptions, OptionOverrides
from minigpt.model.minigpt import MiniGPT


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_temperature_must_be_finite_and_not_negative(value):
    with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0 \(0 = greedy\)"):
        OptionOverrides(temperature=value).apply(GenerationOptions())  # NaN used to mean greedy


@pytest.mark.parametrize("name", ["temperature", "top_p", "repetition_penalty", "length_penalty"])
def test_options_refuse_non_finite_numbers(name):
    with pytest.raises(ValueError, match=f"{name} must be a finite number, got inf"):
        GenerationOptions(**{name: float("inf")})


def _referencing_tree(tiny_model_dir: Path, tiny_llama_dir: Path, root: Path) -> Path:
    """``root/model`` referencing ``../llama`` and ``../vision`` (as ``convert assemble`` writes them)."""
    from minigpt.model.vision import save_vision

    model = MiniGPT.from_pretrained(tiny_model_dir)
    shutil.copytree(tiny_model_dir, root / "model", ignore=shutil.ignore_patterns("llm", "vision.safetensors"))
    shutil.copytree(tiny_llama_dir, root / "llama")
    save_vision(root / "vision", model.config.vision, model.vision.state_dict())
    config = json.loads((root / "model" / "config.json").read_text())
    config.update(llm="../llama", vision_weights="../vision")
    (root / "model" / "config.json").write_text(json.dumps(config))
    MiniGPT.from_pretrained(root / "model")  # loads where it was written
    return root / "model"


def test_a_moved_model_folder_says_its_references_are_relative_to_it(tiny_model_dir, tiny_llama_dir, tmp_path):
    folder = _referencing_tree(tiny_model_dir, tiny_llama_dir, tmp_path / "tree")
    moved = tmp_path / "elsewhere" / "model"
    moved.parent.mkdir()
    shutil.move(folder, moved)
    with pytest.raises(FileNotFoundError) as err:
        MiniGPT.from_pretrained(moved)
    assert str(err.value) == (
        f"{moved / 'config.json'}: llm '../llama' is relative to the model folder and resolves to "
        f"{tmp_path / 'elsewhere' / 'llama'}, which does not exist: the folder was moved without what it references "
        "(move them together, or set llm to where it is now)"
    )
    shutil.copytree(tmp_path / "tree" / "llama", tmp_path / "elsewhere" / "llama")
    with pytest.raises(FileNotFoundError, match=r"vision_weights '\.\./vision' is relative to the model folder"):
        MiniGPT.from_pretrained(moved)
    shutil.move(tmp_path / "tree" / "vision", tmp_path / "elsewhere" / "vision")
    assert MiniGPT.from_pretrained(moved).config.llm == str(tmp_path / "elsewhere" / "llama")
