"""The pipeline's trainer: :class:`~minigpt.train.loop.Trainer`'s loop with DeepSpeed's pipeline engine doing each
step (``engine.train_batch``: a whole optimizer step, 1F1B schedule over the stages) and each evaluation.

``weight = grad_accum x data-parallel size / supervised tokens of the step`` (the second half of each micro-batch,
:func:`~.pipeline.pipe_batch`) turns DeepSpeed's mean over micro-batches and processes into the loop's
token-weighted mean: the loss a step reports is the same as with the other strategies.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..loop import Trainer, build_model, build_optimizer, build_processor
from .pipeline import DeepSpeedPipeline, pipe_batch


class PipelineTrainer(Trainer):
    """The loop of :class:`~minigpt.train.loop.Trainer` with DeepSpeed's pipeline engine doing each step
    (``engine.train_batch``) and each evaluation (``engine.eval_batch``)."""

    def __init__(self, config: Any, strategy: DeepSpeedPipeline) -> None:
        run, data = config.run, config.data
        problems = [
            what
            for what, bad in (
                ("model.lora", config.model.lora is not None),
                ("data.packing", getattr(data, "packing", False)),
                ("data.feature_cache", getattr(data, "feature_cache", None) is not None),
                ("run.compile", getattr(run, "compile", False)),
            )
            if bad
        ]
        if problems:
            raise ValueError(f"run.strategy deepspeed_pipeline does not support {', '.join(problems)}")
        self._begin(config, strategy)
        model = build_model(config.model, run.seed)  # whole and on the CPU; build() moves this stage's layers
        self.processor = build_processor(config.model, model)
        if getattr(run, "attn_implementation", "sdpa") != "sdpa":
            model.llm.set_attn_implementation(run.attn_implementation)
        self.model = model
        self.pipe = strategy.build(model)
        self.params = [p for p in self.pipe.parameters() if p.requires_grad]
        self._plan_data()
        self._ready(self.pipe, build_optimizer(self.pipe, run.optimizer))
        self.engine = strategy.engine
        self.image_size = model.config.vision.image_size

    def _pipe_inputs(self, batch: Any, weight: float) -> Any:
        return pipe_batch(batch, weight, self.image_size)

    def train_step(self, micro: list[Any]) -> dict[str, Any]:
        run, strategy = self.run, self.strategy
        record, tokens = self.begin_step(micro)
        if tokens == 0:
            return record
        # DeepSpeed averages the micro-batch losses over accumulation and data parallelism: this weight makes
        # that average the step's token-weighted mean (stand-in batches for all-skipped ones weigh 0).
        scale = run.grad_accum * strategy.world_size / tokens
        items = [
            self._pipe_inputs(self.data.example, 0.0) if b.empty else self._pipe_inputs(b.batch, scale) for b in micro
        ]
        loss = self.engine.train_batch(data_iter=iter(items))
        norm = self.engine.get_global_grad_norm()
        record.update(loss=float(loss), grad_norm=None if norm is None else float(norm))
        return record

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.eval_loader is None:
            return None
        strategy = self.strategy
        batches = [b for b in self.eval_loader]
        skipped = sum(len(b.skipped) for b in batches)
        kept = [b for b in batches if not (b.empty or b.num_tokens == 0)]
        tokens = sum(b.num_tokens for b in kept)
        n_max = int(max(self._all_max(len(kept)), 1))
        total_tokens, skipped = strategy.all_reduce([tokens, skipped])
        loss = float("nan")
        if total_tokens:
            scale = n_max * strategy.world_size / total_tokens
            items = [self._pipe_inputs(b.batch, scale) for b in kept]
            items += [self._pipe_inputs(self.data.example, 0.0)] * (n_max - len(kept))
            loss = float(self.engine.eval_batch(iter(items), num_micro_batches=n_max))
        self._evaluated_at = self.step
        self.reporter.log(
            {"step": self.step, "eval_loss": loss, "eval_tokens": int(total_tokens), "eval_skipped": int(skipped)}
        )
        return loss

    def _all_max(self, value: int) -> int:
        tensor = torch.tensor([value], dtype=torch.int64, device=self.strategy.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def _train_mode(self) -> None:
        self.model.train()
