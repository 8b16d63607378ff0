"""The DeepSpeed config of a run, and the process set-up both DeepSpeed strategies start with."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ...device import dist_backend

log = logging.getLogger(__name__)


def deepspeed_config(
    run: Any, dp_world_size: int, precision: torch.dtype | None, pipeline: bool = False
) -> dict[str, Any]:
    """The DeepSpeed config of ``run``: ``run.deepspeed.config`` (JSON) with batch size, accumulation, clipping,
    precision and ZeRO stage set from the run (a JSON value that contradicts the run is an error)."""
    section = run.deepspeed
    source = section.config or "run.deepspeed"
    base: dict[str, Any] = {}
    if section.config:
        try:
            base = json.loads(Path(section.config).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"run.deepspeed.config: {section.config} not found") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{section.config}: invalid JSON: {err}") from None
    for key in ("optimizer", "scheduler"):
        if key in base:
            raise ValueError(
                f"{source}: remove {key!r}; the optimizer and the schedule come from run.optimizer and run.schedule"
            )
    cfg = dict(base)
    ours = {
        "train_micro_batch_size_per_gpu": run.batch_size,
        "gradient_accumulation_steps": run.grad_accum,
        "train_batch_size": run.batch_size * run.grad_accum * dp_world_size,
        "gradient_clipping": float(run.max_grad_norm or 0.0),
    }
    for key, value in ours.items():
        given = base.get(key, "auto")
        if given != "auto" and given != value:
            raise ValueError(
                f"{source}: {key} is {given!r}, but the run gives {value!r} (run.batch_size, "
                'run.grad_accum, run.max_grad_norm, processes); leave it out or set it to "auto"'
            )
        cfg[key] = value
    wanted = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(precision)  # type: ignore[call-overload]
    for key in ("bf16", "fp16"):
        sub = dict(base.get(key) or {})
        enabled = sub.get("enabled", "auto")
        if enabled != "auto" and bool(enabled) != (key == wanted):
            raise ValueError(f"{source}: {key}.enabled is {enabled}, but run.amp gives {wanted or 'fp32'}")
        sub["enabled"] = key == wanted
        cfg[key] = sub
    zero = dict(base.get("zero_optimization") or {})
    stage = section.zero_stage if section.zero_stage is not None else zero.get("stage", 1 if pipeline else 2)
    if pipeline and stage > 1:
        raise ValueError(f"{source}: DeepSpeed pipelines allow ZeRO stage 0 or 1, not {stage}")
    zero["stage"] = stage
    cfg["zero_optimization"] = zero
    cfg.setdefault("steps_per_print", 2**31 - 1)  # no DeepSpeed progress lines: the Reporter logs
    cfg.setdefault("wall_clock_breakdown", False)
    if pipeline:
        pipe = dict(base.get("pipeline") or {})
        if run.grad_checkpointing:
            pipe.setdefault("activation_checkpoint_interval", 1)
        pipe.setdefault("use_reentrant", False)
        cfg["pipeline"] = pipe
    return cfg


def offloads_optimizer(ds_config: dict[str, Any]) -> bool:
    device = ((ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device", "none")
    return device not in (None, "none")


# ---------------------------------------------------------------------------------------------- process set-up


def skip_shm_comm() -> None:
    """Keep DeepSpeed's TorchBackend from JIT-compiling its shared-memory all-reduce op on CPU (~30 s of C++ per
    fresh extension cache). DeepSpeed builds it when ``deepspeed.ops.__compatible_ops__`` says it is compatible;
    the op serves ``inference_all_reduce`` (tensor-parallel inference) only, which training never calls. The
    mapping is cached in that module for this purpose; set ``MINIGPT_DS_SHM_COMM=1`` to keep DeepSpeed's choice."""
    if os.environ.get("MINIGPT_DS_SHM_COMM") == "1":
        return
    import deepspeed.ops

    compatible = deepspeed.ops.__dict__.get("__compatible_ops__")
    if compatible is None:  # not probed yet (probing starts compilers): only comm/torch.py reads it, with .get
        compatible = deepspeed.ops.__dict__["__compatible_ops__"] = {}
    compatible["deepspeed_shm_comm"] = False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_deepspeed(device: torch.device) -> bool:
    """torch.distributed (torchrun's / the deepspeed launcher's env://, or a one-process group when started
    plainly) plus DeepSpeed's comm layer on top. Returns whether this call created the process group."""
    import deepspeed

    skip_shm_comm()
    owns = False
    if not dist.is_initialized():
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend=dist_backend(device))
        else:
            dist.init_process_group(
                backend=dist_backend(device), init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
            )
        owns = True
    os.environ.setdefault("LOCAL_RANK", "0")  # PipelineModule and the engine read it
    deepspeed.init_distributed(dist_backend=dist_backend(device))
    if not log.isEnabledFor(logging.DEBUG):
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    return owns
