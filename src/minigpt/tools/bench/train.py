"""``minigpt bench train``: the training step, ours and reference-style, side by side.

**Train cases.** ``ours`` is the step :class:`~minigpt.train.loop.Trainer` runs (its
:func:`~minigpt.train.loop.run_step`, reading back the loss and gradient norm): bf16 weights on accelerators (fp32
on CPU), SDPA, Q-Former outputs from the feature cache (the bench computes them once from the batch's pixels, stored
in float16 like ``cache-features``) projected by the trainable projector, LM head and loss on answer tokens only,
``use_cache=False``, the loss implementation of ``--loss-impl`` (:mod:`minigpt.model.loss`; the case's ``loss_impl``
says which ran); ``--vision-every-step`` runs ViT + Q-Former in the step instead, ``--compile`` compiles each
decoder layer, ``--grad-checkpointing`` checkpoints them. ``reference-style`` (``--reference-style``, measured in
the same run) is the step as the original MiniGPT-4 code takes it: fp16 LLM and ViT weights, AMP fp16 with a
GradScaler on accelerators (fp32 on CPU), eager attention, ViT + Q-Former every step, the LLM's own LM head and
cross-entropy over the whole sequence. Both train the projector only (the frozen LLM still runs its backward).

**Sequences.** Stage 1: ``[BOS][image][caption]`` (32 caption tokens); stage 2: ``[6 prompt][image][30 prompt]
[answer]`` (128 answer tokens). ``--lengths cc_sbu_align`` draws the supervised length per sample from a
cc_sbu_align-like distribution (normal, mean 115, sd 30, clipped to 40..160 tokens: a synthetic stand-in, the real
set is not read), and ``--batching`` compares ``pad`` (random batches padded to their longest), ``group``
(length-grouped order, :func:`~minigpt.data.packing.length_grouped_order`) and ``pack`` (each batch packed into rows of
``--pack-len`` positions) over the same samples.

**Figures.** Step time is the median of ``--steps`` timed steps after ``--warmup``; samples/s and tokens/s (non-pad
positions) are totals over the timed steps. MFU = useful FLOPs / peak: useful = LLM forward ``2 P T + 4 L d T^2`` per
sample (P: decoder matmul parameters, L layers, d attention width, T the sample's own length) plus the LM head on
answer tokens ``2 d V A``, doubled for the frozen LLM's input-gradient backward; the projector's forward and weight
gradient; the vision encoder's forward (counted with ``torch.utils.flop_counter``) only when it runs in the step.
The peak is ``--peak-tflops`` or a matmul ceiling measured here in the case's dtype (``--peak-tflops 0``: MFU null).
Peak memory is the accelerator's allocator peak per case (null on CPU, where ``process_peak_rss_gib`` is given).
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .common import (
    BOS,
    SLOT,
    FlopModel,
    build_bench_model,
    llm_shape,
    machine_info,
    matmul_ceiling_tflops,
    significant,
    to_reference_precision,
    vision_flops_per_image,
    vision_shape,
)

BATCHING = ("pad", "group", "pack")

# ---------------------------------------------------------------------------------------------- synthetic data


def supervised_lengths(kind: str, n: int, fixed: int, seed: int) -> list[int]:
    if kind == "fixed":
        return [fixed] * n
    if kind == "cc_sbu_align":
        rng = random.Random(seed)
        return [min(160, max(40, round(rng.gauss(115, 30)))) for _ in range(n)]
    raise ValueError(f"unknown length distribution {kind!r}; use fixed or cc_sbu_align")


def synthetic_encoded(stage: int, image_tokens: int, supervised: int, vocab: int, rng: random.Random) -> Any:
    from ...data.tokenize import Encoded

    def ids(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    enc = Encoded()
    if stage == 1:
        enc.extend([BOS], supervised=False)
        enc.extend([SLOT] * image_tokens, supervised=False, image=True)
    else:
        enc.extend(ids(6), supervised=False)
        enc.extend([SLOT] * image_tokens, supervised=False, image=True)
        enc.extend(ids(30), supervised=False)
    enc.extend(ids(supervised), supervised=True)
    return enc


@dataclass
class Workload:
    """Micro-batches (train.data.TrainBatch, on the device) and what they hold."""

    batches: list[Any]
    lengths: list[list[int]]  # per batch: the samples' lengths
    positions: int = 0  # computed positions (padding included), all batches
    tokens: int = 0  # non-pad positions, all batches
    answers: list[int] = field(default_factory=list)  # per batch: supervised tokens


@dataclass(frozen=True)
class WorkloadSpec:
    """The synthetic samples of a case: ``num_batches`` micro-batches of ``batch_size`` samples of ``stage``'s
    layout, whose supervised lengths follow ``lengths_kind`` (``fixed``: ``supervised`` tokens each), batched by
    ``batching`` (``pack``: rows of ``pack_len`` positions), drawn from ``seed``."""

    stage: int
    batch_size: int
    num_batches: int
    lengths_kind: str
    supervised: int
    batching: str
    pack_len: int
    seed: int


def make_workload(
    model: Any,
    spec: WorkloadSpec,
    device: torch.device,
    feature_dtype: torch.dtype,
    features: bool,
    pixels: bool,
) -> Workload:
    """Synthetic samples through the training collator (pad or pack), with pixels and/or cached features."""
    stage, batch_size, num_batches, seed = spec.stage, spec.batch_size, spec.num_batches, spec.seed
    from ...data.packing import length_grouped_order
    from ...train.data import Item, collate_items

    rng = random.Random(seed)
    n = batch_size * num_batches
    sup = supervised_lengths(spec.lengths_kind, n, spec.supervised, seed)
    vocab = model.llm.config.vocab_size
    encs = [synthetic_encoded(stage, model.image_tokens, s, vocab, rng) for s in sup]
    size = model.config.vision.image_size
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=gen)
    feats = None
    if features:  # what cache-features would store: the encoder's outputs, in the cache's dtype
        with torch.no_grad():
            feats = torch.cat(
                [model.vision(images[i : i + 16].to(device)).to(feature_dtype).cpu() for i in range(0, n, 16)]
            )
    order = list(range(n))
    if spec.batching == "group":
        order = length_grouped_order([len(e) for e in encs], batch_size, num_batches, seed)
    work = Workload([], [])
    for b in range(num_batches):
        idx = order[b * batch_size : (b + 1) * batch_size]
        items = [
            Item(encs[i], [images[i]] if pixels else [], f"synthetic {i}", [feats[i]] if feats is not None else None)
            for i in idx
        ]
        tb = collate_items(items, SLOT, spec.pack_len if spec.batching == "pack" else None)
        tb.batch = tb.batch.to(device)
        if tb.features is not None:
            tb.features = tb.features.to(device)
        work.batches.append(tb)
        work.lengths.append([len(encs[i]) for i in idx])
        work.answers.append(tb.num_tokens)
        work.positions += tb.batch.text.input_ids.numel()
        work.tokens += tb.num_input_tokens
    return work


# ---------------------------------------------------------------------------------------------- steps


def careful_step(
    model: Any, optimizer: torch.optim.Optimizer, device: torch.device, amp: torch.dtype | None
) -> Callable[[Any], float]:
    """The Trainer's step on one device (:func:`~minigpt.train.loop.run_step`, one micro-batch): cached features (or
    pixels) -> projector -> LLM body -> answer-token loss, backward, optimizer step, the loss read back."""
    from ...device import dtype_name
    from ...train.loop import run_step
    from ...train.strategy import Strategy

    strategy = Strategy(str(device), dtype_name(amp) if amp is not None else "no")
    params = [p for p in model.parameters() if p.requires_grad]

    def step(tb: Any) -> float:
        loss_sum, _ = run_step(model, strategy, optimizer, params, [tb], tb.num_tokens, tb, None)
        return loss_sum / tb.num_tokens

    return step


def reference_step(
    model: Any, optimizer: torch.optim.Optimizer, device: torch.device, amp: torch.dtype | None, scaler: Any
) -> Callable[[Any], torch.Tensor]:
    """The original code's step: vision + Q-Former + projector, the LLM's full LM head and loss, GradScaler."""
    from ...device import autocast

    def step(tb: Any) -> torch.Tensor:
        text = tb.batch.text
        with autocast(device, amp):
            embeds = model.embed(tb.batch)
            out = model.llm(inputs_embeds=embeds, attention_mask=text.attention_mask, labels=text.labels)
        if scaler is not None:
            scaler.scale(out.loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            out.loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.detach()

    return step


def _time_interleaved(
    steps: list[Callable[[Any], torch.Tensor | float]], works: list[Workload], warmup: int, device: torch.device
) -> list[dict[str, Any]]:
    """Warm each case up, then time step ``i`` of every case in turn (round-robin), so that whatever else runs on
    the machine slows all cases alike. Per case: step times, the first loss, the allocator peak of its steps."""
    from ...device import peak_memory_gib, reset_peak_memory, synchronize

    out: list[dict[str, Any]] = [{"times": [], "first_loss": None, "peak_mem_gib": 0.0} for _ in steps]
    for step, work, rec in zip(steps, works, out):
        for i in range(warmup):
            loss = step(work.batches[i % len(work.batches)])
            if rec["first_loss"] is None:
                rec["first_loss"] = float(loss)
    synchronize(device)
    for i in range(max(len(w.batches) for w in works)):
        for step, work, rec in zip(steps, works, out):
            if i >= len(work.batches):
                continue
            reset_peak_memory(device)
            t0 = time.perf_counter()
            loss = step(work.batches[i])
            synchronize(device)
            rec["times"].append(time.perf_counter() - t0)
            rec["peak_mem_gib"] = max(rec["peak_mem_gib"], peak_memory_gib(device) or 0.0)
            if rec["first_loss"] is None:
                rec["first_loss"] = float(loss)
    return out


@dataclass
class TrainCase:
    name: str
    reference: bool = False
    batching: str = "pad"
    vision_every_step: bool = False


def run_train_cases(
    cases: list[TrainCase], args: argparse.Namespace, device: torch.device, ceilings: dict[torch.dtype, float]
) -> list[dict[str, Any]]:
    """Cases that share one model (the same step, other batchings): built once, timed interleaved."""
    from ...device import amp_dtype, empty_cache, parse_dtype
    from ...model.llm import compile_decoder_layers

    accel = device.type != "cpu"
    reference, vision_every_step = cases[0].reference, cases[0].vision_every_step
    if reference:
        llm_dtype, amp, attn = (torch.float16, torch.float16, "eager") if accel else (torch.float32, None, "eager")
    else:
        amp = amp_dtype(device, args.dtype)  # auto: bf16 on accelerators, none (fp32) on CPU
        llm_dtype, attn = amp or torch.float32, args.attn
    model = build_bench_model(llm_shape(args.llm), vision_shape(args.vision), device, llm_dtype, attn, args.seed)
    if reference and accel:
        to_reference_precision(model)
    model.train()
    if args.grad_checkpointing and not reference:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.llm.train()
    if args.compile and not reference:
        compile_decoder_layers(model.llm)
    model.loss_impl = args.loss_impl
    flops = FlopModel.of(model)
    uses_vision = reference or vision_every_step
    if uses_vision:
        flops.vision_per_image = vision_flops_per_image(model, device, amp)
    supervised = args.text_tokens or (32 if args.stage == 1 else 128)
    specs = [
        WorkloadSpec(
            args.stage, args.batch_size, args.steps, args.lengths, supervised, case.batching, args.pack_len, args.seed
        )
        for case in cases
    ]
    feature_dtype = parse_dtype(args.feature_dtype)
    works = [
        make_workload(model, spec, device, feature_dtype, features=not uses_vision, pixels=uses_vision)
        for spec in specs
    ]
    params = [p for p in model.parameters() if p.requires_grad]
    try:  # lr 0: the same work as training, but the weights (and so the reported losses) stay put
        optimizer = torch.optim.AdamW(params, lr=0.0, fused=True)
    except RuntimeError:
        optimizer = torch.optim.AdamW(params, lr=0.0)
    scaler = torch.amp.GradScaler(device.type) if reference and amp == torch.float16 else None
    step = (
        reference_step(model, optimizer, device, amp, scaler)
        if reference
        else careful_step(model, optimizer, device, amp)
    )
    timings = _time_interleaved([step] * len(cases), works, args.warmup, device)
    if args.peak_tflops is None:
        if llm_dtype not in ceilings:
            ceilings[llm_dtype] = matmul_ceiling_tflops(device, llm_dtype)
        peak: float | None = ceilings[llm_dtype]
    else:
        peak = args.peak_tflops or None
    results = []
    for case, work, timing in zip(cases, works, timings):
        times = timing["times"]
        total = sum(times)
        samples = args.batch_size * len(times)
        useful = sum(flops.step(lens, ans, len(lens), uses_vision) for lens, ans in zip(work.lengths, work.answers))
        achieved = useful / total / 1e12
        results.append(
            {
                "name": case.name,
                "step": "reference-style" if reference else "ours",
                "batching": case.batching,
                "vision_in_step": uses_vision,
                "precision": _precision(case, llm_dtype, amp),
                "loss_impl": "full-sequence"
                if reference
                else ",".join(sorted({model.resolved_loss_impl(n) for n in work.answers})),
                "attention": attn,
                "compile": bool(args.compile and not reference),
                "grad_checkpointing": bool(args.grad_checkpointing and not reference),
                "step_time_s": round(statistics.median(times), 5),
                "samples_per_s": round(samples / total, 3),
                "tokens_per_s": round(work.tokens / total, 1),
                "pad_fraction": round(1 - work.tokens / work.positions, 4),
                "useful_tflop_per_sample": significant(useful / samples / 1e12),
                "achieved_tflops": significant(achieved),
                "peak_tflops": significant(peak) if peak else None,
                "mfu": significant(achieved / peak) if peak else None,
                "peak_mem_gib": None if device.type == "cpu" else round(timing["peak_mem_gib"], 3),
                "loss": round(timing["first_loss"], 6),
            }
        )
    del model, optimizer, works, step
    gc.collect()
    empty_cache(device)
    return results


def _precision(case: TrainCase, llm_dtype: torch.dtype, amp: torch.dtype | None) -> str:
    from ...device import dtype_name

    if case.reference and amp is not None:
        return "fp16 weights + AMP fp16 + GradScaler"
    return f"{dtype_name(llm_dtype)} weights" + (f" + AMP {dtype_name(amp)}" if amp is not None else "")


def bench_train(args: argparse.Namespace) -> dict[str, Any]:
    from ...device import peak_memory_gib, resolve_device

    device = resolve_device(args.device)
    batching = [b.strip() for b in args.batching.split(",") if b.strip()]
    unknown = [b for b in batching if b not in BATCHING]
    if unknown or not batching:
        raise ValueError(f"--batching: use a comma list of {', '.join(BATCHING)}")
    if args.stage not in (1, 2):
        raise ValueError("--stage is 1 or 2")
    if min(args.batch_size, args.steps) < 1 or args.warmup < 0:
        raise ValueError("--batch-size and --steps must be positive, --warmup not negative")
    suffix = " (vision every step)" if args.vision_every_step else ""
    cases = [
        TrainCase(
            f"ours{'' if len(batching) == 1 else '-' + b}{suffix}", batching=b, vision_every_step=args.vision_every_step
        )
        for b in batching
    ]
    if args.reference_style:
        cases.append(TrainCase("reference-style", reference=True))
    ceilings: dict[torch.dtype, float] = {}
    results = run_train_cases(cases[: len(batching)], args, device, ceilings)  # ours: one model, interleaved
    if args.reference_style:
        results += run_train_cases(cases[len(batching) :], args, device, ceilings)
    report = {
        "benchmark": "train",
        "machine": machine_info(device),
        "config": {
            "llm": args.llm,
            "vision": args.vision,
            "stage": args.stage,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "lengths": args.lengths,
            "pack_len": args.pack_len,
            "seed": args.seed,
            "feature_dtype": args.feature_dtype,
        },
        "cases": results,
        "process_peak_rss_gib": round(peak_memory_gib(device, cpu_rss=True) or 0.0, 3)
        if device.type == "cpu"
        else None,
    }
    ref = next((r for r in results if r["step"] == "reference-style"), None)
    if ref is not None:
        report["speedup_vs_reference"] = {
            r["name"]: round(r["samples_per_s"] / ref["samples_per_s"], 3) for r in results if r is not ref
        }
    return report
