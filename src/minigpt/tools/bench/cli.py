"""``minigpt bench train|generate``: speed of the training step and of generation, as JSON.

A MiniGPT of real shapes with random weights (EVA ViT-g + Q-Former + a LLaMA/Qwen-shaped LLM, or tiny/small shapes
for the CPU, or any transformers config) on synthetic batches: no data loading, no downloads. ::

    minigpt bench train --llm llama-7b --vision eva_vit_g --stage 1 --batch-size 64 --reference-style
    minigpt bench train --llm small --vision small --stage 2 --batch-size 12 --lengths cc_sbu_align \\
        --batching pad,group,pack
    minigpt bench generate --llm llama-7b --vision eva_vit_g --new-tokens 128 --reference-style
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .common import LLM_SHAPES, VISION_SHAPES
from .generate import add_generate_arguments, bench_generate
from .memory import add_memory_arguments, bench_memory
from .train import bench_train

# ---------------------------------------------------------------------------------------------- command line


def register(subparsers: Any) -> None:
    from ...cli import add_command_group
    from ...device import add_device_argument
    from ...model.loss import LOSS_IMPLS

    sub = add_command_group(
        subparsers,
        "bench",
        help="benchmark the training step, generation and the memory planner (JSON: samples/s, MFU, memory, TTFT)",
        description="Time a MiniGPT of real (or small) shapes with random weights on synthetic batches and print "
        "the figures as JSON. Runs on CPU with small shapes and on a GPU with real ones.",
    )

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--llm",
            default="tiny",
            metavar="SHAPE",
            help=f"LLM shape: {', '.join(LLM_SHAPES)}, or a transformers config folder/file (default tiny)",
        )
        q.add_argument("--vision", default="tiny", choices=VISION_SHAPES, help="vision shape (default tiny)")
        q.add_argument("--batch-size", type=int, default=4, metavar="N")
        q.add_argument(
            "--dtype",
            default="auto",
            help="our LLM dtype: auto (bf16 on accelerators, fp32 on CPU), float32, bfloat16, float16",
        )
        q.add_argument("--attn", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"), help="our attention")
        q.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (ours)")
        q.add_argument(
            "--reference-style",
            action="store_true",
            help="also run the original code's way (fp16 + GradScaler, eager, full LM head), side by side",
        )
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--out", "-o", metavar="FILE", help="also write the JSON here")
        add_device_argument(q)

    q = sub.add_parser(
        "train",
        help="training step: samples/s, tokens/s, MFU, peak memory",
        description="Time the training step (projector trains, LLM and vision frozen).",
    )
    common(q)
    q.add_argument("--stage", type=int, default=1, choices=(1, 2), help="1: [BOS][img][caption]; 2: prompt+answer")
    q.add_argument("--text-tokens", type=int, metavar="N", help="supervised tokens per sample (default 32 / 128)")
    q.add_argument(
        "--lengths",
        default="fixed",
        choices=("fixed", "cc_sbu_align"),
        help="supervised lengths: fixed, or drawn from a cc_sbu_align-like distribution",
    )
    q.add_argument("--batching", default="pad", help="comma list of pad, group, pack (each a case)")
    q.add_argument("--pack-len", type=int, default=512, metavar="N", help="positions per packed row (default 512)")
    q.add_argument("--steps", type=int, default=8, metavar="N", help="timed steps (default 8)")
    q.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed steps first (default 3)")
    q.add_argument("--vision-every-step", action="store_true", help="ours runs ViT + Q-Former in the step (no cache)")
    q.add_argument("--grad-checkpointing", action="store_true", help="checkpoint the LLM's layers (ours)")
    q.add_argument(
        "--loss-impl",
        default="auto",
        choices=LOSS_IMPLS,
        help="our LM head + cross-entropy: auto, plain, chunked or liger (default auto)",
    )
    q.add_argument("--feature-dtype", default="float16", help="dtype of the cached features (default float16)")
    q.add_argument(
        "--peak-tflops",
        type=float,
        metavar="X",
        help="peak TFLOP/s for MFU (default: measure a matmul ceiling here; 0: report MFU as null)",
    )
    q.set_defaults(func=_run, bench=bench_train)

    q = sub.add_parser(
        "generate",
        help="time to first token and decode tokens/s",
        description="Time generation from a one-image prompt (image tokens + --prompt-tokens).",
    )
    common(q)
    add_generate_arguments(q)
    q.set_defaults(func=_run, bench=bench_generate)

    q = sub.add_parser(
        "memory",
        help="predicted vs measured peak memory of training steps, per configuration",
        description="Train tiny and small models (full, LoRA, QLoRA; checkpointing; micro-batch 1/4; stage 1/2; "
        "fp32/bf16) for a few steps and print, per configuration, the planner's predicted_bytes and the "
        "measured_bytes (CPU: the peak of live tensor bytes; accelerators: the allocator's peak).",
    )
    add_memory_arguments(q)
    q.set_defaults(func=_run, bench=bench_memory)


def _run(args: argparse.Namespace) -> int:
    report = args.bench(args)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


__all__ = ["register"]
