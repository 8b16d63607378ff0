"""Checkpoints: atomic files, keep-last, and a run killed with SIGKILL that resumes exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minigpt.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from test_train_support import losses, make_shapes, read_metrics, tiny_config, write_yaml

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


def _train_cmd(config: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "minigpt.train.cli", str(config), *overrides]


def _final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted((output_dir / "final").glob("*.safetensors")):
        tensors.update({f"{path.stem}.{k}": v for k, v in load_file(path).items()})
    return tensors


def test_save_is_atomic_keeps_last_and_resolves(tmp_path):
    weights = {"w": torch.arange(4.0)}
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, weights, {"position": {"step": step}}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000006"]
    # A half-written checkpoint (killed before os.replace) is a hidden temporary folder: never listed or resumed.
    (tmp_path / "checkpoints" / ".tmp-step_00000008-123").mkdir()
    (tmp_path / "checkpoints" / ".tmp-step_00000008-123" / "state.pt").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path).name == "step_00000006"
    assert resolve_resume("auto", tmp_path).name == "step_00000006"
    assert resolve_resume("none", tmp_path) is None
    assert resolve_resume(str(tmp_path), tmp_path).name == "step_00000006"
    w, state = load_checkpoint(resolve_resume("auto", tmp_path))
    assert torch.equal(w["w"], weights["w"]) and state["position"]["step"] == 6
    save_checkpoint(tmp_path, 8, weights, {}, keep_last=2)  # cleans the leftover temporary folder
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000006", "step_00000008"]
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        resolve_resume(str(tmp_path / "nowhere"), tmp_path)


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, tiny_llama_dir):
    train_json = make_shapes(tmp_path / "data", 48)
    # Q-Former + projector train: the Q-Former's dropout makes the RNG states matter; random crops are on.
    config = tiny_config(
        tiny_llama_dir,
        train_json,
        tmp_path / "unused",
        model={"freeze": {"qformer": False}},
        run={
            "epochs": 6,
            "batch_size": 4,
            "grad_accum": 2,
            "save_every": 5,
            "keep_last": 2,
            "optimizer": {"lr": 3e-3, "weight_decay": 0.05},
            "schedule": {"name": "linear_warmup_cosine", "warmup_steps": 4, "warmup_lr": 1e-5, "min_lr": 1e-4},
        },
    )
    path = write_yaml(tmp_path / "run.yaml", config)
    total = 6 * 48 // 8

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    done = subprocess.run(
        _train_cmd(path, f"run.output_dir={reference}"), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]

    proc = subprocess.Popen(
        _train_cmd(path, f"run.output_dir={killed}"), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 240
        while not list_checkpoints(killed) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "final").exists(), "the run finished before it could be killed"
    resumed_from = latest_checkpoint(killed)
    step = int(resumed_from.name.split("_")[1])
    assert 0 < step < total and step % 6, f"expected a checkpoint in the middle of an epoch, got step {step}"

    done = subprocess.run(
        _train_cmd(path, f"run.output_dir={killed}"), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr

    ref_losses, new_losses = losses(read_metrics(reference)), losses(read_metrics(killed))
    assert len(ref_losses) == total
    assert new_losses == ref_losses  # bit for bit
    ref_w, new_w = _final_weights(reference), _final_weights(killed)
    assert ref_w.keys() == new_w.keys() and any(k.startswith("projector.") for k in ref_w)
    for key in ref_w:
        assert torch.equal(ref_w[key], new_w[key]), key


def test_resume_rules(tmp_path, tiny_llama_dir):
    from minigpt.train.config import validate_config
    from minigpt.train.launch import train

    config = tiny_config(
        tiny_llama_dir, make_shapes(tmp_path / "data", 8), tmp_path / "out", run={"max_steps": 2, "save_every": 1}
    )
    assert train(validate_config(config)).step == 2
    again = train(validate_config(config))  # resume=auto on a finished run: nothing left to do
    assert again.step == 2 and losses(again.history) == [] and (tmp_path / "out" / "final").is_dir()
    assert len(losses(read_metrics(tmp_path / "out"))) == 2
    config["run"]["batch_size"] = 2
    with pytest.raises(ValueError, match="cannot resume .*global_batch"):
        train(validate_config(config))
    config["run"].update(batch_size=4, resume="none")
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(validate_config(config))
