"""The ``MODEL`` and generation arguments shared by ``minigpt chat``, ``web`` and ``serve``, and loading.

A model is a directory written by :meth:`MiniGPT.save_pretrained`, or base parts: ``--llm`` (a
``transformers`` folder or hub id), ``--vision`` (a :func:`minigpt.convert.lavis.save_vision` folder)
and ``--projector`` (our ``.safetensors`` or an original MiniGPT-4 / MiniGPT4Qwen ``.pth``). With a
directory, ``--projector`` replaces its projector and ``--llm`` / ``--vision`` stand in for the parts
it does not store (a ``trainable_only`` checkpoint). Devices and dtypes come from :mod:`minigpt.device`.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .decoding import DecodingSettings, add_decoding_arguments, settings_from_args

if TYPE_CHECKING:
    import torch

    from ..model.minigpt import MiniGPT
    from .chat import ChatEngine
    from .generate import GenerationOptions

log = logging.getLogger(__name__)

Quantize = Literal["8bit", "4bit"]


@dataclass
class LoadSpec:
    """What to load and where. ``dtype`` "auto" = float32 on CPU, bf16 (or fp16) on accelerators."""

    model: str | None = None
    projector: str | None = None
    llm: str | None = None
    vision: str | None = None
    projector_type: str = "linear"
    template: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    quantize: Quantize | None = None
    trust_remote_code: bool = False
    decoding: DecodingSettings = field(default_factory=DecodingSettings)


# ---------------------------------------------------------------------------------------------- arguments
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``MODEL`` plus the base-part, device, dtype and quantization options."""
    from ..device import add_device_argument

    parser.add_argument("model", nargs="?", metavar="MODEL", help="model directory (from save_pretrained)")
    g = parser.add_argument_group("model")
    g.add_argument("--projector", metavar="CKPT", help="projector weights (.safetensors, or an original .pth)")
    g.add_argument("--llm", help="LLM folder or hub id (base parts; with MODEL: if MODEL has no llm/ folder)")
    g.add_argument("--vision", metavar="DIR", help="vision folder (vision_config.json + vision.safetensors); "
                   "with MODEL: if MODEL has no vision.safetensors")
    g.add_argument("--projector-type", default="linear", help="projector kind for base parts (default: linear)")
    g.add_argument("--template", help="prompt template (default: the model's)")
    add_device_argument(g)
    g.add_argument("--cpu-only", action="store_true", help="same as --device cpu")
    g.add_argument("--dtype", default="auto", help="auto, float32, bfloat16/bf16, float16/fp16 (default: auto)")
    q = g.add_mutually_exclusive_group()
    q.add_argument("--load-in-8bit", action="store_true", help="8-bit LLM via bitsandbytes (GPU only)")
    q.add_argument("--load-in-4bit", action="store_true", help="4-bit NF4 LLM via bitsandbytes (GPU only)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow the LLM's own modelling code")
    g.add_argument("--max-image-pixels", type=int, metavar="N",
                   help="refuse images of more pixels, read from the file's header before decoding (default: "
                        "4096x4096 = 16777216, about 100-250 MB to decode; 0: no limit)")


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """Decoding defaults (greedy unless ``--do-sample`` or ``--temperature`` > 0) and the context size."""
    g = parser.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=300)
    g.add_argument("--do-sample", action="store_true", help="sample (temperature / top-p) instead of greedy")
    g.add_argument("--temperature", type=float, help="> 0 turns sampling on; 0 = greedy")
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--num-beams", type=int, default=1)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--max-context", type=int, help="prompt + answer tokens (default: the LLM's maximum)")
    add_decoding_arguments(g)


def spec_from_args(args: argparse.Namespace) -> LoadSpec:
    if args.cpu_only and args.device not in ("auto", "cpu"):
        raise ValueError(f"--cpu-only contradicts --device {args.device}")
    quantize: Quantize | None = "8bit" if args.load_in_8bit else "4bit" if args.load_in_4bit else None
    return LoadSpec(
        model=args.model, projector=args.projector, llm=args.llm, vision=args.vision,
        projector_type=args.projector_type, template=args.template,
        device="cpu" if args.cpu_only else args.device, dtype=args.dtype, quantize=quantize,
        trust_remote_code=args.trust_remote_code, decoding=settings_from_args(args),
    )


def options_from_args(args: argparse.Namespace) -> "GenerationOptions":
    from .chat import override_options
    from .generate import GenerationOptions

    base = GenerationOptions(
        max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, top_p=args.top_p, top_k=args.top_k,
        num_beams=args.num_beams, repetition_penalty=args.repetition_penalty, seed=args.seed,
    )
    return override_options(base, temperature=args.temperature)


def engine_from_args(args: argparse.Namespace) -> "ChatEngine":
    """Load the model named by the arguments into a :class:`ChatEngine` with their options."""
    from .chat import ChatEngine

    options = options_from_args(args)  # validate before the (slow) load
    max_pixels = image_limit(args)
    spec = spec_from_args(args)
    model = load_model(spec)
    name = Path(spec.model).name if spec.model else Path(spec.llm or "minigpt").name
    slots = getattr(args, "batch_slots", 1)
    engine = ChatEngine(model, options, max_context=args.max_context, name=name or "minigpt", batch_slots=slots)
    engine.max_image_pixels = max_pixels
    return engine


def image_limit(args: argparse.Namespace) -> int | None:
    """``--max-image-pixels``: the default limit when not given, no limit for 0."""
    from ..data.images import DEFAULT_MAX_PIXELS

    value = args.max_image_pixels
    if value is not None and value < 0:
        raise ValueError(f"--max-image-pixels must be 0 (no limit) or more, got {value}")
    return DEFAULT_MAX_PIXELS if value is None else value or None


# ---------------------------------------------------------------------------------------------- loading
def resolve_placement(spec: LoadSpec) -> tuple["torch.device", "torch.dtype"]:
    """The device and weight dtype for ``spec``, with a clear error for what a CPU cannot do."""
    import torch

    from ..device import amp_dtype, parse_dtype, resolve_device

    device = resolve_device(spec.device)
    on_cpu = device.type == "cpu"
    if spec.quantize and on_cpu:
        raise RuntimeError(
            f"--load-in-{spec.quantize} needs a GPU (bitsandbytes); this run is on the CPU. "
            "Drop the flag, or use --dtype bfloat16 to halve the memory."
        )
    if spec.dtype == "auto":
        dtype = amp_dtype(device, "auto") or torch.float32
    else:
        dtype = parse_dtype(spec.dtype)
    if on_cpu and dtype == torch.float16:
        raise RuntimeError("float16 is not supported for inference on the CPU: use --dtype bfloat16 or float32")
    return device, dtype


def load_model(spec: LoadSpec) -> "MiniGPT":
    """Load ``spec`` onto its device in eval mode."""
    from ..device import dtype_name
    from ..model.minigpt import MiniGPT, MiniGPTConfig, load_projector_weights

    device, dtype = resolve_placement(spec)
    overrides: dict[str, Any] = {"llm_dtype": dtype_name(dtype), "vision_dtype": dtype_name(dtype)}
    if spec.template:
        overrides["template"] = spec.template
    if spec.trust_remote_code:
        overrides["trust_remote_code"] = True
    if spec.model:
        directory = Path(spec.model)
        if spec.llm:
            overrides["llm"] = spec.llm
        if spec.vision:
            overrides["vision_weights"] = spec.vision
        llm_kwargs = _quantization_kwargs(overrides["llm_dtype"], spec.quantize, device)
        model = MiniGPT.from_pretrained(directory, llm_kwargs=llm_kwargs, **overrides)
        if spec.projector:
            model.projector.load_state_dict(load_projector_weights(spec.projector))
    else:
        if not (spec.llm and spec.projector):
            raise ValueError("give a model directory, or base parts: --llm and --projector (and --vision)")
        if not spec.vision:
            log.warning("no --vision weights: the vision encoder is randomly initialised")
        config = MiniGPTConfig(
            llm=spec.llm, vision_weights=spec.vision, projector=spec.projector_type,
            projector_weights=spec.projector, **overrides,
        )
        model = MiniGPT.build(config, llm_kwargs=_quantization_kwargs(config.llm_dtype, spec.quantize, device))
    decoding = spec.decoding
    if spec.quantize and decoding.mode == "auto":  # bitsandbytes kernels: not recorded in graphs
        decoding = DecodingSettings("plain")
    model.decoding = decoding
    return _place(model, device, quantized=bool(spec.quantize)).eval()


def _place(model: "MiniGPT", device: "torch.device", quantized: bool) -> "MiniGPT":
    if not quantized:
        return model.to(device)
    # A bitsandbytes LLM is already on its device and refuses .to(); move the other parts.
    model.vision.to(device)
    model.projector.to(device)
    return model


def _quantization_kwargs(config_dtype: str, quantize: Quantize | None, device: "torch.device") -> dict[str, Any]:
    """``from_pretrained`` keyword arguments that load the LLM in 8 or 4 bits on ``device``."""
    if not quantize:
        return {}
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise RuntimeError("--load-in-8bit/4bit needs bitsandbytes: pip install bitsandbytes") from err
    from transformers import BitsAndBytesConfig

    from ..device import parse_dtype

    if quantize == "8bit":
        quant = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=parse_dtype(config_dtype)
        )
    return {"quantization_config": quant, "device_map": {"": str(device)}}


__all__ = [
    "LoadSpec", "add_generation_arguments", "add_model_arguments", "engine_from_args", "load_model",
    "options_from_args", "resolve_placement", "spec_from_args",
]
