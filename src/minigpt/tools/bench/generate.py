"""``minigpt bench generate``: time to first token and decode speed, one request and many at once.

Prompt: ``[6 text][image][--prompt-tokens - 6 text]`` with a random picture; every case generates exactly
``--new-tokens`` tokens (end tokens held back), greedy.

- ``ours-static``: the slot decoder :mod:`minigpt.infer.slots` (what chat, web, server and eval run on a GPU):
  preallocated KV cache, the decode step recorded as one CUDA graph (``--no-cuda-graphs``: eager), ``--compile``:
  decoder layers compiled inside it. One request per prompt, through :class:`~minigpt.infer.batching.SlotScheduler`.
- ``ours-plain``: transformers' ``generate`` (dynamic cache) with our weights and attention (bf16 + SDPA on
  accelerators, fp32 on CPU).
- ``reference-style`` (``--reference-style``): transformers' ``generate`` with fp16 weights and eager attention, as
  the original demos run.
- ``ours-static-concurrent`` (``--concurrent N``): N requests submitted at once to the scheduler with N slots (what
  ``minigpt serve --batch-slots N`` does): their tokens over the wall time, and the mean time to first token.

Figures (medians of ``--repeats``): time to first token = pixels -> vision -> prefill -> first token (a one-token
run); decode tokens/s = ``batch * (new_tokens - 1) / (t_all - t_first)``; total tokens/s = ``batch * new_tokens /
t_all``. With both engines, ``greedy_tokens_equal_to_plain`` says how many leading greedy tokens of the static engine
equal transformers' (``k/new_tokens``; both models are built from the same seed): a correctness check on the device
itself (in bf16, rounding may legitimately part them after a while).
"""

from __future__ import annotations

import argparse
import functools
import gc
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from .common import (
    SLOT,
    build_bench_model,
    llm_shape,
    machine_info,
    prompt_encoded,
    to_reference_precision,
    vision_shape,
)

ENGINES = ("static", "plain")
EOS = 2


def _plain_runner(model: Any, batch: Any) -> Callable[[int], list[int]]:
    """transformers' ``generate`` on the padded batch; the first row's new ids."""
    options = dict(do_sample=False, pad_token_id=SLOT, eos_token_id=EOS)

    def run(new_tokens: int) -> list[int]:
        embeds = model.embed(batch)
        out = model.llm.generate(
            inputs_embeds=embeds,
            attention_mask=batch.text.attention_mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            **options,
        )
        return out[0, -new_tokens:].tolist()

    return run


def _decode_copies(
    scheduler: Any,
    prompt: Any,
    new_tokens: int,
    count: int,
    on_token: Callable[[int], Callable[[int], None]] | None = None,
) -> list[Any]:
    """``count`` copies of the one-prompt ``prompt`` batch decoded together on ``scheduler``, exactly ``new_tokens``
    each (``on_token(i)``: request i's per-token callback); the finished requests."""
    from ...infer.batching import DecodeRequest
    from ...infer.generate import GenerationOptions

    options = GenerationOptions(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    reqs = [
        scheduler.submit(DecodeRequest(prompt, options, on_token=on_token(i) if on_token else None))
        for i in range(count)
    ]
    scheduler.run_until_idle()
    for req in reqs:
        if req.error is not None:
            raise req.error
    return reqs


def _static_runner(scheduler: Any, prompt: Any, requests: int) -> Callable[[int], list[int]]:
    """Decode ``requests`` copies of the one-prompt ``prompt`` batch; the first one's ids."""
    return lambda new_tokens: _decode_copies(scheduler, prompt, new_tokens, requests)[0].tokens


def _timed(run: Callable[[int], list[int]], device: torch.device, tokens: list[list[int]]) -> Callable[[int], float]:
    """``run`` timed in seconds; the ids it generated go to ``tokens[0]``."""
    from ...device import synchronize

    @torch.inference_mode()
    def timed(new_tokens: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        tokens[:] = [run(new_tokens)]
        synchronize(device)
        return time.perf_counter() - start

    return timed


def _first_time(mark: list[float], token: int) -> None:
    if not mark:
        mark.append(time.perf_counter())


def _concurrent_case(scheduler: Any, prompt: Any, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """``--concurrent`` requests at once: aggregate tokens/s and mean time to first token (measured per request)."""
    from ...device import synchronize

    walls, ttfts = [], []
    for _ in range(args.repeats + 1):  # the first round warms up
        marks: list[list[float]] = [[] for _ in range(args.concurrent)]
        synchronize(device)
        start = time.perf_counter()
        _decode_copies(
            scheduler,
            prompt,
            args.new_tokens,
            args.concurrent,
            on_token=lambda i: functools.partial(_first_time, marks[i]),
        )
        synchronize(device)
        walls.append(time.perf_counter() - start)
        ttfts.append(statistics.mean(mark[0] - start for mark in marks))
    wall, ttft = statistics.median(walls[1:]), statistics.median(ttfts[1:])
    return {
        "requests": args.concurrent,
        "mean_time_to_first_token_ms": round(ttft * 1000, 2),
        "aggregate_tokens_per_s": round(args.concurrent * args.new_tokens / wall, 2),
        "wall_s": round(wall, 4),
    }


def bench_generate(args: argparse.Namespace) -> dict[str, Any]:
    from ...data.tokenize import ModelBatch
    from ...data.tokenize import collate as collate_text
    from ...device import (
        amp_dtype,
        dtype_name,
        empty_cache,
        parse_dtype,
        peak_memory_gib,
        reset_peak_memory,
        resolve_device,
    )
    from ...infer.batching import SlotScheduler

    device = resolve_device(args.device)
    accel = device.type != "cpu"
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not engines or any(e not in ENGINES for e in engines):
        raise ValueError(f"--engines: a comma list of {', '.join(ENGINES)}")
    if args.new_tokens < 2 or args.batch_size < 1 or args.repeats < 1 or args.concurrent < 0:
        raise ValueError("--new-tokens must be at least 2, --batch-size and --repeats at least 1, --concurrent >= 0")
    cases = [(f"ours-{e}", e, False) for e in engines]
    if args.reference_style:
        cases.append(("reference-style", "plain", True))
    results: list[dict[str, Any]] = []
    greedy: dict[str, list[int]] = {}  # each case's greedy ids (same weights: the same seed builds them)
    for name, engine, reference in cases:
        if reference:
            dtype, attn = (torch.float16 if accel else torch.float32), "eager"
        else:
            dtype = (amp_dtype(device) or torch.float32) if args.dtype == "auto" else parse_dtype(args.dtype)
            attn = args.attn
        model = build_bench_model(llm_shape(args.llm), vision_shape(args.vision), device, dtype, attn, args.seed)
        if reference and accel:
            to_reference_precision(model)
        model.eval()
        rng = random.Random(args.seed)
        enc = prompt_encoded(model.image_tokens, args.prompt_tokens, model.llm.config.vocab_size, rng)
        size = model.config.vision.image_size
        pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(args.seed))
        prompt = ModelBatch(collate_text([enc], SLOT, side="left"), pixels).to(device)
        reset_peak_memory(device)
        scheduler = None
        new_scheduler = functools.partial(
            SlotScheduler,
            model,
            max_len=-(-(len(enc) + args.new_tokens) // 64) * 64,
            cuda_graphs=args.cuda_graphs,
            compile=args.compile,
            end_ids=[EOS],
        )
        if engine == "static":
            scheduler = new_scheduler(slots=args.batch_size)
            run = _static_runner(scheduler, prompt, args.batch_size)
        else:
            if args.compile and not reference:
                from ...model.llm import compile_decoder_layers

                compile_decoder_layers(model.llm)
            batch = ModelBatch(
                collate_text([enc] * args.batch_size, SLOT, side="left"), pixels.expand(args.batch_size, -1, -1, -1)
            ).to(device)
            run = _plain_runner(model, batch)
        generated: list[list[int]] = []
        timed = _timed(run, device, generated)
        timed(2)  # warm-up
        firsts = [timed(1) for _ in range(args.repeats)]
        fulls = [timed(args.new_tokens) for _ in range(args.repeats)]
        ttft, full = statistics.median(firsts), statistics.median(fulls)
        graphed = bool(scheduler is not None and scheduler.decoder.graphed)
        results.append(
            {
                "name": name,
                "engine": "slot decoder" if engine == "static" else "transformers generate",
                "precision": f"{dtype_name(dtype)} weights",
                "attention": attn,
                "cuda_graphs": graphed,
                "compile": bool(args.compile and not reference),
                "batch_size": args.batch_size,
                "time_to_first_token_ms": round(ttft * 1000, 2),
                "decode_tokens_per_s": round(args.batch_size * (args.new_tokens - 1) / max(full - ttft, 1e-9), 2),
                "total_tokens_per_s": round(args.batch_size * args.new_tokens / full, 2),
                "peak_mem_gib": None if device.type == "cpu" else round(peak_memory_gib(device) or 0.0, 3),
            }
        )
        greedy[name] = generated[0]
        if scheduler is not None and args.concurrent:
            del scheduler, run  # free its cache first
            scheduler = new_scheduler(slots=args.concurrent)
            results.append(
                {
                    "name": f"{name}-concurrent",
                    "engine": "slot decoder",
                    "cuda_graphs": graphed,
                    "compile": bool(args.compile),
                    **_concurrent_case(scheduler, prompt, args, device),
                    "peak_mem_gib": None if device.type == "cpu" else round(peak_memory_gib(device) or 0.0, 3),
                }
            )
        del model, scheduler, timed, new_scheduler
        gc.collect()
        empty_cache(device)
    if {"ours-static", "ours-plain"} <= set(greedy):
        static, plain = greedy["ours-static"], greedy["ours-plain"]
        same = next((i for i, (a, b) in enumerate(zip(static, plain)) if a != b), len(plain))
        case = next(r for r in results if r["name"] == "ours-static")
        case["greedy_tokens_equal_to_plain"] = f"{same}/{len(plain)}"
    return {
        "benchmark": "generate",
        "machine": machine_info(device),
        "config": {
            "llm": args.llm,
            "vision": args.vision,
            "batch_size": args.batch_size,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "concurrent": args.concurrent,
            "seed": args.seed,
        },
        "cases": results,
        "process_peak_rss_gib": round(peak_memory_gib(device, cpu_rss=True) or 0.0, 3)
        if device.type == "cpu"
        else None,
    }


def add_generate_arguments(q: argparse.ArgumentParser) -> None:
    q.set_defaults(batch_size=1)
    q.add_argument(
        "--prompt-tokens", type=int, default=36, metavar="N", help="text tokens around the image (default 36)"
    )
    q.add_argument("--new-tokens", type=int, default=32, metavar="N", help="tokens generated (default 32)")
    q.add_argument("--repeats", type=int, default=3, metavar="N", help="runs per figure, median (default 3)")
    q.add_argument("--engines", default="static,plain", help="comma list of static, plain (default: both)")
    q.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_false",
        help="the static engine without recording its step as a CUDA graph",
    )
    q.add_argument(
        "--concurrent",
        type=int,
        default=0,
        metavar="N",
        help="also time N requests decoded together on the static engine (e.g. 16)",
    )
