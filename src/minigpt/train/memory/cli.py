"""``minigpt plan``: the peak memory per device of a training run (or of chat/serve), before anything loads."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

EPILOG = """examples:
  minigpt plan configs/minigpt4_stage2.yaml --gpu 24
  minigpt plan configs/minigpt4_stage2.yaml run.batch_size=2 run.grad_checkpointing=true --gpu h100
  minigpt plan vicuna-7b --method lora --batch-size 4 --gpu 24
  minigpt plan qwen-14b-chat --method full --gpus 8 --zero-stage 3 --gpu 80
  minigpt plan vicuna-13b --serve --batch-slots 8 --max-context 2048 --load-in-4bit --gpu 24
"""


def register(subparsers: Any) -> None:
    from .planner import GPUS, LLM_PRESETS, METHODS

    p = subparsers.add_parser(
        "plan",
        help="predict a run's peak memory per device, by part, and the settings that fit a GPU",
        description="Predict the peak memory per device of training (or of chat/serve with --serve) from the configs "
        "alone: weights per part, gradients, optimizer state, activations, inputs, KV cache, runtime. Nothing is "
        "loaded: the model is built on the meta device and one step traced on fake tensors.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "target",
        help=f"a training YAML config, or an LLM: a preset ({', '.join(LLM_PRESETS)}), a folder or a hub id "
        "(then with EVA ViT-g + Q-Former, bf16 weights)",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (with a YAML config)")
    p.add_argument("--gpu", metavar="NAME|GB", help=f"a GPU to fit: a size in GB or {', '.join(GPUS)}")
    p.add_argument("--gpus", type=int, metavar="N", help="GPUs (processes) the run uses (default 1)")
    p.add_argument("--method", choices=METHODS, help="train the projector only, LoRA, QLoRA (4-bit LLM) or all")
    p.add_argument("--batch-size", type=int, metavar="N", help="micro-batch per device")
    p.add_argument("--grad-checkpointing", action="store_true", help="checkpoint the LLM's decoder layers")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), help="DeepSpeed ZeRO stage (0: none)")
    p.add_argument("--offload", action="store_true", help="optimizer state on the CPU (ZeRO-Offload)")
    p.add_argument("--optimizer", choices=("adamw", "adamw8bit"), help="optimizer state to plan for")
    p.add_argument("--seq-len", type=int, metavar="N", help="positions per sample (default: image + max_txt_len)")
    p.add_argument("--answer-tokens", type=int, metavar="N", help="supervised tokens per sample (default: all text)")
    p.add_argument("--feature-cache", action="store_true", help="visual features from a cache: no vision pass")
    p.add_argument("--cpu", action="store_true", help="plan for the CPU: no CUDA context, fp32 unless the config says")
    g = p.add_argument_group("inference (chat / serve)")
    g.add_argument("--serve", action="store_true", help="plan chat/serve: weights + slot KV cache + prefill")
    g.add_argument("--batch-slots", type=int, default=1, metavar="N", help="decoding slots (serve --batch-slots)")
    g.add_argument("--max-context", type=int, default=2048, metavar="N", help="prompt + answer positions per slot")
    q = g.add_mutually_exclusive_group()
    q.add_argument("--load-in-4bit", action="store_true", help="the LLM in 4 bits (bitsandbytes NF4)")
    q.add_argument("--load-in-8bit", action="store_true", help="the LLM in 8 bits (bitsandbytes)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run_plan)


def base_job(args: argparse.Namespace) -> Any:
    """The :class:`Job` the target names: a YAML config with its overrides, or an LLM with the seeds' defaults."""
    from ...model.vision import VisionConfig
    from .planner import Job, job_from_config, llm_config
    from .trace import Shape

    accelerator = not args.cpu
    if Path(args.target).suffix in (".yaml", ".yml"):
        from ..config import load_config

        return job_from_config(load_config(args.target, list(args.overrides)), accelerator, args.gpus or 1)
    if args.overrides:
        raise ValueError("KEY=VALUE overrides need a YAML config; with an LLM use the options (--batch-size, ...)")
    vision = VisionConfig()
    text = 160
    dtype = "bfloat16" if accelerator else "float32"
    return Job(
        llm=llm_config(args.target),
        vision=vision,
        llm_dtype=dtype,
        vision_dtype="float16" if accelerator else "float32",
        amp="bf16" if accelerator else "no",
        shape=Shape(4, 1 + vision.num_tokens + text, text),
        accelerator=accelerator,
    )


def job_of(args: argparse.Namespace) -> Any:
    """The base job with the command line's what-ifs applied."""
    job = base_job(args)
    if args.method:
        job = job.with_method(args.method)
    shape = job.shape
    if args.batch_size:
        shape = replace(shape, batch=args.batch_size)
    if args.seq_len:
        shape = replace(
            shape,
            positions=args.seq_len,
            answers=min(shape.answers, args.seq_len - 1 - shape.images * job.vision.num_tokens),
        )
    if args.answer_tokens:
        shape = replace(shape, answers=args.answer_tokens)
    if args.feature_cache:
        shape = replace(shape, vision_in_step=False)
    changes: dict[str, Any] = {"shape": shape}
    if args.grad_checkpointing:
        changes["checkpointing"] = True
    if args.gpus:
        changes["gpus"] = args.gpus
    if args.zero_stage is not None:
        changes["zero_stage"] = args.zero_stage
    if args.offload:
        changes["offload"] = True
    if args.optimizer:
        changes["optimizer"] = args.optimizer
    if args.load_in_4bit or args.load_in_8bit:
        changes["quantization"] = "4bit" if args.load_in_4bit else "8bit"
    return replace(job, **changes)


def run_plan(args: argparse.Namespace) -> int:
    from .planner import alternatives, fitting_options, gpu_bytes, human, plan_inference, plan_training

    job = job_of(args)
    capacity = gpu_bytes(args.gpu) if args.gpu else None
    if args.serve:
        plan = plan_inference(job, args.batch_slots, args.max_context)
        title = f"chat/serve: {args.batch_slots} slot(s) x {args.max_context} positions"
    else:
        plan = plan_training(job)
        title = (
            f"training ({job.method}): micro-batch {job.shape.batch} x {job.shape.positions} positions, "
            f"checkpointing {'on' if job.checkpointing else 'off'}, "
            f"{f'ZeRO-{job.zero_stage} over {job.gpus} GPU(s)' if job.zero_stage else f'{job.gpus} GPU(s)'}"
        )
    options = fitting_options(job, capacity) if capacity is not None and not args.serve else []
    if args.json:
        print(json.dumps(_json(plan, capacity, options), indent=1))
        return 0
    print(plan.table(title))
    if capacity is not None:
        verdict = "fits" if plan.total <= capacity else "does NOT fit"
        print(f"\n{verdict} {args.gpu} ({human(capacity)} per device)")
    if capacity is not None and not args.serve:
        names = ", ".join(alternatives(job.method))
        if options:
            print(f"settings that fit ({names}), fastest first:")
            for option in options:
                print(f"  {option.describe()}")
        else:
            print(f"no setting of {names} fits; try more GPUs (--gpus N --zero-stage 3) or a smaller LLM")
    return 0


def _json(plan: Any, capacity: float | None, options: list[Any]) -> dict[str, Any]:
    return {
        "method": plan.job.method,
        "rows": [asdict(r) for r in plan.rows],
        "allocated_bytes": plan.allocated,
        "total_bytes": plan.total,
        "capacity_bytes": capacity,
        "fits": None if capacity is None else plan.total <= capacity,
        "options": [asdict(o) for o in options],
    }


__all__ = ["register"]
