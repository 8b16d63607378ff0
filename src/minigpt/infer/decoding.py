"""How generation decodes: transformers' ``generate`` ("plain") or the slot decoder ("static": preallocated KV cache,
one CUDA graph per token, continuous batching; :mod:`minigpt.infer.slots`), and the command-line flags for it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..device import supports_graph_capture

DECODING_MODES = ("auto", "static", "plain")


class FastDecodingUnsupported(RuntimeError):
    """The LLM cannot run the slot decoder (no transformers ``Cache`` support); use the plain path."""


@dataclass
class DecodingSettings:
    """How :meth:`MiniGPT.generate` decodes.

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

    def use_static(self, device: torch.device, num_beams: int = 1) -> bool:
        """Whether generation on ``device`` runs on the slot decoder (beam search never does)."""
        if num_beams > 1 or self.mode == "plain":
            return False
        return self.mode == "static" or supports_graph_capture(device)


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
    "DecodingSettings",
    "FastDecodingUnsupported",
    "add_decoding_arguments",
    "settings_from_args",
]
