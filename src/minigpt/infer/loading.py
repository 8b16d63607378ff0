"""Loading a model and its processor for inference: from a model directory or from base parts.

A model is a directory written by :meth:`MiniGPT.save_pretrained`, or base parts: ``--llm`` (a
``transformers`` folder or hub id), ``--vision`` (a :func:`minigpt.model.vision.save_vision` folder)
and ``--projector`` (our ``.safetensors`` or an original MiniGPT-4 / MiniGPT4Qwen ``.pth``). With a
directory, ``--projector`` replaces its projector and ``--llm`` / ``--vision`` stand in for the parts
it does not store (a ``trainable_only`` checkpoint). Devices and dtypes come from :mod:`minigpt.device`.

:class:`LoadSpec` is the one set of loading options; :func:`minigpt.infer.engine.load_engine` turns it into an engine
for every front-end, and :func:`minigpt.infer.args.spec_from_args` reads it from the shared command-line flags.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .decoding import DecodingSettings

if TYPE_CHECKING:
    import torch

    from ..model.minigpt import MiniGPT
    from ..model.processor import MiniGPTProcessor

log = logging.getLogger(__name__)

Quantize = Literal["8bit", "4bit"]


@dataclass
class LoadSpec:
    """What to load and where. ``dtype`` "auto" = float32 on CPU, bf16 (or fp16) on accelerators; ``vision_dtype``
    (vision encoder + Q-Former) "auto" = ``dtype``. New placement options (a device map, memory limits) join here."""

    model: str | None = None
    projector: str | None = None
    llm: str | None = None
    vision: str | None = None
    projector_type: str = "linear"
    template: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    vision_dtype: str = "auto"
    quantize: Quantize | None = None
    trust_remote_code: bool = False
    decoding: DecodingSettings = field(default_factory=DecodingSettings)


# ---------------------------------------------------------------------------------------------- loading
def resolve_placement(spec: LoadSpec) -> tuple[torch.device, torch.dtype]:
    """The device and weight dtype for ``spec``, with a clear error for what a CPU cannot do."""
    import torch

    from ..device import amp_dtype, parse_dtype, resolve_device

    device = resolve_device(spec.device)
    on_cpu = device.type == "cpu"
    if spec.dtype == "auto":
        dtype = amp_dtype(device, "auto") or torch.float32
    else:
        dtype = parse_dtype(spec.dtype)
    if on_cpu and dtype == torch.float16:
        raise RuntimeError("float16 is not supported for inference on the CPU: use --dtype bfloat16 or float32")
    return device, dtype


def load_model(spec: LoadSpec) -> tuple[MiniGPT, MiniGPTProcessor]:
    """Load ``spec``: the model on its device in eval mode, and its processor."""
    from ..device import dtype_name, parse_dtype
    from ..model.config import MiniGPTConfig
    from ..model.minigpt import MiniGPT
    from ..model.processor import MiniGPTProcessor, load_pretrained
    from ..model.projector import load_projector_weights

    device, dtype = resolve_placement(spec)
    vision_dtype = dtype if spec.vision_dtype == "auto" else parse_dtype(spec.vision_dtype)
    overrides: dict[str, Any] = {"llm_dtype": dtype_name(dtype), "vision_dtype": dtype_name(vision_dtype)}
    if spec.template:
        overrides["template"] = spec.template
    llm_kwargs = _quantization_kwargs(overrides["llm_dtype"], spec.quantize, device)
    if spec.model:
        directory = Path(spec.model)
        if spec.llm:
            overrides["llm"] = spec.llm
        if spec.vision:
            overrides["vision_weights"] = spec.vision
        model, processor = load_pretrained(directory, llm_kwargs, spec.trust_remote_code, **overrides)
        if spec.projector:
            model.projector.load_state_dict(load_projector_weights(spec.projector))
    else:
        if not (spec.llm and spec.projector):
            raise ValueError("give a model directory, or base parts: --llm and --projector (and --vision)")
        if not spec.vision:
            log.warning("no --vision weights: the vision encoder is randomly initialised")
        config = MiniGPTConfig(
            llm=spec.llm,
            vision_weights=spec.vision,
            projector=spec.projector_type,
            projector_weights=spec.projector,
            trust_remote_code=spec.trust_remote_code,
            **overrides,
        )
        model = MiniGPT.build(config, llm_kwargs=llm_kwargs)
        processor = MiniGPTProcessor.from_config(config)
    return _place(model, device, quantized=bool(spec.quantize)).eval(), processor


def _place(model: MiniGPT, device: torch.device, quantized: bool) -> MiniGPT:
    return model.place(device)  # a bitsandbytes LLM stays on the device it was loaded on


def _quantization_kwargs(config_dtype: str, quantize: Quantize | None, device: torch.device) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments that load the LLM in 8 or 4 bits (NF4) on ``device`` (CPU included)."""
    if not quantize:
        return {}
    from ..model.llm import bnb_quantization

    quant = bnb_quantization(quantize, config_dtype)
    return {"quantization_config": quant, "device_map": {"": str(device)}}


__all__ = ["LoadSpec", "load_model", "resolve_placement"]
