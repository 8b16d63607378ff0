"""The training recipe: build model, data, optimizer and schedule from a :class:`TrainConfig`, then one loop.

The loop knows nothing of parallelism: the :class:`~minigpt.train.strategy.Strategy` wraps the model and runs
backward, step and the reductions. Read :meth:`Trainer.fit` top to bottom.

Loss normalisation: a step's loss is the mean over all supervised tokens of the step (every micro-batch of every
process), so ``grad_accum x batch_size`` and the number of processes change nothing but memory and speed. Each
micro-batch's mean loss is weighted by its share of the step's tokens before backward.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..console import logs_above_bars, progress_bar
from ..data.features import open_feature_cache, project_features
from ..device import peak_memory_gib, pins_memory
from ..files import atomic_directory, atomic_write_text
from ..model.config import read_config
from ..model.llm import bnb_quantization, compile_decoder_layers, is_quantized, keep_4bit_layout
from ..model.minigpt import ADAPTER_DIR, MiniGPT
from ..model.processor import MiniGPTProcessor
from .checkpoint import capture_rng, list_checkpoints, load_checkpoint, resolve_resume, restore_rng
from .config import LoraSection, ModelSection, OptimizerSection, ScheduleSection, TrainConfig
from .data import DevicePrefetcher, LoaderSettings, SampleEncoder, TrainBatch, TrainData, eval_loader
from .strategy import Strategy

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"
MAX_SKIP_WARNINGS = 20


# ---------------------------------------------------------------------------------------------- building blocks


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(
    section: ModelSection, seed: int = 0, compute_dtype: torch.dtype | None = None, device: torch.device | None = None
) -> MiniGPT:
    """A :class:`MiniGPT` for training: built from ``section`` (random parts seeded with ``seed``), with the parts
    saved in ``init_from`` loaded and LoRA adapters added when configured. With ``llm_quantization`` (QLoRA) the LLM
    is loaded by bitsandbytes onto ``device`` with matmuls in ``compute_dtype`` (default: ``llm_dtype``)."""
    torch.manual_seed(seed)
    if section.init_from:
        try:
            read_config(section.init_from)
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"model.init_from: {err}") from None
        if section.llm_quantization and (Path(section.init_from) / ADAPTER_DIR).is_dir():
            raise ValueError(
                f"model.init_from: {section.init_from} holds a LoRA adapter ({ADAPTER_DIR}/), which cannot be merged "
                "into a quantized LLM; merge it first (minigpt convert merge-lora) and start from the merged model"
            )
    llm_kwargs = None
    if section.llm_quantization:
        quant = bnb_quantization(
            section.llm_quantization,
            compute_dtype or section.llm_dtype,
            section.llm_quant_type,
            section.llm_quant_double,
        )
        llm_kwargs = {"quantization_config": quant, **({"device_map": {"": str(device)}} if device is not None else {})}
    model = MiniGPT.build(section.minigpt_config(), init_from=section.init_from, llm_kwargs=llm_kwargs)
    model.loss_impl = section.loss_impl
    if section.llm_quantization:
        keep_4bit_layout(model.llm)
    if section.lora is not None:
        apply_lora(model, section.lora)
    return model


def build_processor(section: ModelSection, model: MiniGPT) -> MiniGPTProcessor:
    """The processor of a model :func:`build_model` made (sharing its config): the tokenizer ``init_from`` saved,
    else the LLM's."""
    if section.init_from:
        return MiniGPTProcessor.from_pretrained(section.init_from, model.config)
    return MiniGPTProcessor.from_config(model.config)


def apply_lora(model: Any, lora: LoraSection) -> None:
    """Wrap the LLM with peft LoRA adapters; the adapters train (in float32), the LLM stays frozen.

    On a quantized LLM (QLoRA) this is all of peft's ``prepare_model_for_kbit_training`` that training needs: the
    base stays frozen and gradient checkpointing is ``run.grad_checkpointing`` (non-reentrant, so the inputs need no
    ``requires_grad`` hook); its upcast of every non-quantized weight (embeddings, LM head, norms) to float32 is
    left out on purpose: those weights are frozen, so float32 copies only cost memory (README, QLoRA)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules, bias="none"
    )
    model.llm = get_peft_model(model.llm, config)
    for name, param in model.llm.named_parameters():
        param.requires_grad_("lora_" in name)
        if param.requires_grad and is_quantized(model.llm) and param.dtype != torch.float32:
            param.data = param.data.float()


def build_optimizer(model: nn.Module, section: OptimizerSection) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; matrices decay, 1-D parameters (biases, norms) do not."""

    def ndim(p: nn.Parameter) -> int:  # a ZeRO-3 partitioned parameter keeps its real shape in ds_shape
        return len(getattr(p, "ds_shape", p.shape))

    decay = [p for p in model.parameters() if p.requires_grad and ndim(p) >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and ndim(p) < 2]
    if not decay and not no_decay:
        raise ValueError("nothing to train: every part of the model is frozen (model.freeze)")
    groups = [
        {"params": decay, "weight_decay": section.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    try:  # the fused kernel is several times faster (CPU included) where the parameters' device has it
        return torch.optim.AdamW(groups, lr=section.lr, betas=section.betas, eps=section.eps, fused=True)
    except RuntimeError:
        return torch.optim.AdamW(groups, lr=section.lr, betas=section.betas, eps=section.eps)


class Schedule:
    """Learning rate of optimizer step ``t`` (0-based), a pure function of ``t`` (see ScheduleSection)."""

    def __init__(self, section: ScheduleSection, lr: float, total_steps: int) -> None:
        self.section, self.lr, self.total_steps = section, lr, max(1, total_steps)

    def __call__(self, step: int) -> float:
        s = self.section
        if step < s.warmup_steps:
            return min(self.lr, s.warmup_lr + (self.lr - s.warmup_lr) * step / max(s.warmup_steps, 1))
        if s.name == "constant":
            return self.lr
        return s.min_lr + (self.lr - s.min_lr) * 0.5 * (1.0 + math.cos(math.pi * step / self.total_steps))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.section.name, "lr": self.lr, "total_steps": self.total_steps}


def run_step(
    model: nn.Module,
    strategy: Strategy,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    micro: list[TrainBatch],
    tokens: int,
    stand_in: TrainBatch,
    max_grad_norm: float | None,
) -> tuple[float, float]:
    """One optimizer step (the Trainer's, and ``minigpt bench train``'s): :func:`forward_backward`, the strategy's
    step (clipping to ``max_grad_norm``), zeroed gradients. Returns the token-weighted loss sum over all processes
    and the gradient norm: the step's only reads of device values, after all its work is queued."""
    loss_sum = forward_backward(model, strategy, micro, tokens, stand_in)
    grad_norm = strategy.step(optimizer, params, max_grad_norm)
    optimizer.zero_grad(set_to_none=True)
    (total,) = strategy.all_reduce([float(loss_sum)])
    return total, grad_norm


def forward_backward(
    model: nn.Module, strategy: Strategy, micro: list[TrainBatch], tokens: int, stand_in: TrainBatch
) -> torch.Tensor:
    """Forward and backward of an optimizer step's micro-batches (``tokens``: the step's supervised tokens over all
    processes), each micro-batch's mean loss weighted by its share of them. Returns this process's token-weighted
    loss sum on the device: nothing here waits for the device, so read it once, after the step."""
    loss_sum = torch.zeros((), device=strategy.device)
    for i, b in enumerate(micro):
        # An all-skipped micro-batch still runs (``stand_in``, weight 0) so DDP's gradient sync matches.
        weight = 0.0 if b.empty else b.num_tokens * strategy.world_size / tokens
        with strategy.accumulate(model, sync=i == len(micro) - 1):
            with strategy.autocast():
                out = model(**step_inputs(strategy.unwrap(model), stand_in if b.empty else b, strategy.device))
            strategy.backward(out.loss * weight)
        if not b.empty:
            loss_sum += out.loss.detach().float() * b.num_tokens
    return loss_sum


def step_inputs(model: Any, b: TrainBatch, device: torch.device) -> dict[str, Any]:
    """Forward arguments of a micro-batch: the batch on ``device``, plus the projected image features when they come
    from the feature cache (the projector runs here, outside the vision encoder, and still trains)."""
    inputs: dict[str, Any] = {"batch": b.batch.to(device)}
    if b.features is not None:
        inputs["image_embeds"] = project_features(model, b.features)
    return inputs


# ---------------------------------------------------------------------------------------------- reporting


class Reporter:
    """Rank 0's outputs: ``metrics.jsonl`` (one record per step and per eval), a progress bar (or log lines when
    stderr is not a terminal), and TensorBoard / Weights & Biases when asked. Other ranks get a silent one."""

    def __init__(self, out: Path, enabled: bool, report_to: list[str], config: TrainConfig) -> None:
        self.enabled, self.path, self.log_every = enabled, out / METRICS_FILE, config.run.log_every
        self.bar: Any = None
        self._console = ExitStack()  # console logging goes above the bar while it is open
        self._file: Any = None
        self.tb: Any = None
        self.wandb: Any = None
        self.history: list[dict[str, Any]] = []
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError(
                    "run.report_to lists tensorboard, which is not installed: pip install tensorboard"
                ) from None
            self.tb = SummaryWriter(str(out / "tensorboard"))
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("run.report_to lists wandb, which is not installed: pip install wandb") from None
            self.wandb = wandb.init(
                project=config.run.wandb_project, name=out.name, dir=str(out), config=config.to_dict()
            )

    def start(self, step: int, total: int) -> None:
        """Drop records after ``step`` (left by a run that was killed after its last checkpoint); open the bar."""
        if not self.enabled:
            return
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _record_step(line) <= step] if step else []
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self._file = open(self.path, "a")
        self.start_step, self.total, self.t0 = step, total, time.perf_counter()
        if sys.stderr.isatty():
            self.bar = progress_bar(
                total=total, initial=step, desc=self.path.parent.name, unit="step", dynamic_ncols=True
            )
            self._console.enter_context(logs_above_bars())

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.history.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if "eval_loss" in record:
            scores = "".join(
                f", {k[5:]} {v:.4f}" for k, v in record.items() if k.startswith("eval/") and k.count("/") == 2
            )
            log.info("step %d: eval loss %.4f%s", step, record["eval_loss"], scores)
        elif self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(_summary(record), refresh=False)
        elif step % self.log_every == 0 or step == self.total:
            done = step - self.start_step
            eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.total - step)
            log.info("step %d/%d  %s  eta %s", step, self.total, _summary(record), _duration(eta))
        if self.tb is not None and (step % self.log_every == 0 or "eval_loss" in record):
            for key, value in numbers.items():
                self.tb.add_scalar(f"train/{key}" if "eval" not in key else key, value, step)
        if self.wandb is not None and (step % self.log_every == 0 or "eval_loss" in record):
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        self._console.close()
        if self.bar is not None:
            self.bar.close()
        if getattr(self, "_file", None) is not None:
            self._file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.bar = self.tb = self.wandb = self._file = None


def _record_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a line torn by a kill: dropped


def _summary(r: dict[str, Any]) -> str:
    mem = f" mem {r['peak_mem_gib']:.2f}G" if r.get("peak_mem_gib") is not None else ""
    loss = f"{r['loss']:.4f}" if r.get("loss") is not None else "-"
    return f"loss {loss} lr {r['lr']:.2e} {r['tokens_per_s']:.0f} tok/s {r['samples_per_s']:.1f} samples/s{mem}" + (
        f" skipped {r['skipped']}" if r.get("skipped") else ""
    )


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _peak_memory(device: torch.device) -> float | None:
    """Accelerator peak memory, or the process's peak resident memory on CPU (GiB)."""
    peak = peak_memory_gib(device, cpu_rss=True)
    return None if peak is None else round(peak, 3)


# ---------------------------------------------------------------------------------------------- the recipe


@dataclass
class TrainResult:
    model: MiniGPT
    processor: MiniGPTProcessor
    step: int
    history: list[dict[str, Any]] = field(default_factory=list)  # this run's records (rank 0)
    final_dir: Path | None = None


class Trainer:
    def __init__(self, config: TrainConfig, strategy: Strategy) -> None:
        self._begin(config, strategy)
        run = self.run
        with strategy.model_init():
            model = build_model(config.model, run.seed, strategy.amp_dtype, strategy.device).place(strategy.device)
        self.processor = build_processor(config.model, model)
        if run.grad_checkpointing:
            model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if run.attn_implementation != "sdpa":  # load_llm's default
            model.llm.set_attn_implementation(run.attn_implementation)
        if run.compile:
            compile_decoder_layers(model.llm)
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        if strategy.scaler is not None and any(p.dtype == torch.float16 for p in self.params):
            raise ValueError("fp16 loss scaling needs float32 trainable parameters; use bf16 or a float32 LLM")
        optimizer = build_optimizer(model, run.optimizer)
        data = config.data
        self._plan_data(open_feature_cache(data.feature_cache, model, data.augment) if data.feature_cache else None)
        self._ready(model, optimizer)

    # Set-up phases, shared with the pipeline's Trainer (minigpt.train.deepspeed.trainer), which builds its model
    # otherwise.
    def _begin(self, config: TrainConfig, strategy: Strategy) -> None:
        """Configuration, outputs (failing early on missing reporting packages), determinism and seeds."""
        self.config, self.run, self.strategy = config, config.run, strategy
        run = self.run
        self.out = Path(run.output_dir)
        self.reporter = Reporter(self.out, strategy.is_main, run.report_to, config)
        if run.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(run.seed)

    def _plan_data(self, features: Any = None) -> None:
        """The training data of ``self.model`` (visual features from a cache when given), the schedule, the eval set."""
        run, data, strategy = self.run, self.config.data, self.strategy
        self.global_batch = run.batch_size * run.grad_accum * strategy.world_size
        encoder = SampleEncoder.for_processor(
            self.processor, data.augment, run.seed, data.min_scale, data.hflip, features, data.max_image_pixels
        )
        self.data = TrainData(
            data.datasets,
            encoder,
            run.seed,
            self.global_batch,
            run.iters_per_epoch,
            data.group_by_length,
            data.group_window,
        )
        self.total_steps = run.max_steps or run.epochs * self.data.steps_per_epoch
        self.schedule = Schedule(run.schedule, run.optimizer.lr, self.total_steps)
        self.eval_loader = None
        if data.eval:
            eval_encoder = SampleEncoder.for_processor(
                self.processor, train=False, seed=run.seed, max_pixels=data.max_image_pixels
            )
            self.eval_loader = eval_loader(
                data.eval,
                eval_encoder,
                run.eval_batch_size or run.batch_size,
                strategy.rank,
                strategy.world_size,
                self.pad_id,
                data.num_workers,
            )

    def _ready(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Counters, the resumed state (when a checkpoint is there), and ``module`` + ``optimizer`` prepared by the
        strategy."""
        self.step = 0
        # "skipped": samples dropped while training (bad image, ...); malformed records: data.skipped_records
        self.counters = {"samples": 0, "tokens": 0, "skipped": 0}
        self._warned: set[str] = set()  # origins of the skipped samples reported (once each, across epochs)
        self._evaluated_at: int | None = None
        self._eval_task_data: Any = None
        self.optimizer = optimizer
        self._resume()
        self.forward_model, self.optimizer = self.strategy.prepare(module, optimizer)

    @property
    def pad_id(self) -> int:
        return self.processor.pad_token_id

    # -- the loop
    def fit(self) -> TrainResult:
        run, strategy = self.run, self.strategy
        counts = self.model.parameter_counts()
        log.info(
            "training %s for %d steps (%d per epoch, global batch %d = %d x %d accum x %d processes) on %s%s",
            ", ".join(f"{p} ({c['trainable']:,} params)" for p, c in counts.items() if c["trainable"]) or "nothing",
            self.total_steps,
            self.data.steps_per_epoch,
            self.global_batch,
            run.batch_size,
            run.grad_accum,
            strategy.world_size,
            strategy.device,
            f" with {strategy.amp_dtype} autocast" if strategy.amp_dtype else "",
        )
        try:
            return self._fit()
        finally:
            self.reporter.close()

    def _fit(self) -> TrainResult:
        run, strategy = self.run, self.strategy
        self.reporter.start(self.step, self.total_steps)
        data = self.config.data
        settings = LoaderSettings(
            run.batch_size,
            run.grad_accum,
            self.pad_id,
            data.num_workers,
            data.pack_len if data.packing else None,
            pin_memory=pins_memory(strategy.device),
        )
        loader = self.data.loader(settings, range(self.step, self.total_steps), strategy.rank, strategy.world_size)
        batches = iter(DevicePrefetcher(loader, strategy.device))
        self._train_mode()
        if run.eval_at_start and self.step == 0:
            self.evaluate()
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(run.grad_accum)]
            record = self.train_step(micro)
            self.step += 1
            record.update(self._rates(record, time.perf_counter() - t0))
            self.reporter.log(record)
            if run.eval_every and self.step % run.eval_every == 0:
                self.evaluate()
            if self.step % run.save_every == 0 or self.step == self.total_steps:
                self.save()
        if self.eval_loader is not None and self._evaluated_at != self.step:
            self.evaluate()
        final = self.save_final()
        return TrainResult(self.model, self.processor, self.step, self.reporter.history, final)

    def begin_step(self, micro: list[TrainBatch]) -> tuple[dict[str, Any], int]:
        """Set the step's learning rate and count its tokens and samples over all processes: the record to log
        and the supervised token count (0: the step has nothing to learn from and ``loss`` is None)."""
        lr = self.schedule.apply(self.optimizer, self.step)
        self._warn_skipped(micro)
        local = [
            sum(b.num_tokens for b in micro),
            sum(b.num_samples for b in micro),
            sum(b.num_input_tokens for b in micro),
            sum(len(b.skipped) for b in micro),
        ]
        tokens, samples, input_tokens, skipped = (int(v) for v in self.strategy.all_reduce(local))
        self.counters["samples"] += samples
        self.counters["tokens"] += tokens
        self.counters["skipped"] += skipped
        record: dict[str, Any] = {
            "step": self.step + 1,
            "epoch": self.step // self.data.steps_per_epoch,
            "lr": lr,
            "tokens": tokens,
            "samples": samples,
            "input_tokens": input_tokens,
            "skipped": self.counters["skipped"],
            "skipped_records": self.data.skipped_records,
        }
        if tokens == 0:  # every sample of the step skipped (or without answer tokens)
            log.warning("step %d: no supervised token in the step, no update", self.step + 1)
            record.update(loss=None, grad_norm=None)
        return record, tokens

    def train_step(self, micro: list[TrainBatch]) -> dict[str, Any]:
        run, strategy = self.run, self.strategy
        record, tokens = self.begin_step(micro)
        if tokens == 0:
            return record
        loss_sum, grad_norm = run_step(
            self.forward_model,
            strategy,
            self.optimizer,
            self.params,
            micro,
            tokens,
            self.data.example_batch,
            run.max_grad_norm,
        )
        record.update(loss=loss_sum / tokens, grad_norm=grad_norm)
        return record

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Token-weighted mean loss over the eval set (all processes), logged as ``eval_loss``."""
        if self.eval_loader is None:
            return None
        model = self.strategy.unwrap(self.forward_model)
        model.eval()
        loss_sum, tokens, skipped = 0.0, 0, 0
        for b in self._eval_batches():
            skipped += len(b.skipped) if b is not None else 0
            if b is None or b.empty or b.num_tokens == 0:
                if self.strategy.collective_forward:  # the other processes' forward waits for this one's
                    with self.strategy.autocast():
                        model(**step_inputs(model, self.data.example_batch, self.strategy.device))
                continue
            with self.strategy.autocast():
                out = model(batch=b.batch.to(self.strategy.device))
            loss_sum += float(out.loss) * b.num_tokens
            tokens += b.num_tokens
        loss_sum, tokens, skipped = self.strategy.all_reduce([loss_sum, tokens, skipped])
        self._train_mode()
        loss = loss_sum / tokens if tokens else float("nan")
        self._evaluated_at = self.step
        record = {"step": self.step, "eval_loss": loss, "eval_tokens": int(tokens), "eval_skipped": int(skipped)}
        record.update(self.evaluate_task())
        self.reporter.log(record)
        return loss

    def _eval_batches(self) -> Iterator[TrainBatch | None]:
        """This process's eval batches; where forward passes are collective (FSDP), followed by None until every
        process has run out, so that all run as many."""
        if not self.strategy.collective_forward:
            yield from self.eval_loader
            return
        batches = iter(self.eval_loader)
        while True:
            b = next(batches, None)
            (running,) = self.strategy.all_reduce([float(b is not None)])
            if not running:
                return
            yield b

    def evaluate_task(self) -> dict[str, float]:
        """Metrics of ``run.eval_task`` on the main process (others wait), as ``eval/<task>/<metric>``."""
        section = self.run.eval_task
        if section is None:
            return {}
        metrics: dict[str, float] = {}
        if self.strategy.is_main:
            from dataclasses import replace

            from ..eval.runner import IN_TRAINING, evaluate_task
            from ..eval.tasks import load_task
            from ..infer.engine import Engine
            from ..infer.generate import GenerationOptions

            if self._eval_task_data is None:
                self._eval_task_data = load_task(section.task, section.data, section.images)
            engine = Engine(self.strategy.unwrap(self.forward_model), self.processor)
            with self.strategy.autocast():
                scores = evaluate_task(
                    engine,
                    section.task,
                    self._eval_task_data,
                    GenerationOptions(max_new_tokens=section.max_new_tokens),
                    replace(IN_TRAINING, limit=section.limit, batch_size=section.batch_size),
                )
            self._train_mode()
            metrics = {f"eval/{section.task}/{k}": v for k, v in scores.items()}
        self.strategy.barrier()
        return metrics

    # -- checkpoints
    def save(self) -> None:
        run, strategy = self.run, self.strategy
        state = {
            "optimizer": strategy.optimizer_state(self.optimizer),
            "schedule": self.schedule.state_dict(),
            "strategy": strategy.state_dict(),
            "rng": capture_rng(strategy.device),
            "position": {"step": self.step, "epoch": self.step // self.data.steps_per_epoch},
            "counters": dict(self.counters),
            "layout": self._layout(),
        }
        weights = strategy.trainable_state(self.forward_model)
        path = strategy.save_checkpoint(self.out, self.step, weights, state, run.keep_last)
        if path is not None:
            log.debug("saved %s", path)
        strategy.barrier()

    def _layout(self) -> dict[str, int]:
        return {
            "global_batch": self.global_batch,
            "steps_per_epoch": self.data.steps_per_epoch,
            "total_steps": self.total_steps,
        }

    def _resume(self) -> None:
        path = resolve_resume(self.run.resume, self.out)
        if path is None:
            if self.run.resume == "none" and list_checkpoints(self.out):
                raise ValueError(
                    f"{self.out} already holds checkpoints of another run; continue it with run.resume=auto "
                    "or choose another run.output_dir"
                )
            return
        weights, state = load_checkpoint(path)
        if state["layout"] != self._layout():
            raise ValueError(
                f"cannot resume {path}: it was written with {state['layout']}, this run has {self._layout()} "
                "(keep batch_size x grad_accum x processes, iters_per_epoch and the length of the run)"
            )
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        if set(weights) != trainable:
            missing, extra = sorted(trainable - set(weights)), sorted(set(weights) - trainable)
            raise ValueError(
                f"cannot resume {path}: trainable parameters differ (missing {missing[:5]}, extra {extra[:5]})"
            )
        self.strategy.restore(path, self.model, self.optimizer, weights, state)
        self.strategy.load_state_dict(state["strategy"])
        restore_rng(state["rng"], self.strategy.device)
        self.step = state["position"]["step"]
        self.counters = dict(state["counters"])
        log.info("resumed from %s at step %d", path, self.step)

    def save_final(self) -> Path | None:
        """``OUTPUT/final``: the model for chat (``MiniGPT.from_pretrained``), trainable parts only."""
        self.strategy.barrier()
        model = self.strategy.final_model(self.model)  # on every process: a sharded strategy gathers here
        if not self.strategy.is_main:
            return None
        final = self.out / FINAL_DIR
        for leftover in self.out.glob(f".{FINAL_DIR}.*-*"):  # from a run killed while writing it
            shutil.rmtree(leftover, ignore_errors=True)
        import yaml

        with atomic_directory(final) as tmp:
            save_final_model(model, self.processor, tmp, lora=self.config.model.lora is not None)
            (tmp / "train_config.yaml").write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        log.info("final model written to %s", final)
        return final

    # -- helpers
    def _train_mode(self) -> None:
        self.model.train()  # frozen parts stay in eval mode
        if self.config.model.lora is not None or self.run.grad_checkpointing:
            self.model.llm.train()  # LoRA dropout and HF gradient checkpointing act in training mode only

    def _warn_skipped(self, micro: list[TrainBatch]) -> None:
        """Log each skipped sample once (a bad image is not reported again every epoch), up to a limit."""
        for s in (s for b in micro for s in b.skipped if s.origin not in self._warned):
            self._warned.add(s.origin)
            if len(self._warned) <= MAX_SKIP_WARNINGS:
                log.warning("skipped %s: %s", s.origin, s.reason)
            elif len(self._warned) == MAX_SKIP_WARNINGS + 1:
                log.warning("more samples skipped; metrics.jsonl counts them ('skipped')")

    def _rates(self, record: dict[str, Any], seconds: float) -> dict[str, Any]:
        seconds = max(seconds, 1e-9)
        return {
            "tokens_per_s": round(record["input_tokens"] / seconds, 1),
            "samples_per_s": round(record["samples"] / seconds, 2),
            "step_time": round(seconds, 4),
            "peak_mem_gib": _peak_memory(self.strategy.device),
        }


def save_final_model(model: Any, processor: MiniGPTProcessor, directory: Path, lora: bool = False) -> None:
    """``save_pretrained(trainable_only=True)`` and the processor. LoRA adapters are merged into the LLM, which is then
    saved whole; over a quantized LLM (QLoRA) the adapter is saved instead (``llm_adapter/``, peft's format) and the
    config records the unquantized base, so that nothing quantized is written."""
    include: tuple[str, ...] = ()
    if lora and is_quantized(model.llm):
        model.llm.save_pretrained(directory / ADAPTER_DIR)
    elif lora:
        model.llm = model.llm.merge_and_unload()
        include = ("llm",)
    model.save_pretrained(directory, trainable_only=True, include=include)
    processor.save_pretrained(directory)


__all__ = [
    "Trainer",
    "TrainResult",
    "Schedule",
    "build_model",
    "build_optimizer",
    "apply_lora",
    "seed_everything",
    "save_final_model",
    "run_step",
    "forward_backward",
    "step_inputs",
]
