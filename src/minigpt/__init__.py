"""minigpt: turn any open LLM into a MiniGPT-4-style vision chat model."""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .data.conversation import Conversation, Image, Sample, Text
    from .infer.engine import Engine
    from .infer.generate import GenerationOptions
    from .model.config import MiniGPTConfig
    from .model.minigpt import MiniGPT
    from .model.processor import MiniGPTProcessor
    from .model.vision import VisionConfig

_LAZY = {
    "Engine": "minigpt.infer.engine",
    "MiniGPT": "minigpt.model.minigpt",
    "MiniGPTConfig": "minigpt.model.config",
    "MiniGPTProcessor": "minigpt.model.processor",
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


__all__ = [
    "Conversation",
    "Engine",
    "GenerationOptions",
    "Image",
    "MiniGPT",
    "MiniGPTConfig",
    "MiniGPTProcessor",
    "Sample",
    "Text",
    "VisionConfig",
    "__version__",
]
