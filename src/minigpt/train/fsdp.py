"""``run.strategy: fsdp``: PyTorch FSDP2 (``fully_shard``) under the ordinary loop of :class:`~.loop.Trainer`.

:meth:`FSDP.prepare` shards every LLM decoder layer, then the rest of the model (embeddings, final norm, head,
projector) as the root group; a vision encoder with nothing to train stays whole on every process (outside the
groups), a partly trained one is a group of its own. Frozen and trained parameters may share a group (FSDP2 reduces
the gradients there are). Parameters are gathered in ``run.amp``'s dtype and gradients reduced in fp32
(``MixedPrecisionPolicy``); ``run.fsdp.cpu_offload`` keeps the shards and the optimizer step on the CPU
(``CPUOffloadPolicy``). The optimizer built on the whole model is rebuilt over the sharded parameters.

Checkpoints: each process writes its shards of the trained parameters and of the optimizer state
(``checkpoints/fsdp/step_N/rank_R-of-W.pt``, loaded back with ``weights_only=True``); the step folder, which commits
them, also holds the gathered trained parameters (``trainable.safetensors``) for people and tools. Resuming needs
the same number of processes and restores each process's shards exactly. ``OUTPUT/final`` is a whole CPU copy
gathered on the main process, as other strategies write it.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..files import refuse_unsafe_pickle
from ..model.llm import decoder_layers
from .checkpoint import checkpoint_dir, prune_beside, save_checkpoint
from .strategy import DDP, cpu_copy

log = logging.getLogger(__name__)

FSDP_DIR = "fsdp"
FORMAT_VERSION = 1


class FSDP(DDP):
    """FSDP2 full sharding over the processes started by torchrun (see the module docstring)."""

    name = "fsdp"

    def __init__(self, run: Any) -> None:
        self.settings = run.fsdp
        self._resume_from: Path | None = None
        super().__init__(run.device, run.amp)
        if self.scaler is not None:
            raise ValueError("run.strategy fsdp trains in bf16 or fp32 (run.amp bf16 or no): no fp16 loss scaling")

    # -- model and optimizer
    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        names = {id(p): n for n, p in model.named_parameters()}
        options: dict[str, Any] = {
            "mp_policy": MixedPrecisionPolicy(
                param_dtype=self.amp_dtype,
                reduce_dtype=torch.float32 if self.amp_dtype is not None else None,
                cast_forward_inputs=False,  # the model casts its inputs itself
            ),
            "offload_policy": (
                CPUOffloadPolicy(pin_memory=self.device.type != "cpu") if self.settings.cpu_offload else OffloadPolicy()
            ),
            "reshard_after_forward": self.settings.reshard_after_forward,
        }
        vision = model.vision
        ignored = None
        if any(p.requires_grad for p in vision.parameters()):
            fully_shard(vision, **options)
        else:
            ignored = set(vision.parameters())  # frozen: whole on every process, no gathers
        for layer in decoder_layers(model.llm):
            fully_shard(layer, **options)
        fully_shard(model, ignored_params=ignored, **options)
        optimizer = rebuild_optimizer(optimizer, names, dict(model.named_parameters()))
        self._model, self._optimizer = model, optimizer  # what checkpoints save
        if self._resume_from is not None:
            self._load_shards(self._resume_from, model, optimizer)
        log.info(
            "FSDP over %d processes: %d decoder layers + root%s%s",
            self.world_size,
            len(decoder_layers(model.llm)),
            ", vision whole" if ignored else ", vision sharded",
            ", CPU offload" if self.settings.cpu_offload else "",
        )
        return model, optimizer

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    @contextlib.contextmanager
    def accumulate(self, model: nn.Module, sync: bool) -> Iterator[None]:
        if isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(sync)  # no reduce-scatter until the step's last micro-batch
        yield

    @property
    def collective_forward(self) -> bool:
        return True

    def step(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], max_norm: float | None) -> float:
        sharded = [p for g in optimizer.param_groups for p in g["params"]]  # ``params`` are the unsharded ones
        return super().step(optimizer, sharded, max_norm)

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                full = param.full_tensor() if isinstance(param, DTensor) else param  # collective
                if self.is_main:
                    out[name] = full.detach().cpu()
        return out

    def final_model(self, model: nn.Module) -> nn.Module:
        state = {}
        for name, param in model.named_parameters():
            full = param.full_tensor() if isinstance(param, DTensor) else param
            if self.is_main:
                state[name] = full.detach().cpu().clone()
        return cpu_copy(model, state) if self.is_main else model

    # -- checkpoints
    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {}  # in the per-process shard files

    def restore(
        self,
        path: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        weights: dict[str, torch.Tensor],
        state: dict[str, Any],
    ) -> None:
        info = self.written_by(path, state, "fsdp", "FSDP")
        if info["world_size"] != self.world_size:
            raise ValueError(
                f"cannot resume {path}: its FSDP shards were written by {info['world_size']} processes, "
                f"this run has {self.world_size}"
            )
        folder = path.parent / info["dir"]
        missing = [f.name for f in shard_files(folder, self.world_size) if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"cannot resume {path}: FSDP shard files {missing} are missing in {folder}")
        self._resume_from = folder  # loaded by prepare(), once the model is sharded

    def save_checkpoint(
        self,
        output_dir: Path,
        step: int,
        weights: dict[str, torch.Tensor],
        state: dict[str, Any],
        keep_last: int | None,
    ) -> Path | None:
        folder = checkpoint_dir(output_dir) / FSDP_DIR / f"step_{step:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        target = shard_files(folder, self.world_size)[self.rank]
        tmp = target.with_name(f".tmp-{target.name}")
        torch.save(self._shards(), tmp)
        os.replace(tmp, target)
        dist.barrier()  # every process's shards are written before the step folder commits them
        path = None
        if self.is_main:
            info = {"dir": f"{FSDP_DIR}/{folder.name}", "world_size": self.world_size}
            state = {**state, "strategy": {**state["strategy"], "fsdp": info}}
            path = save_checkpoint(output_dir, step, weights, state, keep_last)
            prune_beside(output_dir, FSDP_DIR, lambda s: f"step_{s:08d}")
        dist.barrier()
        return path

    def _shards(self) -> dict[str, Any]:
        """This process's part of the trained parameters and of the optimizer state, as plain local tensors."""
        model, optimizer = self._model, self._optimizer
        optim = optimizer.state_dict()
        optim["state"] = {i: {k: _local(v) for k, v in s.items()} for i, s in optim["state"].items()}
        params = {n: _local(p.detach()) for n, p in model.named_parameters() if p.requires_grad}
        return {"format_version": FORMAT_VERSION, "rank": self.rank, "params": params, "optimizer": optim}

    def _load_shards(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        path = shard_files(folder, self.world_size)[self.rank]
        with refuse_unsafe_pickle(path, "minigpt never writes such a file: resume from a checkpoint you trust."):
            saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("format_version") != FORMAT_VERSION or saved.get("rank") != self.rank:
            raise ValueError(f"{path}: not FSDP shard file {self.rank} of format {FORMAT_VERSION}")
        trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if set(saved["params"]) != set(trained):
            raise ValueError(f"{path}: its parameters differ from this run's trained ones")
        with torch.no_grad():
            for name, param in trained.items():
                _local(param).copy_(saved["params"][name])
        params = [p for g in optimizer.param_groups for p in g["params"]]
        optim = saved["optimizer"]
        optim["state"] = {i: {k: _like(v, params[i]) for k, v in s.items()} for i, s in optim["state"].items()}
        optimizer.load_state_dict(optim)
        log.info("FSDP shards restored from %s", path)


def shard_files(folder: Path, world_size: int) -> list[Path]:
    return [folder / f"rank_{r:05d}-of-{world_size:05d}.pt" for r in range(world_size)]


def rebuild_optimizer(
    optimizer: torch.optim.Optimizer, names: dict[int, str], params: dict[str, nn.Parameter]
) -> torch.optim.Optimizer:
    """The same optimizer (class, groups, settings; no state yet) over ``params``, the sharded parameters by the
    names (``names``: by ``id``) the old ones had."""
    groups = [{**g, "params": [params[names[id(p)]] for p in g["params"]]} for g in optimizer.param_groups]
    accepted = inspect.signature(type(optimizer)).parameters
    settings = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    try:
        return type(optimizer)(groups, **settings)
    except RuntimeError:  # e.g. no fused kernel for sharded parameters on this device
        return type(optimizer)(groups, **{**settings, "fused": None})


def _local(value: Any) -> Any:
    return value.to_local() if isinstance(value, DTensor) else value


def _like(value: Any, param: nn.Parameter) -> Any:
    """An optimizer state entry saved as a local shard, as a DTensor sharded like ``param`` (scalars as they are)."""
    if not isinstance(param, DTensor) or not isinstance(value, torch.Tensor) or value.shape != param.to_local().shape:
        return value
    local = value.to(param.to_local().device)
    return DTensor.from_local(
        local, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )


__all__ = ["FSDP", "shard_files", "rebuild_optimizer"]
