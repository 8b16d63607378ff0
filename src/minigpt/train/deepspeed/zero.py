"""``run.strategy: deepspeed_zero``: ZeRO stage 1-3 under the ordinary loop of :class:`~minigpt.train.loop.Trainer`.

``deepspeed.initialize`` wraps the model and our AdamW (no DeepSpeed optimizer, so no JIT-compiled ``fused_adam``),
the loop's per-micro-batch loss weights stay as they are (``engine.backward(scale_wrt_gas=False)``), the
accumulation boundary is set per micro-batch and ``engine.step()`` runs once per optimizer step, clipping by
DeepSpeed's ``gradient_clipping`` (the loop's ``max_grad_norm``). ``zero_init`` builds a ZeRO-3 LLM already
partitioned (transformers' ``HfDeepSpeedConfig``: ``from_pretrained`` runs under ``zero.Init``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..strategy import cpu_copy
from .base import DeepSpeedStrategy, fp32_master
from .config import deepspeed_config

log = logging.getLogger(__name__)


class DeepSpeedZeRO(DeepSpeedStrategy):
    """ZeRO stage 1-3 under the ordinary loop (see the module docstring)."""

    name = "deepspeed_zero"

    def __init__(self, run: Any) -> None:
        super().__init__(run)
        self.ds_config = deepspeed_config(run, self.world_size, self.precision)
        self.stage = self.ds_config["zero_optimization"]["stage"]
        if run.deepspeed.zero_init and self.stage != 3:
            raise ValueError(f"run.deepspeed.zero_init needs ZeRO stage 3 (this run has {self.stage})")
        self._hf_config: Any = None
        log.info("DeepSpeed ZeRO-%d, %s, %d processes", self.stage, self.ds_precision, self.world_size)

    def model_init(self) -> contextlib.AbstractContextManager[Any]:
        if self.run.deepspeed.zero_init:
            # While this object lives, transformers' from_pretrained builds and loads the LLM under
            # deepspeed.zero.Init (each process holds its partition only). It stays for the run, as transformers
            # asks for it later too; the vision encoder and projector are built whole and partitioned by initialize.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_config = HfDeepSpeedConfig(self.ds_config)
        return contextlib.nullcontext()

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        from peft import PeftModel

        if self.stage == 3 and isinstance(getattr(model, "llm", None), PeftModel):
            raise ValueError("LoRA with ZeRO stage 3 is not supported; use stage 2 (LoRA weights are small)")
        self._model_config = model.config.to_dict()
        if self.run.deepspeed.zero_init and self.precision in (torch.bfloat16, torch.float16):
            cast_unpartitioned(model, self.precision)
        ds_optimizer = self._initialize(model, optimizer, self.ds_config)
        return self.engine, ds_optimizer

    @contextlib.contextmanager
    def accumulate(self, model: nn.Module, sync: bool) -> Iterator[None]:
        self.engine.set_gradient_accumulation_boundary(sync)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the loop already weights each micro-batch

    def step(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], max_norm: float | None) -> float:
        self.engine.step()  # clips to gradient_clipping (= run.max_grad_norm) and steps
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out = {n: fp32_master(p) for n, p in self.unwrap(model).named_parameters() if p.requires_grad}
        return out if self.is_main else {}

    def final_model(self, model: nn.Module) -> nn.Module:
        if self.stage < 3:
            return model  # whole on every process (in the training precision)
        from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # the CPU copy is built plainly, not under zero.Init
        try:
            return gather_zero3(model, self.is_main)
        finally:
            if self._hf_config is not None:
                set_hf_deepspeed_config(self._hf_config)


def cast_unpartitioned(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the parameters that ``zero.Init`` did not build (vision encoder, projector) to the training precision.

    DeepSpeed casts every parameter of a model built without ``zero.Init``, but none at all as soon as one is
    partitioned: the vision encoder and projector would stay float32 next to the bf16/fp16 LLM, and the ZeRO-3
    optimizer, which keeps the trained parameters in one flat buffer of one dtype, stops on a bare
    ``AssertionError`` (``defragment``). Buffers keep their dtype, as DeepSpeed leaves them."""
    for param in model.parameters():
        if not hasattr(param, "ds_id") and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def gather_zero3(model: Any, main: bool) -> Any:
    """A CPU copy of a ZeRO-3 partitioned MiniGPT on the main process (None elsewhere): every process takes part,
    one module's parameters at a time; trained parameters come as their fp32 master copies."""
    import deepspeed

    state: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        trained = {n: fp32_master(p) for n, p in own if p.requires_grad}
        with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=None):
            if main:
                for n, p in own:
                    state[f"{prefix}.{n}" if prefix else n] = trained.get(n, p.detach().cpu().clone())
    return cpu_copy(model, state) if main else None
