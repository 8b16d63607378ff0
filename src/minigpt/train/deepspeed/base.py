"""What both DeepSpeed strategies share: devices, process set-up, precision, reductions, and DeepSpeed's
checkpoint files written next to ours (and loaded back on resume)."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ...device import resolve_device, set_device
from ...model.deepspeed_names import CONFIG_KEY, DS_DIR
from ..checkpoint import checkpoint_dir, prune_beside, save_checkpoint
from ..strategy import Strategy
from .config import init_deepspeed, offloads_optimizer

log = logging.getLogger(__name__)


class DeepSpeedStrategy(Strategy):
    """What both DeepSpeed strategies share: process set-up, precision, reductions and checkpoints."""

    def __init__(self, run: Any) -> None:
        self.run = run
        self._owns_group = False
        self.engine: Any = None
        self._resume_from: tuple[Path, str] | None = None
        self._model_config: dict[str, Any] | None = None
        super().__init__(run.device, run.amp)
        #: The precision DeepSpeed trains in (bf16/fp16 weights + fp32 masters); no autocast on top.
        self.precision = self.amp_dtype
        self.amp_dtype, self.scaler = None, None
        self.global_rank, self.global_world = dist.get_rank(), dist.get_world_size()
        self.rank, self.world_size = self.global_rank, self.global_world  # data parallelism (pipeline: per stage)

    def _pick_device(self, name: str) -> torch.device:
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = resolve_device(name)
        os.environ.setdefault("DS_ACCELERATOR", device.type)  # only read when deepspeed picks its accelerator
        from deepspeed.accelerator import get_accelerator

        kind = get_accelerator().device_name()
        if kind != device.type:
            raise ValueError(
                f"DeepSpeed uses the {kind} accelerator but run.device is {name!r} ({device.type}): "
                f"set DS_ACCELERATOR={device.type} (before the process starts) or change run.device"
            )
        if device.type != "cpu" and device.index is None:
            device = torch.device(device.type, self.local_rank)
        if device.type != "cpu":
            set_device(device)
        self._owns_group = init_deepspeed(device)
        return device

    @property
    def ds_precision(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.precision, "fp32")  # type: ignore[call-overload]

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # DeepSpeed casts the module itself

    def unwrap(self, model: nn.Module) -> nn.Module:
        return getattr(model, "module", model) if self.engine is not None and model is self.engine else model

    def _group(self) -> Any:
        return None

    def all_reduce(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, group=self._group())
        return tensor.tolist()

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            import deepspeed.comm

            deepspeed.comm.destroy_process_group()

    def _initialize(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any]) -> Any:
        import deepspeed

        if offloads_optimizer(config):
            optimizer = cpu_adam(optimizer)
        self.engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        if self._resume_from is not None:
            folder, tag = self._resume_from
            loaded, _ = self.engine.load_checkpoint(
                str(folder),
                tag=tag,
                load_module_strict=False,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
            if loaded is None:
                raise FileNotFoundError(f"DeepSpeed could not load {folder / tag}")
            log.info("DeepSpeed state restored from %s", folder / tag)
        return ds_optimizer

    # -- checkpoints
    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {}  # in DeepSpeed's files (partitioned)

    def _layout(self) -> dict[str, Any]:
        return {"mode": self.name, "processes": self.global_world}

    def restore(
        self,
        path: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        weights: dict[str, torch.Tensor],
        state: dict[str, Any],
    ) -> None:
        info = self.written_by(path, state, "deepspeed", "a DeepSpeed strategy")
        if info.get("layout") != self._layout():
            raise ValueError(
                f"cannot resume {path}: its DeepSpeed files were written with {info.get('layout')}, "
                f"this run has {self._layout()}"
            )
        folder = path.parent / info["dir"]
        if not (folder / info["tag"]).is_dir():
            raise FileNotFoundError(f"cannot resume {path}: its DeepSpeed files {folder / info['tag']} are missing")
        self._resume_from = (folder, info["tag"])  # loaded into the engine by prepare()

    def save_checkpoint(
        self,
        output_dir: Path,
        step: int,
        weights: dict[str, torch.Tensor],
        state: dict[str, Any],
        keep_last: int | None,
    ) -> Path | None:
        root = checkpoint_dir(output_dir)
        tag = f"global_step{step}"
        self.engine.save_checkpoint(
            str(root / DS_DIR), tag=tag, client_state={CONFIG_KEY: self._model_config}, exclude_frozen_parameters=True
        )
        dist.barrier()  # every process's files are written before the step folder commits them
        path = None
        if self.is_main:
            info = {"dir": DS_DIR, "tag": tag, "layout": self._layout(), "precision": self.ds_precision}
            state = {**state, "strategy": {**state["strategy"], "deepspeed": info}}
            path = save_checkpoint(output_dir, step, weights, state, keep_last)
            prune_beside(output_dir, DS_DIR, lambda s: f"global_step{s}")
        dist.barrier()
        return path


def cpu_adam(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Our AdamW as DeepSpeed's CPU Adam (ZeRO-Offload wants it; its C++ op compiles on first use)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    first = optimizer.param_groups[0]
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
    return DeepSpeedCPUAdam(groups, lr=first["lr"], betas=first["betas"], eps=first["eps"], adamw_mode=True)


def fp32_master(param: nn.Parameter) -> torch.Tensor:
    """The fp32 master copy of a trained parameter where DeepSpeed keeps one (collective over data parallelism)."""
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(param)
    return (param if full is None else full).detach().cpu()
