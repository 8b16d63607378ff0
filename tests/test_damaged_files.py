"""A model directory with an empty or truncated weights file, or a config.json that lost its ``vision``: one line
naming the file and what is wrong, from the API and from every command that loads a model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from minigpt.cli import main
from minigpt.infer.engine import Engine


def _damaged(tiny_model_dir: Path, tmp_path: Path, name: str, how: str) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(b"" if how == "empty" else data[: len(data) // 2])
    return folder


@pytest.mark.parametrize("how", ["empty", "truncated"])
@pytest.mark.parametrize("name", ["projector.safetensors", "vision.safetensors"])
def test_engine_names_the_damaged_file(tiny_model_dir, tmp_path, name, how):
    folder = _damaged(tiny_model_dir, tmp_path, name, how)
    with pytest.raises(ValueError, match=r"not a readable safetensors file") as err:
        Engine.from_pretrained(folder, device="cpu")
    message = str(err.value)
    assert message.startswith(str(folder / name)) and "\n" not in message
    assert "empty or truncated" in message


def _eval_argv(folder: Path, tmp_path: Path, image_file: Path) -> list[str]:
    data = tmp_path / "pope.jsonl"
    data.write_text(json.dumps({"question_id": 0, "image": image_file.name, "text": "Red?", "label": "yes"}) + "\n")
    return ["eval", str(folder), "--task", "pope", "--data", str(data), "--images", str(image_file.parent)]


@pytest.mark.parametrize("command", ["chat", "eval", "serve"])
def test_commands_print_one_line(command, tiny_model_dir, tmp_path, image_file, capsys, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    folder = _damaged(tiny_model_dir, tmp_path, "vision.safetensors", "truncated")
    argv = _eval_argv(folder, tmp_path, image_file) if command == "eval" else [command, str(folder)]
    assert main([*argv, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"minigpt {command}: error: {folder / 'vision.safetensors'}: not a readable safetensors file "
        f"({(folder / 'vision.safetensors').stat().st_size} bytes; Error while deserializing header: incomplete "
        "metadata, file not fully covered): it is empty or truncated, copy or write it again"
    )


def test_config_without_vision_says_what_is_missing(tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["vision"]
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["chat", str(folder), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "size mismatch" not in err
    assert f'{folder / "config.json"}: no "vision" key, so the architecture of vision.safetensors is unknown' in err


def test_weights_that_do_not_fit_the_config_are_one_line(tiny_model_dir, tmp_path):
    """A ``vision`` that describes another encoder than the one saved: one line, the first mismatch shown."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["vision"]["width"] = config["vision"]["width"] * 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        Engine.from_pretrained(folder, device="cpu")
    message = str(err.value)
    assert "\n" not in message and len(message) < 600
    assert message.startswith(f"{folder / 'vision.safetensors'}: its tensors do not fit the vision architecture")
    assert "size mismatch" in message
