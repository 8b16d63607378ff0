"""How the loop's model, backward and optimizer step run: on one device or data-parallel (DDP).

The loop only calls the methods of :class:`Strategy`; it never looks at ranks or wrappers itself. The DeepSpeed
strategies (:mod:`minigpt.train.deepspeed`: ZeRO, pipeline) are other subclasses: their :meth:`prepare` calls
``deepspeed.initialize`` and their :meth:`backward` / :meth:`step` / :meth:`trainable_state` the engine's, which is
why those live here and not in the loop. :func:`minigpt.train.launch.make_strategy` picks one from
``run.strategy``. The device and the AMP dtype come from :mod:`minigpt.device`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ..device import amp_dtype, autocast, dist_backend, resolve_device, set_device
from .checkpoint import save_checkpoint

log = logging.getLogger(__name__)


class Strategy:
    """Single process, one device. Subclasses change how the model is wrapped and how results are combined."""

    name = "single"

    def __init__(self, device: str = "auto", amp: str = "auto") -> None:
        self.rank, self.world_size, self.local_rank = 0, 1, 0
        self.device = self._pick_device(device)
        self.amp_dtype = amp_dtype(self.device, {"bf16": "bfloat16", "fp16": "float16"}.get(amp, amp))
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None

    def _pick_device(self, name: str) -> torch.device:
        return resolve_device(name)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- model and optimizer
    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Wrap the (already on-device) model for training; returns what the loop calls forward on."""
        return model, optimizer

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def model_init(self) -> contextlib.AbstractContextManager[Any]:
        """Context the model is built in (DeepSpeed ZeRO-3 builds the LLM already partitioned)."""
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        return autocast(self.device, self.amp_dtype)

    @contextlib.contextmanager
    def accumulate(self, model: nn.Module, sync: bool) -> Iterator[None]:
        """Context for one micro-batch's forward + backward; ``sync`` is False except on the step's last one."""
        yield

    @property
    def collective_forward(self) -> bool:
        """Whether a forward pass is collective (FSDP gathers parameters): every process then runs as many."""
        return False

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], max_norm: float | None) -> float:
        """Unscale, clip (when ``max_norm``), step; returns the gradient norm before clipping."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        grads = [p for p in params if p.grad is not None]
        if max_norm:
            norm = torch.nn.utils.clip_grad_norm_(grads, max_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in grads]) if grads else torch.zeros(())
        if isinstance(norm, DTensor):  # the norm of sharded gradients (FSDP)
            norm = norm.full_tensor()
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        return float(norm)

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The parameters being trained, by name, on CPU: what a checkpoint stores. Called on every process (a
        sharded strategy gathers here); only the main process's result is written."""
        if not self.is_main:
            return {}
        return {n: p.detach().cpu() for n, p in self.unwrap(model).named_parameters() if p.requires_grad}

    # -- communication (no-ops on one process)
    def all_reduce(self, values: list[float]) -> list[float]:
        """Sum numbers over processes."""
        return list(values)

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass

    # -- checkpoints (a DeepSpeed strategy keeps weights and optimizer state in DeepSpeed's own files too)
    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's entry of ``state.pt``."""
        return optimizer.state_dict()

    def restore(
        self,
        path: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        weights: dict[str, torch.Tensor],
        state: dict[str, Any],
    ) -> None:
        """Load checkpoint ``path`` (its trainable weights and ``state.pt``) before :meth:`prepare`."""
        written = state.get("strategy") or {}
        for key, files in (("deepspeed", "DeepSpeed's files"), ("fsdp", "FSDP's per-process shards")):
            if key in written:
                raise ValueError(
                    f"cannot resume {path} with run.strategy {self.name}: its optimizer state is in {files}; "
                    "resume with the strategy that wrote it"
                )
        model.load_state_dict(weights, strict=False)
        optimizer.load_state_dict(state["optimizer"])

    def written_by(self, path: Path, state: dict[str, Any], key: str, writer: str) -> dict[str, Any]:
        """``state.pt``'s record of the strategy that wrote checkpoint ``path`` (``key``: ``deepspeed``, ``fsdp``);
        a checkpoint that ``writer`` did not write cannot resume with this strategy."""
        info = (state.get("strategy") or {}).get(key)
        if info is None:
            raise ValueError(
                f"cannot resume {path} with run.strategy {self.name}: it was not written by {writer} "
                "(resume it with the strategy that wrote it)"
            )
        return info

    def save_checkpoint(
        self,
        output_dir: Path,
        step: int,
        weights: dict[str, torch.Tensor],
        state: dict[str, Any],
        keep_last: int | None,
    ) -> Path | None:
        """Write checkpoint ``step`` (called on every process; the main one writes)."""
        return save_checkpoint(output_dir, step, weights, state, keep_last) if self.is_main else None

    def final_model(self, model: nn.Module) -> nn.Module:
        """The model ``OUTPUT/final`` is written from (called on every process; used on the main one)."""
        return model

    # -- resumable state
    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


class DDP(Strategy):
    """``torch.nn.parallel.DistributedDataParallel`` over the processes started by torchrun (env:// rendezvous)."""

    name = "ddp"

    def __init__(self, device: str = "auto", amp: str = "auto", find_unused_parameters: bool = False) -> None:
        self.find_unused_parameters = find_unused_parameters
        self._owns_group = False
        super().__init__(device, amp)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def _pick_device(self, name: str) -> torch.device:
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = resolve_device(name)
        if device.type != "cpu" and device.index is None:
            device = torch.device(device.type, self.local_rank)
            set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend=dist_backend(device))
            self._owns_group = True
        return device

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        ids = [self.device.index] if self.device.type != "cpu" and self.device.index is not None else None
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=ids, broadcast_buffers=False, find_unused_parameters=self.find_unused_parameters
        )
        return wrapped, optimizer

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    @contextlib.contextmanager
    def accumulate(self, model: nn.Module, sync: bool) -> Iterator[None]:
        if sync or not isinstance(model, nn.parallel.DistributedDataParallel):
            yield
        else:
            with model.no_sync():
                yield

    def all_reduce(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()


def cpu_copy(model: Any, state: dict[str, torch.Tensor]) -> Any:
    """A whole MiniGPT on the CPU like ``model`` (a sharded one), from ``state``: every parameter, full, by name
    (persistent buffers are taken from ``model``, where no strategy shards them)."""
    from transformers import AutoModelForCausalLM

    from ..model.minigpt import MiniGPT
    from ..model.projector import build_projector
    from ..model.vision import Blip2VisionEncoder

    params = {n for n, _ in model.named_parameters()}
    for name, value in model.state_dict(keep_vars=True).items():
        if name not in params and name not in state:
            state[name] = value.detach().cpu()
    config = model.config
    with torch.device("meta"):
        vision = Blip2VisionEncoder(config.vision)
        llm = AutoModelForCausalLM.from_config(model.llm.config, trust_remote_code=config.trust_remote_code)
        projector = build_projector(config.projector, vision.out_dim, llm.get_input_embeddings().embedding_dim)
    copy = MiniGPT(config, vision, projector, llm)
    copy.load_state_dict(state, strict=True, assign=True)
    llm.tie_weights()
    return copy


__all__ = ["Strategy", "DDP", "cpu_copy"]
