"""Load foreign checkpoints as flat tensor dicts without ever executing pickled code."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .files import UnsafeCheckpointError, refuse_unsafe_pickle

#: Wrappers around the state dict: LAVIS/MiniGPT-4 runner (``model``), DeepSpeed ``mp_rank_*`` (``module``).
WRAPPER_KEYS = ("model", "module")


def unwrap(obj: Any, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Strip ``{'model': ...}`` / ``{'module': ...}`` wrappers and check that what is left is a state dict."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected a state dict, got {type(obj).__name__}")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{where}: not a state dict, non-tensor entries: {', '.join(bad[:10])}")
    return dict(obj)


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file``, with a damaged file (empty, truncated, not safetensors) as one line naming
    it instead of safetensors' bare ``SafetensorError``."""
    try:
        return load_file(path)
    except SafetensorError as err:
        size = Path(path).stat().st_size
        raise ValueError(
            f"{path}: not a readable safetensors file ({size} bytes; {err}): it is empty or truncated, "
            "copy or write it again"
        ) from None


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read ``*.safetensors`` or a torch file with ``weights_only=True`` on CPU; unwrap ``model``/``module``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    with refuse_unsafe_pickle(path):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    return unwrap(obj, str(path))


__all__ = ["WRAPPER_KEYS", "UnsafeCheckpointError", "load_checkpoint", "load_safetensors", "unwrap"]
