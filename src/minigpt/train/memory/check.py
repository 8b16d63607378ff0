"""``minigpt train``'s memory check: the planner's prediction before anything loads, and a stop when the run cannot
fit the device.

``run.memory_check``: ``null`` (default) checks on accelerators only; ``true`` checks on CPU too, against the
RAM the system reports available (the plan counts tensors, not the process: treat it as a lower bound there);
``false`` (``--no-memory-check``) skips it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ...device import free_memory_bytes, is_accelerator
from .planner import human, job_from_config, plan_training

log = logging.getLogger(__name__)


class WontFit(ValueError):
    """The planned run does not fit the device (its message holds the planner's table)."""


def available_ram_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def device_capacity(device: torch.device) -> int | None:
    """Bytes the run may use on ``device``: the accelerator's free memory, or the available RAM on CPU."""
    return free_memory_bytes(device) if is_accelerator(device) else available_ram_bytes()


def check_memory(config: Any, device: torch.device, world_size: int = 1) -> None:
    """Log the predicted peak of ``config`` on ``device``; raise :class:`WontFit` with the table when it exceeds what
    the device has. Runs where ``run.memory_check`` asks (see the module doc); a model the planner cannot build (an
    LLM config it cannot open, remote code not trusted) is logged and passed."""
    wanted = config.run.memory_check
    if wanted is False or (wanted is None and not is_accelerator(device)):
        return
    try:
        plan = plan_training(job_from_config(config, is_accelerator(device), world_size))
    except Exception as err:  # noqa: BLE001 - a model the planner cannot build must not stop the run
        log.warning("memory plan skipped: %s: %s", type(err).__name__, err)
        return
    capacity = device_capacity(device)
    table = plan.table(f"predicted memory per device ({device}):")
    if capacity is not None and plan.total > capacity:
        raise WontFit(
            f"{table}\nthe run needs {human(plan.total)} but {device} has {human(capacity)} free; "
            "see `minigpt plan CONFIG --gpu GB` for settings that fit (micro-batch, run.grad_checkpointing, LoRA, "
            "ZeRO), or run anyway with --no-memory-check (run.memory_check=false)"
        )
    log.info("%s%s", table, f" of {human(capacity)} free" if capacity is not None else "")


__all__ = ["WontFit", "available_ram_bytes", "check_memory", "device_capacity"]
