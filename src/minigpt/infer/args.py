"""The ``MODEL`` and generation arguments shared by ``minigpt chat``, ``web``, ``serve``, ``eval`` and ``bench``.

A model is a directory written by :meth:`MiniGPT.save_pretrained`, or base parts (``--llm``, ``--vision``,
``--projector``); see :mod:`minigpt.infer.loading`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .decoding import add_decoding_arguments, settings_from_args
from .generate import GenerationOptions, OptionOverrides
from .loading import LoadSpec, Quantize

if TYPE_CHECKING:
    from .chat import ChatEngine


# ---------------------------------------------------------------------------------------------- arguments
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``MODEL`` plus the loading options (:func:`add_loading_arguments`) and the image size limit."""
    parser.add_argument("model", nargs="?", metavar="MODEL", help="model directory (from save_pretrained)")
    g = add_loading_arguments(parser)
    g.add_argument(
        "--max-image-pixels",
        type=int,
        metavar="N",
        help="refuse images of more pixels, read from the file's header before decoding (default: "
        "4096x4096 = 16777216, about 100-250 MB to decode; 0: no limit)",
    )


def add_loading_arguments(parser: argparse.ArgumentParser) -> Any:
    """The options of :class:`~minigpt.infer.loading.LoadSpec` (base parts, template, device, dtypes, quantization,
    remote code; read back by :func:`spec_from_args` with ``MODEL``), in a "model" group that is returned."""
    from ..device import add_device_argument

    g = parser.add_argument_group("model")
    g.add_argument("--projector", metavar="CKPT", help="projector weights (.safetensors, or an original .pth)")
    g.add_argument("--llm", help="LLM folder or hub id (base parts; with MODEL: if MODEL has no llm/ folder)")
    g.add_argument(
        "--vision",
        metavar="DIR",
        help="vision folder (vision_config.json + vision.safetensors); with MODEL: if MODEL has no vision.safetensors",
    )
    g.add_argument("--projector-type", default="linear", help="projector kind for base parts (default: linear)")
    g.add_argument("--template", help="prompt template (default: the model's)")
    add_device_argument(g)
    g.add_argument("--cpu-only", action="store_true", help="same as --device cpu")
    g.add_argument("--dtype", default="auto", help="auto, float32, bfloat16/bf16, float16/fp16 (default: auto)")
    g.add_argument(
        "--vision-dtype", default="auto", help="dtype of the vision encoder and Q-Former (default: auto, as --dtype)"
    )
    q = g.add_mutually_exclusive_group()
    q.add_argument("--load-in-8bit", action="store_true", help="8-bit LLM via bitsandbytes (CUDA or CPU)")
    q.add_argument("--load-in-4bit", action="store_true", help="4-bit NF4 LLM via bitsandbytes (CUDA or CPU)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow the LLM's own modelling code")
    g.add_argument(
        "--device-map",
        metavar="MAP",
        help="spread the LLM's layers over the GPUs, then the cpu (then disk): auto, balanced, sequential, or a JSON "
        "object / file of module -> device; the vision encoder and projector go to the first GPU (decoding: plain)",
    )
    g.add_argument(
        "--max-memory",
        metavar="LIMITS",
        help="memory per device for --device-map, e.g. 0=20GiB,1=20GiB,cpu=30GiB (or accelerate's JSON form)",
    )
    g.add_argument(
        "--offload-folder", metavar="DIR", help="where --device-map offloads what fits nowhere (default: a temp folder)"
    )
    return g


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
        model=args.model,
        projector=args.projector,
        llm=args.llm,
        vision=args.vision,
        projector_type=args.projector_type,
        template=args.template,
        device="cpu" if args.cpu_only else args.device,
        dtype=args.dtype,
        vision_dtype=args.vision_dtype,
        quantize=quantize,
        trust_remote_code=args.trust_remote_code,
        decoding=settings_from_args(args),
        device_map=args.device_map,
        max_memory=args.max_memory,
        offload_folder=args.offload_folder,
    )


def options_from_args(args: argparse.Namespace) -> GenerationOptions:
    base = GenerationOptions(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        top_p=args.top_p,
        top_k=args.top_k,
        num_beams=args.num_beams,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    return OptionOverrides(temperature=args.temperature).apply(base)


def engine_from_args(args: argparse.Namespace) -> ChatEngine:
    """Load the model named by the arguments into a :class:`ChatEngine` with their options."""
    from .chat import ChatEngine
    from .engine import load_engine

    options = options_from_args(args)  # validate before the (slow) load
    max_pixels = image_limit(args)
    spec = spec_from_args(args)
    name = Path(spec.model).name if spec.model else Path(spec.llm or "minigpt").name
    slots = getattr(args, "batch_slots", 1)
    engine = ChatEngine(
        load_engine(spec),
        options,
        max_context=args.max_context,
        name=name or "minigpt",
        batch_slots=slots,
    )
    engine.max_image_pixels = max_pixels
    return engine


def image_limit(args: argparse.Namespace) -> int | None:
    """``--max-image-pixels``: the default limit when not given, no limit for 0."""
    from ..data.images import DEFAULT_MAX_PIXELS

    value = args.max_image_pixels
    if value is not None and value < 0:
        raise ValueError(f"--max-image-pixels must be 0 (no limit) or more, got {value}")
    return DEFAULT_MAX_PIXELS if value is None else value or None


__all__ = [
    "add_generation_arguments",
    "add_loading_arguments",
    "add_model_arguments",
    "engine_from_args",
    "image_limit",
    "options_from_args",
    "spec_from_args",
]
