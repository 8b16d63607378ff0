"""Peak memory per device of a training run, or of chat/serve, predicted from the configs before any weight loads.

Model states are formulas over the exact parameter counts of the model built on the meta device (shapes only):

- **weights** per part, in its dtype, or bitsandbytes 4/8-bit for the LLM's decoder linears (``quantized_bytes``);
  ZeRO-3 divides them by the number of GPUs;
- **gradients**: one per trainable parameter, in its dtype (ZeRO-2/3: divided by the GPUs);
- **optimizer state**: torch's AdamW keeps two moments in the parameter's dtype; 8-bit AdamW two bytes; DeepSpeed
  ZeRO keeps an fp32 master copy and two fp32 moments (12 bytes), divided by the GPUs, or none on the GPU with
  the optimizer offloaded;
- **activations**: the peak of one micro-batch's forward + backward, counted by running our own step on fake tensors
  (:mod:`.trace`: answer-only head, chunked loss, checkpointing, LoRA, vision pass and autocast as they run), less
  the gradients it makes (counted above); under ZeRO-2/3 (gradients reduced bucket by bucket) the peak of all but
  the gradients; QLoRA adds one dequantised weight (bitsandbytes' backward); **ZeRO buffers**: the shipped
  DeepSpeed configs' reduce/all-gather buckets, and at stage 3 two gathered decoder layers; PyTorch FSDP
  (``run.strategy: fsdp``) as ZeRO-3 but with the moments in the parameters' dtype (no master copy) and no buckets;
- **inputs**: the micro-batch's tensors; **KV cache** (inference): layers x 2 x slots x context x KV heads x head
  dim; **runtime**: :data:`CUDA_OVERHEAD` on accelerators (CUDA context, cuBLAS workspace, allocator slack), not
  part of the allocator's ``max_memory_allocated`` peak.

A single process holds weights + optimizer state + max(forward/backward peak, gradients) + inputs at its worst.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .counting import dtype_bytes, quantized_bytes
from .trace import Shape, StepTrace, batch_bytes, synthetic_batch, trace_step

GIB = 2**30
#: Bytes an accelerator uses outside the allocator's count: CUDA context, cuBLAS/cuDNN workspaces, fragmentation.
CUDA_OVERHEAD = int(1.0 * GIB)
#: The seeds' LLMs (Qwen v1 checkpoints use remote code: their shapes as Qwen2 layers, MHA, bias on q/k/v):
#: model_type, hidden, intermediate (per MLP branch), layers, heads, KV heads, vocabulary.
LLM_PRESETS: dict[str, tuple[str, int, int, int, int, int, int]] = {
    "vicuna-7b": ("llama", 4096, 11008, 32, 32, 32, 32000),
    "vicuna-13b": ("llama", 5120, 13824, 40, 40, 40, 32000),
    "qwen-7b-chat": ("qwen2", 4096, 11008, 32, 32, 32, 151936),
    "qwen-14b-chat": ("qwen2", 5120, 13696, 40, 40, 40, 152064),
}
#: Named GPUs: memory in GiB (``--gpu 24`` works too).
GPUS: dict[str, float] = {
    "24gb": 24,
    "4090": 24,
    "a10": 24,
    "40gb": 40,
    "a100-40gb": 40,
    "80gb": 80,
    "a100": 80,
    "h100": 80,
    "h200": 141,
}
METHODS = ("projector", "lora", "qlora", "full")


def llm_config(name: str, trust_remote_code: bool = False) -> Any:
    """A transformers config: a preset (:data:`LLM_PRESETS`), a folder or ``config.json``, or a hub id."""
    from pathlib import Path

    from transformers import AutoConfig

    if name in LLM_PRESETS:
        kind, hidden, inter, layers, heads, kv, vocab = LLM_PRESETS[name]
        return AutoConfig.for_model(
            kind,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            vocab_size=vocab,
            max_position_embeddings=4096,
        )
    path = Path(name)
    source = str(path.parent if path.is_file() else path)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise OSError(
            f"cannot read the LLM config of {name!r} (a preset: {', '.join(LLM_PRESETS)}, a folder or a hub id): {err}"
        ) from err


@dataclass
class Job:
    """What the planner needs of a training run: the model's shapes and what trains, precision, the micro-batch
    shape, and the parallel layout."""

    llm: Any  # transformers PretrainedConfig
    vision: Any  # VisionConfig
    projector: str = "linear"
    llm_dtype: str = "float32"
    vision_dtype: str = "float32"
    freeze: dict[str, bool] = field(default_factory=dict)
    lora: Any = None  # LoraSection
    quantization: str | None = None  # None, "4bit", "8bit"
    double_quant: bool = True  # 4-bit: the block scales quantised too (model.llm_quant_double)
    amp: str = "no"  # no, bf16, fp16
    loss_impl: str = "auto"
    shape: Shape = field(default_factory=lambda: Shape(1, 192, 160))
    checkpointing: bool = False
    grad_accum: int = 1
    gpus: int = 1
    zero_stage: int = 0  # 0: no ZeRO (one process or DDP)
    #: PyTorch FSDP full sharding (run.strategy fsdp): ZeRO-3's division, AdamW moments in the parameters' dtype
    #: and no fp32 master copy, two gathered decoder layers and no DeepSpeed buckets.
    fsdp: bool = False
    offload: bool = False
    optimizer: str = "adamw"  # adamw, adamw8bit
    accelerator: bool = True

    @property
    def method(self) -> str:
        if self.quantization:
            return "qlora"
        if self.lora is not None:
            return "lora"
        return "projector" if self.freeze.get("llm", True) else "full"

    def with_method(self, method: str) -> Job:
        """This job trained another way: ``projector`` (LLM frozen), ``lora``, ``qlora`` (4-bit LLM + LoRA),
        ``full`` (LLM trains)."""
        from ..config import LoraSection

        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
        lora = (self.lora or LoraSection()) if method in ("lora", "qlora") else None
        freeze = {**self.freeze, "llm": method != "full"}
        return replace(self, lora=lora, freeze=freeze, quantization="4bit" if method == "qlora" else None)


def human(size: float) -> str:
    """Bytes as GiB (1 GiB and more) or MiB, two decimals."""
    return f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / 2**20:.2f} MiB"


@dataclass
class Row:
    part: str
    bytes: float
    note: str = ""


@dataclass
class Plan:
    """The predicted peak (``total``) by part; ``allocated`` is what the allocator counts (no runtime overhead)."""

    job: Job
    rows: list[Row]
    allocated: float
    total: float

    def table(self, title: str = "") -> str:
        width = max(len(r.part) for r in self.rows) + 2
        lines = [title] if title else []
        lines += [f"  {r.part:<{width}}{human(r.bytes):>12}  {r.note}".rstrip() for r in self.rows]
        lines.append(f"  {'peak per device':<{width}}{human(self.total):>12}")
        return "\n".join(lines)


def job_from_config(
    config: Any,
    accelerator: bool,
    gpus: int | None = None,
    positions: int | None = None,
    answers: int | None = None,
) -> Job:
    """The :class:`Job` of a :class:`~minigpt.train.config.TrainConfig`: a micro-batch of ``run.batch_size``
    samples, each ``[BOS][image][max_txt_len text]`` (``data.pack_len`` with packing), all text supervised unless
    ``answers`` says; ``gpus`` defaults to the processes torchrun started."""
    import os

    model, run, data = config.model, config.run, config.data
    image_tokens = model.vision.num_tokens
    if positions is None:
        positions = data.pack_len if data.packing else 1 + image_tokens + model.max_txt_len
    if answers is None:
        answers = positions - 1 - image_tokens
    amp = {"auto": "bf16" if accelerator else "no", "bfloat16": "bf16", "float16": "fp16"}.get(run.amp, run.amp)
    zero, fsdp, offload = 0, run.strategy == "fsdp", False
    if run.strategy == "deepspeed_zero":
        zero = run.deepspeed.zero_stage if run.deepspeed.zero_stage is not None else 2
    if fsdp:
        zero, offload = 3, run.fsdp.cpu_offload
    return Job(
        llm=llm_config(model.llm, model.trust_remote_code),
        vision=model.vision,
        projector=model.projector,
        llm_dtype=model.llm_dtype,
        vision_dtype=model.vision_dtype,
        freeze=dict(model.freeze),
        lora=model.lora,
        quantization=model.llm_quantization,
        double_quant=model.llm_quant_double,
        amp=amp,
        loss_impl=model.loss_impl,
        shape=Shape(run.batch_size, positions, answers, 1, data.feature_cache is None),
        checkpointing=run.grad_checkpointing,
        grad_accum=run.grad_accum,
        gpus=gpus or int(os.environ.get("WORLD_SIZE", "1")),
        zero_stage=zero,
        fsdp=fsdp,
        offload=offload,
        accelerator=accelerator,
    )


# ---------------------------------------------------------------------------------------------- the model on meta


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def meta_model(job: Job) -> nn.Module:
    """The job's MiniGPT on the meta device (with its LoRA adapters): shapes and dtypes, no memory. float16 parts
    are built in bfloat16 (the same bytes): the trace runs CPU autocast, which cannot mix float16 with bfloat16."""
    from transformers import AutoModelForCausalLM

    from ...device import parse_dtype
    from ...model.config import MiniGPTConfig
    from ...model.minigpt import MiniGPT
    from ...model.projector import build_projector
    from ...model.vision import Blip2VisionEncoder
    from ..loop import apply_lora

    def dtype(name: str) -> torch.dtype:
        return torch.bfloat16 if parse_dtype(name) == torch.float16 else parse_dtype(name)

    with _quiet(), torch.device("meta"):
        vision = Blip2VisionEncoder(job.vision).to(dtype(job.vision_dtype))
        llm = AutoModelForCausalLM.from_config(job.llm, dtype=dtype(job.llm_dtype), attn_implementation="sdpa")
        projector = build_projector(job.projector, vision.out_dim, job.llm.hidden_size)
    config = MiniGPTConfig(llm="plan", vision=job.vision, projector=job.projector, freeze=job.freeze)
    model = MiniGPT(config, vision, projector, llm)
    model.loss_impl = job.loss_impl
    if job.lora is not None:
        with _quiet():
            apply_lora(model, job.lora)
    return model


def _quantized_linears(model: nn.Module) -> dict[int, nn.Linear]:
    """The LLM's decoder linears (what bitsandbytes quantizes: not the embeddings, norms, LM head or adapters)."""
    from ...model.llm import decoder_layers

    return {
        id(m.weight): m
        for name, m in decoder_layers(model.llm).named_modules()
        if isinstance(m, nn.Linear) and "lora_" not in name
    }


@dataclass
class Weights:
    """The model states' inputs: weight rows per part, trainable bytes and parameters, the largest quantised
    linear (elements)."""

    rows: list[Row]
    trainable: float
    trainable_params: int
    largest_quantized: int
    layer_bytes: float = 0.0  # one decoder layer's weights


def weights_of(job: Job) -> Weights:
    """Weights per part (and LoRA adapters) of ``job``'s model on the meta device, in their dtype or quantised."""
    model = meta_model(job)
    quantized = _quantized_linears(model) if job.quantization else {}
    sizes: dict[str, float] = {}
    dtypes: dict[str, set[str]] = {}
    trainable, count = 0.0, 0
    seen: set[int] = set()
    for part, items in model.parts().items():
        params = [p for item in items for p in ([item] if isinstance(item, nn.Parameter) else item.parameters())]
        for p in params:
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = "lora" if part == "llm" and p.requires_grad and job.lora is not None else part
            if id(p) in quantized:
                size, kind = (
                    quantized_bytes(p.numel(), p.shape[0], job.quantization or "", job.double_quant),
                    job.quantization,
                )
            else:
                size, kind = p.numel() * p.element_size(), str(p.dtype).removeprefix("torch.")
            sizes[name] = sizes.get(name, 0.0) + size
            dtypes.setdefault(name, set()).add(str(kind))
            if p.requires_grad:
                trainable += p.numel() * p.element_size()
                count += p.numel()
    labels = {"vision": "ViT", "qformer": "Q-Former", "projector": "projector", "llm": "LLM", "lora": "LoRA"}
    rows = [
        Row(f"weights: {labels[name]}", size, "+".join(sorted(dtypes[name])) + _trains(model, name, job))
        for name, size in sizes.items()
        if size
    ]
    largest = max((m.weight.numel() for m in quantized.values()), default=0)
    from ...model.llm import decoder_layers

    layer = sum(p.numel() * p.element_size() for p in decoder_layers(model.llm)[0].parameters())
    return Weights(rows, trainable, count, largest, layer)


def _trains(model: nn.Module, name: str, job: Job) -> str:
    if name == "lora":
        return ", trains"
    return "" if model.config.freeze.get(name, True) else ", trains"


# ---------------------------------------------------------------------------------------------- the plan


def plan_training(job: Job, trace: StepTrace | None = None, weights: Weights | None = None) -> Plan:
    """The predicted peak per device of ``job`` (``trace`` and ``weights``: of the same model and shape, reused)."""
    weights = weights or weights_of(job)
    rows, trainable, largest = [replace(r) for r in weights.rows], weights.trainable, weights.largest_quantized
    gpus = max(1, job.gpus)
    zero = job.zero_stage
    if zero >= 3:
        for row in rows:
            row.bytes /= gpus
            row.note += f", {'FSDP' if job.fsdp else 'ZeRO-3'} / {gpus}"
    weight_bytes = sum(r.bytes for r in rows)
    if trace is None:
        trace = step_trace(job)
    grads = trainable / (gpus if zero >= 2 else 1)
    params_trainable = weights.trainable_params
    if job.fsdp:
        optim = 0.0 if job.offload else 2 * trainable / gpus
        optim_note = "offloaded to CPU" if job.offload else f"AdamW moments in the parameters' dtype, FSDP / {gpus}"
    elif zero:
        optim = 0.0 if job.offload else 12 * params_trainable / gpus
        optim_note = "offloaded to CPU" if job.offload else f"fp32 master + AdamW moments, ZeRO / {gpus}"
    elif job.optimizer == "adamw8bit":
        optim, optim_note = 2 * params_trainable, "8-bit AdamW moments"
    else:
        optim, optim_note = 2 * trainable, "AdamW moments in the parameters' dtype"
    # One process holds every gradient: the step's peak counts them as they form. ZeRO-2/3 reduce each bucket to
    # its owner as backward makes it: the activations' own peak, plus the process's share of the gradients.
    activations = trace.without_grads if zero >= 2 else max(0.0, trace.peak - trainable)
    notes = [f"micro-batch {job.shape.batch} x {job.shape.positions} positions"]
    if job.shape.vision_in_step:
        notes.append("vision pass")
    if job.checkpointing:
        notes.append("checkpointing")
    if job.quantization and largest:
        # backward dequantises one weight at a time in the LLM's dtype, cast to autocast's when that differs
        compute = {"bf16": "bfloat16", "fp16": "float16"}.get(job.amp, job.llm_dtype)
        cast = dtype_bytes(compute) if compute != job.llm_dtype else 0
        activations += largest * (dtype_bytes(job.llm_dtype) + cast)
        notes.append("a dequantised weight")
    if job.fsdp:
        rows.append(Row("ZeRO buffers", 2 * weights.layer_bytes, "FSDP: two gathered decoder layers"))
    elif zero:  # the shipped DeepSpeed configs' buckets (bf16), and ZeRO-3's gathered layers
        buckets = 2 * (4e8 if zero < 3 else 1e8)
        rows.append(
            Row(
                "ZeRO buffers",
                min(buckets, 2 * trainable) + (2 * weights.layer_bytes if zero >= 3 else 0),
                "reduce/all-gather buckets" + (", two gathered layers" if zero >= 3 else ""),
            )
        )
    inputs = batch_bytes(synthetic_batch(job.vision, job.llm.vocab_size, job.shape))
    rows += [
        Row("gradients", grads, f"trainable parameters{f', ZeRO-2+ / {gpus}' if zero >= 2 else ''}"),
        Row("optimizer state", optim, optim_note),
        Row("activations", activations, ", ".join(notes)),
        Row("inputs", inputs, "ids, labels, masks, pixels or features"),
    ]
    allocated = (
        weight_bytes + grads + optim + activations + inputs + sum(r.bytes for r in rows if r.part == "ZeRO buffers")
    )
    overhead = CUDA_OVERHEAD if job.accelerator else 0
    if job.accelerator:
        rows.append(Row("runtime", overhead, "CUDA context, workspaces, allocator slack (a constant)"))
    return Plan(job, rows, allocated, allocated + overhead)


#: LLMs deeper than this are traced at 2 and 3 layers and extrapolated (every decoder layer adds the same bytes).
TRACE_LAYERS = 4


def step_trace(job: Job) -> StepTrace:
    """The forward/backward bytes of one micro-batch of ``job`` (two with gradient accumulation: the second runs
    with the first's gradients live). An LLM of more than :data:`TRACE_LAYERS` layers is traced with 2 and 3 of
    them and the bytes extrapolated linearly to all of them, which keeps a 70B model's plan to seconds."""
    layers = job.llm.num_hidden_layers
    if layers <= TRACE_LAYERS:
        return _trace(job)
    two, three = (_trace(replace(job, llm=with_layers(job.llm, n))) for n in (2, 3))
    return StepTrace(*(round(a + (b - a) * (layers - 2)) for a, b in zip(vars(two).values(), vars(three).values())))


def _trace(job: Job) -> StepTrace:
    if job.freeze.get("vision", True) and job.freeze.get("qformer", True):
        # A frozen encoder saves nothing for backward: its pass costs one layer's temporaries at any depth.
        vision = replace(job.vision, depth=min(job.vision.depth, 2), qformer_depth=min(job.vision.qformer_depth, 2))
        job = replace(job, vision=vision)
    return trace_step(lambda: meta_model(job), job.shape, job.amp, job.checkpointing, min(job.grad_accum, 2))


def with_layers(config: Any, layers: int) -> Any:
    """A copy of a transformers config with ``layers`` decoder layers."""
    data = config.to_dict()
    data["num_hidden_layers"] = layers
    if isinstance(data.get("layer_types"), list):
        data["layer_types"] = data["layer_types"][:layers]
    return type(config).from_dict(data)


def plan_inference(job: Job, slots: int, context: int) -> Plan:
    """Weights (no gradients) + the engine's slot KV cache (``slots`` x ``context`` positions, in the LLM's dtype,
    :func:`minigpt.infer.slots.kv_bytes_per_position`) + one prompt's prefill."""
    from ...infer.slots import kv_bytes_per_position

    frozen = replace(job, lora=None, freeze=dict.fromkeys(("vision", "qformer", "projector", "llm"), True))
    rows = weights_of(frozen).rows
    cfg = job.llm
    kv = slots * context * kv_bytes_per_position(meta_model(replace(frozen, quantization=None)).llm)
    act = dtype_bytes(job.llm_dtype) * context * (4 * cfg.hidden_size + 3 * cfg.intermediate_size)
    act += 4 * cfg.vocab_size  # the last position's float32 logits
    rows += [
        Row("KV cache", kv, f"{cfg.num_hidden_layers} layers x {slots} slots x {context} positions"),
        Row("prefill", act, "one prompt's hidden states, MLP and last logits"),
    ]
    allocated = sum(r.bytes for r in rows)
    overhead = CUDA_OVERHEAD if job.accelerator else 0
    if job.accelerator:
        rows.append(Row("runtime", overhead, "CUDA context, workspaces, allocator slack (a constant)"))
    return Plan(job, rows, allocated, allocated + overhead)


# ---------------------------------------------------------------------------------------------- what fits


@dataclass
class Option:
    method: str
    micro_batch: int
    checkpointing: bool
    zero_stage: int
    offload: bool
    total: float
    cost: float  # relative time per sample (lower is faster)

    def describe(self) -> str:
        zero = f"ZeRO-{self.zero_stage}" if self.zero_stage else "no ZeRO"
        return (
            f"{self.method:<9} micro-batch {self.micro_batch:<3} checkpointing {'on ' if self.checkpointing else 'off'}"
            f"  {zero:<7} {'offload' if self.offload else '':<7} {human(self.total):>12}"
        )


#: Relative cost per sample of each choice (a heuristic, stated in the README): recomputing the forward, the
#: dequantisation of QLoRA, the CPU optimizer step, ZeRO-3's gathers, and small micro-batches' poorer use of the GPU.
COST = {"checkpointing": 1.33, "qlora": 1.3, "offload": 1.6, "zero3": 1.15, "full": 1.2, "lora": 1.0, "projector": 0.8}


def _cost(method: str, mb: int, ckpt: bool, zero: int, offload: bool) -> float:
    cost = COST[method if method != "qlora" else "lora"] * (COST["qlora"] if method == "qlora" else 1.0)
    cost *= COST["checkpointing"] if ckpt else 1.0
    cost *= COST["offload"] if offload else 1.0
    cost *= COST["zero3"] if zero == 3 else 1.0
    return cost * (1 + 0.5 / mb)


def fitting_options(job: Job, capacity: float, methods: list[str] | None = None, limit: int = 12) -> list[Option]:
    """The settings of ``job`` that fit ``capacity`` bytes per device, fastest first, each slower one needing less
    memory than those before it. Per way of training (LoRA
    and QLoRA share one) and checkpointing, activations are traced at micro-batches 1 and 2 and taken as linear in
    the micro-batch beyond."""
    methods = methods or alternatives(job.method)
    batches = sorted({1, 2, 4, 8, 16, job.shape.batch})
    layouts = [(0, False), (2, True), (3, True)]
    if job.gpus > 1:
        layouts = [(0, False), (1, False), (2, False), (3, False), (3, True)]
    options = []
    traces: dict[tuple[str, bool], tuple[StepTrace, StepTrace]] = {}
    for method in methods:
        base = job.with_method(method)
        weights = weights_of(base)
        for ckpt in (False, True):
            key = ("lora" if method == "qlora" else method, ckpt)  # LoRA and QLoRA save the same activations
            if key not in traces:
                one, two = (replace(base, shape=replace(base.shape, batch=n), checkpointing=ckpt) for n in (1, 2))
                traces[key] = (step_trace(one), step_trace(two))
            one, two = traces[key]
            for mb in batches:
                trace = StepTrace(
                    *(round(a + (b - a) * (mb - 1)) for a, b in zip(vars(one).values(), vars(two).values()))
                )
                for zero, offload in layouts:
                    candidate = replace(
                        base, shape=replace(base.shape, batch=mb), checkpointing=ckpt, zero_stage=zero, offload=offload
                    )
                    total = plan_training(candidate, trace, weights).total
                    if total <= capacity:
                        cost = _cost(method, mb, ckpt, zero, offload)
                        options.append(Option(method, mb, ckpt, zero, offload, total, cost))
    options.sort(key=lambda o: (o.cost, o.total))
    frontier: list[Option] = []  # a slower setting is listed only when it needs less memory than every faster one
    for option in options:
        if all(option.total < kept.total for kept in frontier):
            frontier.append(option)
    return frontier[:limit]


def alternatives(method: str) -> list[str]:
    """The method a config uses and the cheaper ways to train the same LLM."""
    return {"full": ["full", "lora", "qlora"], "lora": ["lora", "qlora"], "qlora": ["qlora"]}.get(method, [method])


def gpu_bytes(name: str) -> float:
    """Bytes of a named GPU (:data:`GPUS`) or of ``N`` / ``NGB`` GiB."""
    key = name.strip().lower()
    if key in GPUS:
        return GPUS[key] * GIB
    try:
        return float(key.removesuffix("gib").removesuffix("gb")) * GIB
    except ValueError:
        raise ValueError(f"unknown GPU {name!r}; use a size in GB or one of {', '.join(GPUS)}") from None


__all__ = [
    "CUDA_OVERHEAD",
    "GIB",
    "GPUS",
    "Job",
    "LLM_PRESETS",
    "METHODS",
    "Option",
    "Plan",
    "Row",
    "alternatives",
    "fitting_options",
    "gpu_bytes",
    "human",
    "job_from_config",
    "llm_config",
    "meta_model",
    "plan_inference",
    "plan_training",
    "step_trace",
    "with_layers",
    "Weights",
    "weights_of",
]
