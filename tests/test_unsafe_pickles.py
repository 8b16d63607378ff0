"""Pickled files that would run code are refused with one line naming the file and the global, never executed:
a run's ``state.pt`` (resume), an LLM's ``pytorch_model.bin`` (init_from, chat), a peft ``adapter_model.bin``."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import save_file

from minigpt.cli import main
from minigpt.files import UnsafeCheckpointError
from minigpt.train.checkpoint import STATE, WEIGHTS, load_checkpoint


class _Evil:
    """Unpickling it calls ``os.mkdir(marker)`` (where an attacker's file would call os.system)."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _evil_file(path: pathlib.Path, marker: pathlib.Path, tensors: dict | None = None) -> pathlib.Path:
    torch.save({**(tensors or {}), "hook": _Evil(marker)}, path)
    return path


def _check_refusal(message: str, file: pathlib.Path, marker: pathlib.Path) -> None:
    assert f"{file}: refusing to load, it needs unsafe unpickling ({os.mkdir.__module__}.mkdir)." in message
    assert "weights_only" not in message and "\n" not in message.strip()
    assert not marker.exists()


def test_resume_state_is_refused(tmp_path):
    step, marker = tmp_path / "checkpoints" / "step_00000002", tmp_path / "executed"
    step.mkdir(parents=True)
    save_file({"projector.weight": torch.zeros(2, 2)}, step / WEIGHTS)
    _evil_file(step / STATE, marker, {"format_version": 1})
    with pytest.raises(UnsafeCheckpointError) as err:
        load_checkpoint(step)
    _check_refusal(str(err.value), step / STATE, marker)


def _evil_llm(tiny_llama_dir: pathlib.Path, target: pathlib.Path, marker: pathlib.Path) -> pathlib.Path:
    shutil.copytree(tiny_llama_dir, target, ignore=shutil.ignore_patterns("*.safetensors*"))
    return _evil_file(target / "pytorch_model.bin", marker, {"model.embed_tokens.weight": torch.zeros(2, 2)})


def test_init_from_llm_bin_is_refused(tmp_path, tiny_llama_dir):
    from minigpt.train.config import ModelSection
    from minigpt.train.loop import build_model

    init, marker = tmp_path / "final", tmp_path / "executed"
    bin_file = _evil_llm(tiny_llama_dir, init / "llm", marker)
    (init / "config.json").write_text("{}")
    with pytest.raises(UnsafeCheckpointError) as err:
        build_model(ModelSection(llm="unused", vision="tiny", init_from=str(init)))
    _check_refusal(str(err.value), bin_file, marker)


def test_merge_lora_peft_bin_is_refused_with_exit_code_2(tmp_path, tiny_model_dir, capsys):
    adapter, marker = tmp_path / "adapter", tmp_path / "executed"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
        )
    )
    bin_file = _evil_file(adapter / "adapter_model.bin", marker)
    code = main(["convert", "merge-lora", str(adapter), "--base", str(tiny_model_dir), "--out", str(tmp_path / "out")])
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after the base model's loading bar
    assert code == 2 and line.startswith("minigpt convert: error: ")
    _check_refusal(line, bin_file, marker)
    assert not (tmp_path / "out").exists()


def test_atomic_file_writes_replace_whole_files_or_nothing(tmp_path):
    from minigpt.files import atomic_open, atomic_write_text

    target = tmp_path / "sub" / "metrics.json"
    atomic_write_text(target, "old\n")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_open(target) as f:
            f.write("half of the new")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old\n" and sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]
    atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n" and sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]
