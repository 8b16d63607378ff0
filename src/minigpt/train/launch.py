"""``train(config)``: the strategy and the trainer that ``run.strategy`` names, run to the end.

The one module that knows every strategy and trainer, so that none of them imports another's chooser:
``auto``/``single``/``ddp`` (:mod:`.strategy`), ``fsdp`` (:mod:`.fsdp`) and ``deepspeed_zero`` run :class:`~.loop.Trainer`;
``deepspeed_pipeline`` runs :class:`~.deepspeed.trainer.PipelineTrainer` (the engine does whole steps).
"""

from __future__ import annotations

import os

from .config import RunSection, TrainConfig, check_paths
from .deepspeed.pipeline import DeepSpeedPipeline
from .deepspeed.trainer import PipelineTrainer
from .deepspeed.zero import DeepSpeedZeRO
from .fsdp import FSDP
from .loop import Trainer, TrainResult
from .memory.check import check_memory
from .strategy import DDP, Strategy


def make_strategy(run: RunSection) -> Strategy:
    """``run.strategy``: ``auto`` is DDP when started by torchrun with more than one process, else single."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    name = run.strategy
    if name == "auto":
        name = "ddp" if world > 1 else "single"
    if name == "single":
        if world > 1:
            raise ValueError(f"run.strategy single, but {world} processes were started; use ddp")
        return Strategy(run.device, run.amp)
    if name == "ddp":
        return DDP(run.device, run.amp, run.find_unused_parameters)
    if name == "fsdp":
        return FSDP(run)
    if name == "deepspeed_pipeline":
        return DeepSpeedPipeline(run)
    if name == "deepspeed_zero":
        if run.deepspeed.pipeline_stages != 1:
            raise ValueError("run.deepspeed.pipeline_stages applies to run.strategy deepspeed_pipeline")
        return DeepSpeedZeRO(run)
    raise ValueError(f"unknown strategy {name!r}")


def train(config: TrainConfig, strategy: Strategy | None = None) -> TrainResult:
    """Run (or resume) the training ``config`` describes; returns the trained model and this run's records.
    Every path of the config is checked first (:func:`~.config.check_paths`), before anything is loaded."""
    check_paths(config)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    strategy = strategy or make_strategy(config.run)
    try:
        check_memory(config, strategy.device, strategy.world_size)  # before anything loads
        trainer = PipelineTrainer if config.run.strategy == "deepspeed_pipeline" else Trainer
        return trainer(config, strategy).fit()
    finally:
        strategy.close()


__all__ = ["train", "make_strategy"]
