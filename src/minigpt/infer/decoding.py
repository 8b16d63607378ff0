"""How generation decodes: transformers' ``generate`` ("plain") or the slot decoder ("static": preallocated KV cache,
one CUDA graph per token, continuous batching; :mod:`minigpt.infer.slots`), and the command-line flags for it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..device import supports_graph_capture

DECODING_MODES = ("auto", "static", "plain")


class FastDecodingUnsupported(RuntimeError):
    """The LLM cannot run the slot decoder (no transformers ``Cache`` support); use the plain path."""


@dataclass
class DecodingSettings:
    """How :meth:`Engine.generate <minigpt.infer.engine.Engine.generate>` decodes (asked for; the engine makes the
    choice once, :func:`choose_decoding`).

    ``mode``: ``static`` = the slot decoder, ``plain`` = transformers ``generate``, ``auto`` = static where a decode
    step can be captured as a graph (CUDA), plain elsewhere. ``max_len``: positions per slot (default: the prompt plus
    ``max_new_tokens``, rounded up to a multiple of 256, at most the model's context).
    """

    mode: str = "auto"
    cuda_graphs: bool = True
    compile: bool = False
    max_len: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in DECODING_MODES:
            raise ValueError(f"unknown decoding mode {self.mode!r}; use one of {', '.join(DECODING_MODES)}")


@dataclass(frozen=True)
class DecodingChoice:
    """What an engine decodes with (``static``: the slot decoder, ``plain``: transformers' ``generate``) and why.
    Beam search always runs plain."""

    mode: Literal["static", "plain"]
    reason: str

    def __str__(self) -> str:
        return f"{self.mode} ({self.reason})"


def choose_decoding(
    settings: DecodingSettings, device: torch.device, quantized: bool, unsupported: str | None
) -> DecodingChoice:
    """The one decoding choice for a model on ``device``: ``quantized`` (bitsandbytes kernels are not recorded in
    graphs) and ``unsupported`` (why its LLM cannot run the slot decoder, or None) make ``auto`` and ``static`` plain."""
    if settings.mode == "plain":
        return DecodingChoice("plain", "asked for")
    if unsupported:
        return DecodingChoice("plain", f"the slot decoder cannot run this LLM: {unsupported}")
    if settings.mode == "static":
        return DecodingChoice("static", "asked for")
    if quantized:
        return DecodingChoice("plain", "auto: a quantized LLM")
    if supports_graph_capture(device):
        return DecodingChoice("static", f"auto: graph capture on {device.type}")
    return DecodingChoice("plain", f"auto: no graph capture on {device.type}")


def add_decoding_arguments(group: Any) -> None:
    """``--decoding``, ``--no-cuda-graphs`` and ``--compile-decode`` (read back by :func:`settings_from_args`)."""
    group.add_argument(
        "--decoding",
        default="auto",
        choices=DECODING_MODES,
        help="static: preallocated KV cache + CUDA graph per token; plain: transformers generate; "
        "auto: static on CUDA, plain elsewhere (default: auto)",
    )
    group.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_false",
        help="static decoding without recording the step as a CUDA graph",
    )
    group.add_argument(
        "--compile-decode",
        action="store_true",
        help="also torch.compile the decoder layers that static decoding runs (fused kernels)",
    )


def settings_from_args(args: Any) -> DecodingSettings:
    return DecodingSettings(args.decoding, cuda_graphs=args.cuda_graphs, compile=args.compile_decode)


__all__ = [
    "DECODING_MODES",
    "DecodingChoice",
    "choose_decoding",
    "DecodingSettings",
    "FastDecodingUnsupported",
    "add_decoding_arguments",
    "settings_from_args",
]
