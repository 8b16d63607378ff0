"""``minigpt bench generate``: time to first token and decode speed.

**Generate.** Time to first token (pixels -> vision -> prefill -> first token, median of ``--repeats``) and decode
tokens/s (``(new_tokens - 1) * batch / (t_all - t_first)``) with transformers' ``generate`` from image embeddings;
``ours`` is bf16 (fp32 on CPU) + SDPA (``--cache static`` for a static KV cache), ``reference-style`` fp16 + eager.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from typing import Any

import torch

from .common import (
    SLOT, build_bench_model, llm_config, machine_info, prompt_encoded, to_reference_precision, vision_config,
)

# ---------------------------------------------------------------------------------------------- generate


def bench_generate(args: argparse.Namespace) -> dict[str, Any]:
    from ...data.tokenize import collate as collate_text
    from ...device import (
        amp_dtype, dtype_name, empty_cache, parse_dtype, peak_memory_gib, reset_peak_memory, resolve_device, synchronize,
    )
    from ...model.minigpt import ModelBatch

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
            to_reference_precision(model)
        model.eval()
        if args.compile and not reference:
            from ...train.loop import compile_decoder_layers

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


