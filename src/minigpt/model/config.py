"""The model config: one schema for ``config.json`` in a model directory and the YAML ``model:`` section.

:class:`MiniGPTConfig` says everything needed to rebuild a model (LLM source, vision architecture and weights,
projector, template, dtypes, freezing). The training config's ``model:`` section is this schema plus the
training-only keys (:class:`minigpt.train.config.ModelSection`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from ..data.templates import get_template
from ..device import parse_dtype
from .vision import VisionConfig

#: The freezable parts of a model, in order.
PARTS = ("vision", "qformer", "projector", "llm")
#: Default freezing (MiniGPT-4): only the projector trains.
DEFAULT_FREEZE = {part: part != "projector" for part in PARTS}
#: Named vision architectures for the ``vision`` key (a preset name, or a mapping with an optional ``preset``).
VISION_PRESETS = ("eva_vit_g", "tiny")
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1
#: What a file that asks for ``trust_remote_code`` is told: only the call's flag turns remote code on.
REMOTE_CODE_IGNORED = (
    "asks for trust_remote_code; ignored: remote code runs only when the loading call asks for it "
    "(--trust-remote-code / trust_remote_code=True)"
)


def vision_config(value: str | dict[str, Any] | VisionConfig) -> VisionConfig:
    """A :class:`VisionConfig` from a preset name, a mapping of its fields (``preset`` optional), or itself."""
    if isinstance(value, VisionConfig):
        return value
    fields = {"preset": value} if isinstance(value, str) else dict(value)
    preset = fields.pop("preset", "eva_vit_g")
    if preset not in VISION_PRESETS:
        raise ValueError(f"unknown vision preset {preset!r}; use one of {', '.join(VISION_PRESETS)}")
    base = (VisionConfig.tiny() if preset == "tiny" else VisionConfig()).to_dict()
    return VisionConfig.from_dict({**base, **fields})


class MiniGPTConfig(BaseModel):
    """Everything needed to rebuild a model; saved as ``config.json`` in a model directory."""

    model_config = ConfigDict(extra="forbid", validate_default=True, arbitrary_types_allowed=True)

    #: Hub id or local directory of the causal LM.
    llm: str
    llm_gguf_file: str | None = None
    #: A preset name (``eva_vit_g``, ``tiny``), a mapping of :class:`VisionConfig` fields, or a VisionConfig.
    vision: VisionConfig = VisionConfig()
    #: Directory with ``vision_config.json`` + ``vision.safetensors`` (:func:`minigpt.model.vision.save_vision`).
    vision_weights: str | None = None
    projector: Literal["linear", "mlp2x_gelu"] = "linear"
    projector_weights: str | None = None
    llm_dtype: str = "float32"
    vision_dtype: str = "float32"
    template: str = "vicuna0"
    #: The system prompt of every conversation that has none, in training and generation alike; null: the
    #: template's own (``hf``: the chat template's default, e.g. SmolLM2's "You are a helpful AI assistant named
    #: SmolLM, ..."); "" renders an empty system turn.
    system_prompt: str | None = None
    max_txt_len: int = 160
    #: Frozen parts (missing ones take :data:`DEFAULT_FREEZE`); always complete after validation.
    freeze: dict[str, bool] = {}
    #: The loading call's flag (never read from a file: remote code runs only when the call asks for it); written
    #: as false (:func:`write_config`), so an output never passes it on.
    trust_remote_code: bool = False

    @field_validator("vision", mode="before")
    @classmethod
    def _vision(cls, value: Any) -> VisionConfig:
        return vision_config(value)

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        get_template(value)
        return value

    @field_validator("llm_dtype", "vision_dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        parse_dtype(value)
        return value

    @field_validator("max_txt_len")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value <= 0:
            raise ValueError("must be > 0")
        return value

    @field_validator("freeze")
    @classmethod
    def _freeze(cls, value: dict[str, bool]) -> dict[str, bool]:
        unknown = set(value) - set(PARTS)
        if unknown:
            raise ValueError(f"unknown part(s) in freeze: {', '.join(sorted(unknown))}; parts are {', '.join(PARTS)}")
        return {part: bool(value.get(part, DEFAULT_FREEZE[part])) for part in PARTS}

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``config.json``), restricted to this schema's keys."""
        data = self.model_dump(mode="json", include=set(MiniGPTConfig.model_fields))
        data["vision"] = self.vision.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MiniGPTConfig:
        data = {k: v for k, v in data.items() if k != "format_version"}
        unknown = sorted(set(data) - set(cls.model_fields))
        if unknown:
            raise ValueError(f"unknown model config key(s): {', '.join(unknown)}")
        return cls(**data)

    def copy_with(self, **changes: Any) -> MiniGPTConfig:
        """A validated copy with ``changes``."""
        return MiniGPTConfig.from_dict({**self.to_dict(), **changes})


def read_config(directory: str | Path) -> dict[str, Any]:
    """The raw ``config.json`` of a model directory (a clear error when there is none or it is not JSON)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a minigpt model directory (no {CONFIG_FILE})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def write_config(directory: str | Path, config: MiniGPTConfig, **changes: Any) -> None:
    """Write ``config.json`` (with the format version) into ``directory``; ``trust_remote_code`` is written false
    whatever the model was loaded with: the folder's readers decide it with their own flag."""
    data = {"format_version": FORMAT_VERSION, **config.to_dict(), **changes, "trust_remote_code": False}
    (Path(directory) / CONFIG_FILE).write_text(json.dumps(data, indent=2) + "\n")


__all__ = [
    "CONFIG_FILE",
    "DEFAULT_FREEZE",
    "FORMAT_VERSION",
    "MiniGPTConfig",
    "PARTS",
    "REMOTE_CODE_IGNORED",
    "VISION_PRESETS",
    "read_config",
    "vision_config",
    "write_config",
]
