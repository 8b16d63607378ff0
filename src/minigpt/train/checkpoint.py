"""Atomic training checkpoints that resume a run exactly.

``OUTPUT/checkpoints/step_00000120/`` holds ``trainable.safetensors`` (the parameters being trained, by name),
``state.pt`` (optimizer, schedule, loss scaler, RNG states, data position and counters: tensors and plain Python
values only, so it loads with ``torch.load(weights_only=True)``) and ``meta.json`` (for people). A checkpoint is
written into a hidden temporary folder, synced, and renamed into place with ``os.replace``: a ``step_*`` folder is
always complete, whenever the process is killed. Older ones beyond ``keep_last`` are renamed away before deletion.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..device import get_rng_state, set_rng_state
from ..files import refuse_unsafe_pickle, save_safetensors
from ..safe_load import load_safetensors

CHECKPOINTS = "checkpoints"
WEIGHTS = "trainable.safetensors"
STATE = "state.pt"
META = "meta.json"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d+)$")


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    weights: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep_last: int | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep_last``; returns its folder."""
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(root)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    save_safetensors({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / WEIGHTS)
    torch.save({"format_version": FORMAT_VERSION, **state}, tmp / STATE)
    meta = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "weights": len(weights)}
    (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
    for name in (WEIGHTS, STATE, META):
        _fsync(tmp / name)
    _fsync(tmp)
    if final.exists():  # the same step written again (a run restarted from an older checkpoint)
        _discard(final)
    os.replace(tmp, final)
    _fsync(root)
    if keep_last:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            _discard(old)
    return final


def prune_beside(output_dir: str | Path, subdir: str, folder_of: Callable[[int], str]) -> None:
    """Delete the folders of ``checkpoints/SUBDIR`` (files a strategy writes beside ours, one folder per step, named
    ``folder_of(step)``) whose step has no complete checkpoint any more."""
    kept = {folder_of(int(p.name.removeprefix("step_"))) for p in list_checkpoints(output_dir)}
    root = checkpoint_dir(output_dir) / subdir
    for old in root.iterdir() if root.is_dir() else ():
        if old.is_dir() and old.name not in kept:
            shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """``none`` -> None; ``auto`` -> the newest checkpoint of ``output_dir`` (None if there is none); else a path
    (a checkpoint folder, or a run's output folder meaning its newest checkpoint)."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if (path / STATE).is_file() and (path / WEIGHTS).is_file():
        return path
    newest = latest_checkpoint(path)
    if newest is None:
        raise FileNotFoundError(
            f"run.resume: {path} is neither a checkpoint folder nor an output folder with checkpoints"
        )
    return newest


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(weights, state)`` of a checkpoint folder, on CPU."""
    path = Path(path)
    for name in (WEIGHTS, STATE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {name})")
    with refuse_unsafe_pickle(path / STATE, "minigpt never writes such a file: resume from a checkpoint you trust."):
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint format {state.get('format_version')!r}")
    return load_safetensors(path / WEIGHTS), state


# ---------------------------------------------------------------------------------------------- RNG states


def capture_rng(device: torch.device) -> dict[str, Any]:
    """Python, numpy, torch CPU and accelerator generator states, as tensors and plain values."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    accelerator = get_rng_state(device)
    if accelerator is not None:
        state["accelerator"] = accelerator
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    set_rng_state(device, state.get("accelerator"))


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------------------------------------- file helpers


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # directories cannot be synced on some systems
    finally:
        os.close(fd)


def _discard(path: Path) -> None:
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.replace(path, trash)  # gone from the listing at once, even if the deletion is interrupted
    shutil.rmtree(trash, ignore_errors=True)


def _clean_leftovers(root: Path) -> None:
    for p in root.iterdir():
        if p.name.startswith((".tmp-", ".trash-")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_resume",
    "capture_rng",
    "restore_rng",
    "checkpoint_dir",
    "prune_beside",
]
