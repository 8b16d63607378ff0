"""Projectors from visual-token width to the LLM's hidden size, and their weights from the original checkpoints."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..safe_load import load_checkpoint, load_safetensors

PROJECTORS = ("linear", "mlp2x_gelu")
#: The projector's names in MiniGPT-4 (``llama_proj``), MiniGPT4Qwen (``llm_proj``), the MPP pipeline's
#: ``layer_00-model_states.pt`` (``visionpipe.llm_proj``) and transformers' BLIP-2 (``language_projection``).
PROJECTOR_PREFIXES = ("llama_proj.", "llm_proj.", "visionpipe.llm_proj.", "language_projection.")


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """``linear`` (MiniGPT-4's ``llama_proj``) or ``mlp2x_gelu`` (Linear-GELU-Linear, LLaVA-1.5 style)."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    raise ValueError(f"unknown projector {kind!r}; use one of {', '.join(PROJECTORS)}")


def projector_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """The linear projector of an original checkpoint's state dict: float32 ``{"weight", "bias"}`` and the
    prefix it was found under (a ValueError unless exactly one of :data:`PROJECTOR_PREFIXES` is there)."""
    found = [p for p in PROJECTOR_PREFIXES if p + "weight" in state and p + "bias" in state]
    if len(found) != 1:
        names = ", ".join(p + "{weight,bias}" for p in PROJECTOR_PREFIXES)
        raise ValueError(f"expected exactly one projector of {names}; found {found or 'none'}")
    return {name: state[found[0] + name].to(torch.float32).contiguous() for name in ("weight", "bias")}, found[0]


def load_projector_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A projector state dict from our ``.safetensors`` or an original MiniGPT-4 / MiniGPT4Qwen checkpoint
    (read without unpickling code)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    return projector_state(load_checkpoint(path))[0]
