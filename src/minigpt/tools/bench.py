"""``minigpt bench train|generate``: speed of the training step and of generation, as JSON.

A MiniGPT of real shapes with random weights (EVA ViT-g + Q-Former + a LLaMA/Qwen-shaped LLM, or tiny/small shapes
for the CPU, or any transformers config) on synthetic batches: no data loading, no downloads. ::

    minigpt bench train --llm llama-7b --vision eva_vit_g --stage 1 --batch-size 64 --reference-style
    minigpt bench train --llm small --vision small --stage 2 --batch-size 12 --lengths cc_sbu_align \\
        --batching pad,group,pack
    minigpt bench generate --llm llama-7b --vision eva_vit_g --new-tokens 128 --reference-style

**Train cases.** ``ours`` is the step :class:`~minigpt.train.loop.Trainer` runs: bf16 weights on accelerators (fp32
on CPU), SDPA, Q-Former outputs from the feature cache (the bench computes them once from the batch's pixels, stored
in float16 like ``cache-features``) projected by the trainable projector, LM head and loss on answer tokens only,
``use_cache=False``; ``--vision-every-step`` runs ViT + Q-Former in the step instead, ``--compile`` compiles each
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

**Generate.** Time to first token (pixels -> vision -> prefill -> first token, median of ``--repeats``) and decode
tokens/s (``(new_tokens - 1) * batch / (t_all - t_first)``) with transformers' ``generate`` from image embeddings;
``ours`` is bf16 (fp32 on CPU) + SDPA (``--cache static`` for a static KV cache), ``reference-style`` fp16 + eager.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

LLM_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1024),
    "small": dict(model_type="llama", hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=8, vocab_size=32000),
    "llama-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "llama-13b": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                      num_attention_heads=40, num_key_value_heads=40, vocab_size=32000),
    "qwen-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                    num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
    "qwen-14b": dict(model_type="qwen2", hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                     num_attention_heads=40, num_key_value_heads=8, vocab_size=152064),
}
VISION_SHAPES = ("tiny", "small", "eva_vit_g")
BATCHING = ("pad", "group", "pack")
BOS, SLOT = 1, 0


# ---------------------------------------------------------------------------------------------- shapes


def vision_config(name: str) -> Any:
    from ..model.vision import VisionConfig

    if name == "tiny":
        return VisionConfig.tiny()
    if name == "small":
        return VisionConfig(image_size=112, width=256, depth=4, heads=4, mlp_dim=1024, qformer_width=256,
                            qformer_depth=2, qformer_heads=4, qformer_mlp_dim=1024)
    if name == "eva_vit_g":
        return VisionConfig()
    raise ValueError(f"unknown vision shape {name!r}; use one of {', '.join(VISION_SHAPES)}")


def llm_config(name: str) -> Any:
    """A transformers config: a preset name, a folder holding config.json, or a config.json file."""
    from transformers import AutoConfig

    if name in LLM_SHAPES:
        fields = dict(LLM_SHAPES[name])
        kind = fields.pop("model_type")
        return AutoConfig.for_model(kind, max_position_embeddings=4096, bos_token_id=BOS, eos_token_id=2,
                                    pad_token_id=SLOT, **fields)
    path = Path(name)
    if path.is_file():
        return AutoConfig.from_pretrained(str(path.parent))
    if path.is_dir():
        return AutoConfig.from_pretrained(str(path))
    raise ValueError(f"unknown LLM shape {name!r}; use one of {', '.join(LLM_SHAPES)} or a config folder/file")


def build_bench_model(
    llm_cfg: Any, vision_cfg: Any, device: torch.device, llm_dtype: torch.dtype, attn: str, seed: int = 0
) -> Any:
    """A MiniGPT with random weights, built on ``device`` (projector float32, vision float32, LLM ``llm_dtype``)."""
    from transformers import AutoModelForCausalLM

    from ..model.minigpt import MiniGPT, MiniGPTConfig
    from ..model.projector import build_projector
    from ..model.vision import Blip2VisionEncoder

    torch.manual_seed(seed)
    with torch.device(device):
        vision = Blip2VisionEncoder(vision_cfg)
        llm = AutoModelForCausalLM.from_config(llm_cfg, dtype=llm_dtype, attn_implementation=attn)
        projector = build_projector("linear", vision.out_dim, llm_cfg.hidden_size)
    config = MiniGPTConfig(llm="bench", vision=vision_cfg, template="caption")
    return MiniGPT(config, vision, projector, llm, tokenizer=None)


def decoder_matmul_params(llm: nn.Module) -> int:
    body = llm.get_decoder()
    return sum(m.weight.numel() for m in body.layers.modules() if isinstance(m, nn.Linear))


@dataclass
class FlopModel:
    """Useful FLOPs of a step (see the module doc)."""

    params: int  # decoder matmul parameters
    layers: int
    attn_width: int
    hidden: int
    vocab: int
    projector_params: int
    image_tokens: int
    vision_per_image: float = 0.0

    @classmethod
    def of(cls, model: Any) -> "FlopModel":
        cfg = model.llm.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        proj = sum(p.numel() for p in model.projector.parameters() if p.ndim >= 2)
        return cls(decoder_matmul_params(model.llm), cfg.num_hidden_layers, cfg.num_attention_heads * head_dim,
                   cfg.hidden_size, cfg.vocab_size, proj, model.image_tokens)

    def step(self, lengths: list[int], answers: int, images: int, vision: bool) -> float:
        llm = sum(2 * self.params * t + 4 * self.layers * self.attn_width * t * t for t in lengths)
        head = 2 * self.hidden * self.vocab * answers
        projector = 2 * self.projector_params * self.image_tokens * images * 2  # forward + weight gradient
        return 2 * (llm + head) + projector + (self.vision_per_image * images if vision else 0.0)


def vision_flops_per_image(model: Any, device: torch.device, amp: torch.dtype | None) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from ..device import autocast

    size = model.config.vision.image_size
    with torch.no_grad(), autocast(device, amp), FlopCounterMode(display=False) as counter:
        model.vision(torch.randn(1, 3, size, size, device=device))
    return float(counter.get_total_flops())


def matmul_ceiling_tflops(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """The best matmul rate seen in ``seconds`` (n = 1024 on CPU, 8192 on accelerators), TFLOP/s."""
    from ..device import synchronize

    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        synchronize(device)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best / 1e12


def machine_info(device: torch.device) -> dict[str, Any]:
    import transformers

    from ..device import describe_device

    return {
        "device": describe_device(device), "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__,
    }


# ---------------------------------------------------------------------------------------------- synthetic data


def supervised_lengths(kind: str, n: int, fixed: int, seed: int) -> list[int]:
    if kind == "fixed":
        return [fixed] * n
    if kind == "cc_sbu_align":
        rng = random.Random(seed)
        return [min(160, max(40, round(rng.gauss(115, 30)))) for _ in range(n)]
    raise ValueError(f"unknown length distribution {kind!r}; use fixed or cc_sbu_align")


def synthetic_encoded(stage: int, image_tokens: int, supervised: int, vocab: int, rng: random.Random) -> Any:
    from ..data.tokenize import Encoded

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


def prompt_encoded(image_tokens: int, prompt_tokens: int, vocab: int, rng: random.Random) -> Any:
    """A one-image generation prompt: ``[6 text][image][prompt_tokens - 6 text]``."""
    from ..data.tokenize import Encoded

    before = min(6, prompt_tokens)
    enc = Encoded()
    enc.extend([rng.randrange(3, vocab) for _ in range(before)], supervised=False)
    enc.extend([SLOT] * image_tokens, supervised=False, image=True)
    enc.extend([rng.randrange(3, vocab) for _ in range(prompt_tokens - before)], supervised=False)
    return enc


@dataclass
class Workload:
    """Micro-batches (train.data.TrainBatch, on the device) and what they hold."""

    batches: list[Any]
    lengths: list[list[int]]  # per batch: the samples' lengths
    positions: int = 0  # computed positions (padding included), all batches
    tokens: int = 0  # non-pad positions, all batches
    answers: list[int] = field(default_factory=list)  # per batch: supervised tokens


def make_workload(
    model: Any, stage: int, batch_size: int, num_batches: int, lengths_kind: str, supervised: int,
    batching: str, pack_len: int, seed: int, device: torch.device, feature_dtype: torch.dtype, features: bool,
    pixels: bool,
) -> Workload:
    """Synthetic samples through the training collator (pad or pack), with pixels and/or cached features."""
    from ..data.packing import length_grouped_order
    from ..train.data import Item, collate

    rng = random.Random(seed)
    n = batch_size * num_batches
    sup = supervised_lengths(lengths_kind, n, supervised, seed)
    vocab = model.llm.config.vocab_size
    encs = [synthetic_encoded(stage, model.image_tokens, s, vocab, rng) for s in sup]
    size = model.config.vision.image_size
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=gen)
    feats = None
    if features:  # what cache-features would store: the encoder's outputs, in the cache's dtype
        with torch.no_grad():
            feats = torch.cat([model.vision(images[i : i + 16].to(device)).to(feature_dtype).cpu()
                               for i in range(0, n, 16)])
    order = list(range(n))
    if batching == "group":
        order = length_grouped_order([len(e) for e in encs], batch_size, num_batches, seed)
    work = Workload([], [])
    for b in range(num_batches):
        idx = order[b * batch_size : (b + 1) * batch_size]
        items = [Item(encs[i], [images[i]] if pixels else [], f"synthetic {i}",
                      [feats[i]] if feats is not None else None) for i in idx]
        tb = collate(items, SLOT, pack_len if batching == "pack" else None)
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


def careful_step(model: Any, optimizer: torch.optim.Optimizer, device: torch.device, amp: torch.dtype | None,
                 use_features: bool) -> Callable[[Any], torch.Tensor]:
    """The Trainer's step (single device): cached features -> projector -> LLM body -> lean loss."""
    from ..data.features import project_features
    from ..device import autocast

    def step(tb: Any) -> torch.Tensor:
        with autocast(device, amp):
            embeds = project_features(model, tb.features) if use_features else None
            out = model(batch=tb.batch, image_embeds=embeds)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.detach()

    return step


def reference_step(model: Any, optimizer: torch.optim.Optimizer, device: torch.device, amp: torch.dtype | None,
                   scaler: Any) -> Callable[[Any], torch.Tensor]:
    """The original code's step: vision + Q-Former + projector, the LLM's full LM head and loss, GradScaler."""
    from ..device import autocast

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


def _to_reference_precision(model: Any) -> None:
    """fp16 ViT matmul weights (the original's vit_precision fp16); Q-Former, norms and projector stay float32."""
    for module in model.vision.vision_model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.half()


def _time_interleaved(
    steps: list[Callable[[Any], torch.Tensor]], works: list[Workload], warmup: int, device: torch.device
) -> list[dict[str, Any]]:
    """Warm each case up, then time step ``i`` of every case in turn (round-robin), so that whatever else runs on
    the machine slows all cases alike. Per case: step times, the first loss, the allocator peak of its steps."""
    from ..device import peak_memory_gib, reset_peak_memory, synchronize

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
    from ..device import amp_dtype, empty_cache, parse_dtype
    from ..train.loop import compile_decoder_layers

    accel = device.type != "cpu"
    reference, vision_every_step = cases[0].reference, cases[0].vision_every_step
    if reference:
        llm_dtype, amp, attn = (torch.float16, torch.float16, "eager") if accel else (torch.float32, None, "eager")
    else:
        amp = amp_dtype(device, args.dtype)  # auto: bf16 on accelerators, none (fp32) on CPU
        llm_dtype, attn = amp or torch.float32, args.attn
    model = build_bench_model(llm_config(args.llm), vision_config(args.vision), device, llm_dtype, attn, args.seed)
    if reference and accel:
        _to_reference_precision(model)
    model.train()
    if args.grad_checkpointing and not reference:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.llm.train()
    if args.compile and not reference:
        compile_decoder_layers(model.llm)
    flops = FlopModel.of(model)
    uses_vision = reference or vision_every_step
    if uses_vision:
        flops.vision_per_image = vision_flops_per_image(model, device, amp)
    supervised = args.text_tokens or (32 if args.stage == 1 else 128)
    works = [make_workload(model, args.stage, args.batch_size, args.steps, args.lengths, supervised, case.batching,
                           args.pack_len, args.seed, device, parse_dtype(args.feature_dtype), features=not uses_vision,
                           pixels=uses_vision) for case in cases]
    params = [p for p in model.parameters() if p.requires_grad]
    try:  # lr 0: the same work as training, but the weights (and so the reported losses) stay put
        optimizer = torch.optim.AdamW(params, lr=0.0, fused=True)
    except RuntimeError:
        optimizer = torch.optim.AdamW(params, lr=0.0)
    scaler = torch.amp.GradScaler(device.type) if reference and amp == torch.float16 else None
    step = (reference_step(model, optimizer, device, amp, scaler) if reference
            else careful_step(model, optimizer, device, amp, use_features=not uses_vision))
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
        results.append({
            "name": case.name,
            "step": "reference-style" if reference else "ours",
            "batching": case.batching,
            "vision_in_step": uses_vision,
            "precision": _precision(case, llm_dtype, amp),
            "attention": attn,
            "compile": bool(args.compile and not reference),
            "grad_checkpointing": bool(args.grad_checkpointing and not reference),
            "step_time_s": round(statistics.median(times), 5),
            "samples_per_s": round(samples / total, 3),
            "tokens_per_s": round(work.tokens / total, 1),
            "pad_fraction": round(1 - work.tokens / work.positions, 4),
            "useful_tflop_per_sample": _sig(useful / samples / 1e12),
            "achieved_tflops": _sig(achieved),
            "peak_tflops": _sig(peak) if peak else None,
            "mfu": _sig(achieved / peak) if peak else None,
            "peak_mem_gib": None if device.type == "cpu" else round(timing["peak_mem_gib"], 3),
            "loss": round(timing["first_loss"], 6),
        })
    del model, optimizer, works, step
    gc.collect()
    empty_cache(device)
    return results


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def _precision(case: TrainCase, llm_dtype: torch.dtype, amp: torch.dtype | None) -> str:
    from ..device import dtype_name

    if case.reference and amp is not None:
        return "fp16 weights + AMP fp16 + GradScaler"
    return f"{dtype_name(llm_dtype)} weights" + (f" + AMP {dtype_name(amp)}" if amp is not None else "")


def bench_train(args: argparse.Namespace) -> dict[str, Any]:
    from ..device import peak_memory_gib, resolve_device

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
    cases = [TrainCase(f"ours{'' if len(batching) == 1 else '-' + b}{suffix}", batching=b,
                       vision_every_step=args.vision_every_step) for b in batching]
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
            "llm": args.llm, "vision": args.vision, "stage": args.stage, "batch_size": args.batch_size,
            "steps": args.steps, "warmup": args.warmup, "lengths": args.lengths, "pack_len": args.pack_len,
            "seed": args.seed, "feature_dtype": args.feature_dtype,
        },
        "cases": results,
        "process_peak_rss_gib": round(peak_memory_gib(device, cpu_rss=True) or 0.0, 3) if device.type == "cpu" else None,
    }
    ref = next((r for r in results if r["step"] == "reference-style"), None)
    if ref is not None:
        report["speedup_vs_reference"] = {r["name"]: round(r["samples_per_s"] / ref["samples_per_s"], 3)
                                          for r in results if r is not ref}
    return report


# ---------------------------------------------------------------------------------------------- generate


def bench_generate(args: argparse.Namespace) -> dict[str, Any]:
    from ..data.tokenize import collate as collate_text
    from ..device import (
        amp_dtype, dtype_name, empty_cache, parse_dtype, peak_memory_gib, reset_peak_memory, resolve_device, synchronize,
    )
    from ..model.minigpt import ModelBatch

    device = resolve_device(args.device)
    accel = device.type != "cpu"
    if args.new_tokens < 2 or args.batch_size < 1 or args.repeats < 1:
        raise ValueError("--new-tokens must be at least 2, --batch-size and --repeats at least 1")
    cases = [("ours", False)] + ([("reference-style", True)] if args.reference_style else [])
    results = []
    for name, reference in cases:
        if reference:
            dtype, attn = (torch.float16 if accel else torch.float32), "eager"
        else:
            dtype = (amp_dtype(device) or torch.float32) if args.dtype == "auto" else parse_dtype(args.dtype)
            attn = args.attn
        model = build_bench_model(llm_config(args.llm), vision_config(args.vision), device, dtype, attn, args.seed)
        if reference and accel:
            _to_reference_precision(model)
        model.eval()
        if args.compile and not reference:
            from ..train.loop import compile_decoder_layers

            compile_decoder_layers(model.llm)
        rng = random.Random(args.seed)
        encs = [prompt_encoded(model.image_tokens, args.prompt_tokens, model.llm.config.vocab_size, rng)
                for _ in range(args.batch_size)]
        size = model.config.vision.image_size
        batch = ModelBatch(collate_text(encs, SLOT, side="left"), torch.randn(args.batch_size, 3, size, size)).to(device)
        options = dict(do_sample=False, pad_token_id=SLOT, eos_token_id=2)
        if args.cache == "static" and not reference:
            options["cache_implementation"] = "static"

        @torch.inference_mode()
        def run(new_tokens: int) -> float:
            synchronize(device)
            t0 = time.perf_counter()
            embeds = model.embed(batch)
            model.llm.generate(inputs_embeds=embeds, attention_mask=batch.text.attention_mask,
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens, **options)
            synchronize(device)
            return time.perf_counter() - t0

        reset_peak_memory(device)
        run(2)  # warm-up
        firsts = [run(1) for _ in range(args.repeats)]
        fulls = [run(args.new_tokens) for _ in range(args.repeats)]
        ttft, full = statistics.median(firsts), statistics.median(fulls)
        results.append({
            "name": name,
            "precision": f"{dtype_name(dtype)} weights",
            "attention": attn,
            "cache": "static" if "cache_implementation" in options else "dynamic",
            "time_to_first_token_ms": round(ttft * 1000, 2),
            "decode_tokens_per_s": round(args.batch_size * (args.new_tokens - 1) / max(full - ttft, 1e-9), 2),
            "total_tokens_per_s": round(args.batch_size * args.new_tokens / full, 2),
            "peak_mem_gib": None if device.type == "cpu" else round(peak_memory_gib(device) or 0.0, 3),
        })
        del model, batch
        gc.collect()
        empty_cache(device)
    return {
        "benchmark": "generate",
        "machine": machine_info(device),
        "config": {"llm": args.llm, "vision": args.vision, "batch_size": args.batch_size,
                   "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
                   "seed": args.seed},
        "cases": results,
        "process_peak_rss_gib": round(peak_memory_gib(device, cpu_rss=True) or 0.0, 3) if device.type == "cpu" else None,
    }


# ---------------------------------------------------------------------------------------------- command line


def register(subparsers: Any) -> None:
    from ..device import add_device_argument

    p = subparsers.add_parser(
        "bench", help="benchmark the training step and generation (JSON: samples/s, MFU, memory, TTFT)",
        description="Time a MiniGPT of real (or small) shapes with random weights on synthetic batches and print "
                    "the figures as JSON. Runs on CPU with small shapes and on a GPU with real ones.",
    )
    sub = p.add_subparsers(dest="bench_command", metavar="WHAT")
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--llm", default="tiny", metavar="SHAPE",
                       help=f"LLM shape: {', '.join(LLM_SHAPES)}, or a transformers config folder/file (default tiny)")
        q.add_argument("--vision", default="tiny", choices=VISION_SHAPES, help="vision shape (default tiny)")
        q.add_argument("--batch-size", type=int, default=4, metavar="N")
        q.add_argument("--dtype", default="auto", help="our LLM dtype: auto (bf16 on accelerators, fp32 on CPU), "
                       "float32, bfloat16, float16")
        q.add_argument("--attn", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"), help="our attention")
        q.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (ours)")
        q.add_argument("--reference-style", action="store_true",
                       help="also run the original code's way (fp16 + GradScaler, eager, full LM head), side by side")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--out", "-o", metavar="FILE", help="also write the JSON here")
        add_device_argument(q)

    q = sub.add_parser("train", help="training step: samples/s, tokens/s, MFU, peak memory",
                       description="Time the training step (projector trains, LLM and vision frozen).")
    common(q)
    q.add_argument("--stage", type=int, default=1, choices=(1, 2), help="1: [BOS][img][caption]; 2: prompt+answer")
    q.add_argument("--text-tokens", type=int, metavar="N", help="supervised tokens per sample (default 32 / 128)")
    q.add_argument("--lengths", default="fixed", choices=("fixed", "cc_sbu_align"),
                   help="supervised lengths: fixed, or drawn from a cc_sbu_align-like distribution")
    q.add_argument("--batching", default="pad", help="comma list of pad, group, pack (each a case)")
    q.add_argument("--pack-len", type=int, default=512, metavar="N", help="positions per packed row (default 512)")
    q.add_argument("--steps", type=int, default=8, metavar="N", help="timed steps (default 8)")
    q.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed steps first (default 3)")
    q.add_argument("--vision-every-step", action="store_true", help="ours runs ViT + Q-Former in the step (no cache)")
    q.add_argument("--grad-checkpointing", action="store_true", help="checkpoint the LLM's layers (ours)")
    q.add_argument("--feature-dtype", default="float16", help="dtype of the cached features (default float16)")
    q.add_argument("--peak-tflops", type=float, metavar="X",
                   help="peak TFLOP/s for MFU (default: measure a matmul ceiling here; 0: report MFU as null)")
    q.set_defaults(func=_run, bench=bench_train)

    q = sub.add_parser("generate", help="time to first token and decode tokens/s",
                       description="Time generation from a one-image prompt (image tokens + --prompt-tokens).")
    common(q)
    q.set_defaults(batch_size=1)
    q.add_argument("--prompt-tokens", type=int, default=36, metavar="N", help="text tokens around the image (default 36)")
    q.add_argument("--new-tokens", type=int, default=32, metavar="N", help="tokens generated (default 32)")
    q.add_argument("--repeats", type=int, default=3, metavar="N", help="runs per figure, median (default 3)")
    q.add_argument("--cache", default="dynamic", choices=("dynamic", "static"), help="our KV cache")
    q.set_defaults(func=_run, bench=bench_generate)


def _run(args: argparse.Namespace) -> int:
    report = args.bench(args)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


__all__ = ["bench_train", "bench_generate", "build_bench_model", "FlopModel", "LLM_SHAPES", "register"]
