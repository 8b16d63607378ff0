"""Projectors from visual-token width to the LLM's hidden size."""

from __future__ import annotations

from torch import nn

PROJECTORS = ("linear", "mlp2x_gelu")


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """``linear`` (MiniGPT-4's ``llama_proj``) or ``mlp2x_gelu`` (Linear-GELU-Linear, LLaVA-1.5 style)."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    raise ValueError(f"unknown projector {kind!r}; use one of {', '.join(PROJECTORS)}")
