"""minigpt: turn any open LLM into a MiniGPT-4-style vision chat model."""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .data.conversation import Conversation, Image, Sample, Text
    from .infer.generate import GenerationOptions
    from .model.minigpt import MiniGPT, MiniGPTConfig
    from .model.vision import VisionConfig

_LAZY = {
    "MiniGPT": "minigpt.model.minigpt",
    "MiniGPTConfig": "minigpt.model.minigpt",
    "VisionConfig": "minigpt.model.vision",
    "Conversation": "minigpt.data.conversation",
    "Image": "minigpt.data.conversation",
    "Text": "minigpt.data.conversation",
    "Sample": "minigpt.data.conversation",
    "GenerationOptions": "minigpt.infer.generate",
}


def __getattr__(name: str) -> Any:
    """Import the public classes lazily so ``import minigpt`` (and the CLI) start fast."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'minigpt' has no attribute {name!r}")
