"""``minigpt bench memory``: the planner's prediction next to the measured peak of real training steps.

Each configuration builds the bench model (:func:`.common.build_bench_model`, random weights; QLoRA: its LLM saved
and loaded back in 4 bits by bitsandbytes, as training loads it), trains it for ``--steps`` optimizer steps through
the Trainer's own :func:`~minigpt.train.loop.run_step` (fused AdamW, the run's autocast, gradient checkpointing) and
records ``predicted_bytes`` (:func:`minigpt.train.memory.planner.plan_training`, without the CUDA runtime constant)
and ``measured_bytes``: on CPU the peak of live tensor bytes (:class:`~minigpt.train.memory.counting.LiveBytes`:
weights, batch, activations, gradients, optimizer state), on an accelerator the allocator's peak
(``max_memory_allocated``).

Stage 1 samples are ``[BOS][image][32 caption]`` with the vision pass in the step; stage 2 ``[BOS][image][35 prompt]
[128 answer]`` with Q-Former features from a cache (as ``bench train``'s default).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from .common import build_bench_model, llm_shape, machine_info, vision_shape

#: (prompt, answer) tokens per stage, after [BOS][image].
STAGES = {1: (0, 32), 2: (35, 128)}


@dataclass(frozen=True)
class MemoryCase:
    llm: str
    method: str  # projector, full, lora, qlora
    checkpointing: bool
    micro_batch: int
    stage: int
    dtype: str  # float32 or bfloat16 (weights and autocast)

    @property
    def name(self) -> str:
        ckpt = "ckpt" if self.checkpointing else "nockpt"
        return f"{self.llm}-{self.method}-{ckpt}-mb{self.micro_batch}-stage{self.stage}-{self.dtype}"


def cpu_cases() -> list[MemoryCase]:
    """The CPU set: every method x checkpointing x micro-batch on the tiny LLM (stage and dtype alternating), and
    six on the small one."""
    cases = []
    for i, (method, ckpt, mb) in enumerate(
        (m, c, b) for m in ("full", "lora", "qlora") for c in (False, True) for b in (1, 4)
    ):
        cases.append(MemoryCase("tiny", method, ckpt, mb, 1 + i % 2, ("float32", "bfloat16")[(i // 2) % 2]))
    cases += [
        MemoryCase("small", "projector", False, 4, 2, "float32"),
        MemoryCase("small", "full", True, 1, 2, "bfloat16"),
        MemoryCase("small", "lora", False, 4, 1, "bfloat16"),
        MemoryCase("small", "lora", True, 4, 2, "float32"),
        MemoryCase("small", "qlora", True, 1, 2, "float32"),
        MemoryCase("small", "qlora", False, 4, 1, "bfloat16"),
    ]
    return cases


def gpu_cases(llm: str) -> list[MemoryCase]:
    """The accelerator set: ``llm`` (e.g. llama-7b) projector-only, LoRA and QLoRA, micro-batch 1 and 4, with and
    without checkpointing, bf16, stage 2; plus the CPU set."""
    big = [
        MemoryCase(llm, method, ckpt, mb, 2, "bfloat16")
        for method in ("projector", "lora", "qlora")
        for ckpt in (False, True)
        for mb in (1, 4)
    ]
    return big + cpu_cases()


def case_job(case: MemoryCase, vision: str, accelerator: bool) -> Any:
    """The planner's :class:`~minigpt.train.memory.planner.Job` for ``case``."""
    from ...model.config import DEFAULT_FREEZE
    from ...train.memory.planner import Job
    from ...train.memory.trace import Shape

    vcfg = vision_shape(vision)
    prompt, answers = STAGES[case.stage]
    shape = Shape(case.micro_batch, 1 + vcfg.num_tokens + prompt + answers, answers, 1, case.stage == 1)
    job = Job(
        llm=llm_shape(case.llm),
        vision=vcfg,
        llm_dtype=case.dtype,
        freeze=dict(DEFAULT_FREEZE),
        amp="bf16" if case.dtype == "bfloat16" else "no",
        shape=shape,
        checkpointing=case.checkpointing,
        accelerator=accelerator,
    )
    return job.with_method(case.method)


def build_case_model(job: Any, device: torch.device, seed: int) -> Any:
    """The bench model of ``job`` on ``device``: LLM unfrozen (full), LoRA, or LoRA over a 4-bit LLM."""
    from ...device import parse_dtype
    from ...model.llm import bnb_quantization, keep_4bit_layout, load_llm
    from ...train.loop import apply_lora

    model = build_bench_model(job.llm, job.vision, device, parse_dtype(job.llm_dtype), "sdpa", seed)
    if job.quantization:
        with tempfile.TemporaryDirectory() as tmp:
            model.llm.save_pretrained(tmp)
            quant = bnb_quantization(job.quantization, job.llm_dtype, double_quant=job.double_quant)
            model.llm = load_llm(tmp, job.llm_dtype, quantization_config=quant, device_map={"": str(device)})
        keep_4bit_layout(model.llm)
    model.apply_freeze(job.freeze)
    if job.lora is not None:
        apply_lora(model, job.lora)
    if job.checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model.llm.train()
    return model


def measure(job: Any, device: torch.device, steps: int, seed: int) -> int:
    """Peak bytes of ``steps`` optimizer steps of ``job``'s model (see the module doc)."""
    from ...device import empty_cache, is_accelerator, peak_memory_gib, reset_peak_memory
    from ...train.config import OptimizerSection
    from ...train.loop import build_optimizer, run_step
    from ...train.memory.counting import LiveBytes, module_tensors
    from ...train.memory.trace import synthetic_batch
    from ...train.strategy import Strategy

    model = build_case_model(job, device, seed)
    gc.collect()  # QLoRA: the full-precision LLM it was quantized from goes
    empty_cache(device)
    reset_peak_memory(device)  # the allocator's peak restarts from the weights now allocated
    strategy = Strategy(str(device), job.amp)
    params = [p for p in model.parameters() if p.requires_grad]
    counter = LiveBytes()
    with counter:
        counter.track(module_tensors(model))
        batch = synthetic_batch(job.vision, job.llm.vocab_size, job.shape)
        batch.batch = batch.batch.to(device)
        if batch.features is not None:
            batch.features = batch.features.to(device)
        optimizer = build_optimizer(model, OptimizerSection(lr=1e-5))
        for _ in range(steps):
            run_step(model, strategy, optimizer, params, [batch], batch.num_tokens, batch, None)
    if is_accelerator(device):
        return int((peak_memory_gib(device) or 0.0) * 2**30)
    return counter.peak


def bench_memory(args: argparse.Namespace) -> dict[str, Any]:
    from ...device import is_accelerator, resolve_device
    from ...train.memory.planner import plan_training

    device = resolve_device(args.device)
    accelerator = is_accelerator(device)
    cases = gpu_cases(args.gpu_llm) if accelerator else cpu_cases()
    if args.only:
        cases = [c for c in cases if args.only in c.name]
    records = []
    for case in cases:
        start = time.perf_counter()
        job = case_job(case, args.vision, accelerator)
        predicted = plan_training(job).allocated
        measured = measure(job, device, args.steps, args.seed)
        records.append(
            {
                "name": case.name,
                "llm": case.llm,
                "vision": args.vision,
                "method": case.method,
                "checkpointing": case.checkpointing,
                "micro_batch": case.micro_batch,
                "stage": case.stage,
                "dtype": case.dtype,
                "positions": job.shape.positions,
                "predicted_bytes": int(predicted),
                "measured_bytes": measured,
                "error": round(predicted / measured - 1, 4) if measured else None,
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        gc.collect()
    errors = [abs(r["error"]) for r in records if r["error"] is not None]
    return {
        "benchmark": "memory",
        "machine": machine_info(device),
        "measured": "allocator peak (max_memory_allocated)" if accelerator else "peak of live tensor bytes",
        "cases": records,
        "max_abs_error": max(errors) if errors else None,
    }


def add_memory_arguments(q: argparse.ArgumentParser) -> None:
    from ...device import add_device_argument

    q.add_argument("--vision", default="tiny", help="vision shape (default tiny)")
    q.add_argument("--gpu-llm", default="llama-7b", metavar="SHAPE", help="the large LLM of the GPU set")
    q.add_argument("--steps", type=int, default=2, metavar="N", help="optimizer steps per case (default 2)")
    q.add_argument("--only", metavar="TEXT", help="only the cases whose name contains TEXT")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", "-o", metavar="FILE", help="also write the JSON here")
    add_device_argument(q)


__all__ = [
    "MemoryCase",
    "add_memory_arguments",
    "bench_memory",
    "build_case_model",
    "case_job",
    "cpu_cases",
    "gpu_cases",
    "measure",
]
