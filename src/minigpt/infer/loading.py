"""Loading a model and its processor for inference: from a model directory or from base parts.

A model is a directory written by :meth:`MiniGPT.save_pretrained`, or base parts: ``--llm`` (a
``transformers`` folder or hub id), ``--vision`` (a :func:`minigpt.model.vision.save_vision` folder)
and ``--projector`` (our ``.safetensors`` or an original MiniGPT-4 / MiniGPT4Qwen ``.pth``). With a
directory, ``--projector`` replaces its projector and ``--llm`` / ``--vision`` stand in for the parts
it does not store (a ``trainable_only`` checkpoint). Devices and dtypes come from :mod:`minigpt.device`.

A device map (``device_map="auto"``, with ``max_memory``) spreads the LLM's layers over the visible accelerators and
then the cpu (and disk, into ``offload_folder``) through transformers' ``from_pretrained`` (accelerate's dispatch
hooks move activations between the parts); the vision encoder and the projector go to the first accelerator of the
map (the cpu when it has none).

:class:`LoadSpec` is the one set of loading options; :func:`minigpt.infer.engine.load_engine` turns it into an engine
for every front-end, and :func:`minigpt.infer.args.spec_from_args` reads it from the shared command-line flags.
"""

from __future__ import annotations

import atexit
import json
import logging
import shutil
import tempfile
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
#: transformers' named device-map strategies (``--device-map``); a JSON object (or file) maps modules to devices.
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass
class LoadSpec:
    """What to load and where. ``dtype`` "auto" = float32 on CPU, bf16 (or fp16) on accelerators; ``vision_dtype``
        (vision encoder + Q-Former) "auto" = ``dtype``. ``device_map``: spread the LLM (a strategy of
    :data:`DEVICE_MAP_STRATEGIES` or a dict of module -> device), within ``max_memory`` (``"0=20GiB,cpu=30GiB"`` or
    accelerate's dict), offloading what fits nowhere to ``offload_folder`` (default: a temporary folder)."""

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
    device_map: str | dict[str, Any] | None = None
    max_memory: str | dict[Any, Any] | None = None
    offload_folder: str | None = None


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
    llm_kwargs = {**_quantization_kwargs(overrides["llm_dtype"], spec.quantize, device), **_device_map_kwargs(spec)}
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
    return _place(model, device, placed=bool(spec.quantize or spec.device_map)).eval(), processor


def _place(model: MiniGPT, device: torch.device, placed: bool) -> MiniGPT:
    """``model`` on ``device``; an LLM that ``from_pretrained`` ``placed`` (bitsandbytes, a device map) stays where it
    is, and the vision encoder and the projector go to the first accelerator of its map."""
    from ..device import first_mapped_device, is_accelerator

    if not placed:
        return model.to(device)
    device_map = getattr(model.llm, "hf_device_map", None) or {"": device.index or 0}
    first = first_mapped_device(device_map.values(), device.type) if is_accelerator(device) else device
    model.vision.to(first)
    model.projector.to(first)
    return model


def parse_device_map(value: str | dict[str, Any]) -> str | dict[str, Any]:
    """``--device-map``: a strategy (:data:`DEVICE_MAP_STRATEGIES`), or a JSON object / JSON file of module name ->
    device (``0``, ``"cpu"``, ``"disk"``)."""
    if isinstance(value, dict) or value in DEVICE_MAP_STRATEGIES:
        return value
    text = Path(value).read_text(encoding="utf-8") if not value.lstrip().startswith("{") else value
    try:
        mapping = json.loads(text)
    except ValueError as err:
        raise ValueError(f"--device-map {value!r}: not a JSON object ({err})") from None
    if not isinstance(mapping, dict):
        raise ValueError(
            f"--device-map {value!r}: use {', '.join(DEVICE_MAP_STRATEGIES)} or a JSON object of module -> device"
        )
    return mapping


def _device_map_kwargs(spec: LoadSpec) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments that spread the LLM by ``spec``'s device map (none without one)."""
    from ..device import parse_max_memory

    if not spec.device_map:
        if spec.max_memory or spec.offload_folder:
            raise ValueError("--max-memory and --offload-folder need --device-map (e.g. --device-map auto)")
        return {}
    kwargs: dict[str, Any] = {"device_map": parse_device_map(spec.device_map)}
    if spec.max_memory:
        kwargs["max_memory"] = parse_max_memory(spec.max_memory)
    kwargs["offload_folder"] = spec.offload_folder or _temporary_offload_folder()
    return kwargs


def _temporary_offload_folder() -> str:
    """A folder for the weights a device map offloads to disk, removed when the process ends."""
    folder = tempfile.mkdtemp(prefix="minigpt-offload-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def device_map_problem(llm: Any) -> str | None:
    """Why the slot decoder cannot run an LLM that a device map split (over several devices, or partly offloaded to
    disk), or None."""
    device_map = getattr(llm, "hf_device_map", None) or {}
    places = list(dict.fromkeys(str(p) for p in device_map.values()))
    if len(places) > 1 or "disk" in places:
        return f"a device map splits it ({', '.join(places)})"
    return None


def _quantization_kwargs(config_dtype: str, quantize: Quantize | None, device: torch.device) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments that load the LLM in 8 or 4 bits (NF4) on ``device`` (CPU included)."""
    if not quantize:
        return {}
    from ..model.llm import bnb_quantization

    quant = bnb_quantization(quantize, config_dtype)
    return {"quantization_config": quant, "device_map": {"": str(device)}}


__all__ = [
    "DEVICE_MAP_STRATEGIES",
    "LoadSpec",
    "device_map_problem",
    "load_model",
    "parse_device_map",
    "resolve_placement",
]
