"""DeepSpeed: ZeRO data parallelism and an MPP-Qwen14B-style pipeline, as training strategies.

- :mod:`.config`: the DeepSpeed config from the run, and the process set-up (gloo / NCCL + DeepSpeed's comm).
- :mod:`.base`: what both strategies share: devices, reductions, DeepSpeed's checkpoints next to ours.
- :mod:`.zero`: ``run.strategy: deepspeed_zero`` (:class:`~.zero.DeepSpeedZeRO`) under the ordinary loop.
- :mod:`.pipeline`: the model cut into pipeline layers, and ``run.strategy: deepspeed_pipeline``
  (:class:`~.pipeline.DeepSpeedPipeline`).
- :mod:`.trainer`: :class:`~.trainer.PipelineTrainer`, the loop with the pipeline engine doing each step.

:func:`minigpt.train.launch.train` picks the strategy and the trainer from ``run.strategy``. The names found in the
checkpoints (folder, client-state key, pipeline layer keys) are in :mod:`minigpt.model.deepspeed_names`, which
:mod:`minigpt.convert.deepspeed` reads too.

Checkpoints (both modes): our ``OUTPUT/checkpoints/step_N/`` (``trainable.safetensors``: the trained parameters by
MiniGPT name, fp32 master copies where DeepSpeed keeps them; ``state.pt``: schedule, RNG, data position, counters and
``strategy.deepspeed = {dir, tag, mode, ...}``; ``meta.json``) plus DeepSpeed's own files from
``engine.save_checkpoint(OUTPUT/checkpoints/deepspeed, tag="global_stepN", client_state={"minigpt_config": ...},
exclude_frozen_parameters=True)``, written first: a ``step_N`` folder exists only once its DeepSpeed files are
complete, and resuming loads them (weights, fp32 masters, optimizer moments, loss scale) after ``initialize``.
DeepSpeed tags of checkpoints dropped by ``keep_last`` are deleted. ``minigpt convert deepspeed
OUTPUT/checkpoints/deepspeed`` turns the DeepSpeed files into a model directory.

CPU: DeepSpeed's CPU accelerator and gloo work (``DS_ACCELERATOR=cpu``); :func:`~.config.init_deepspeed` keeps
DeepSpeed from JIT-compiling its shared-memory all-reduce op (used by tensor-parallel inference only), which saves
~30 s per fresh extension cache (``MINIGPT_DS_SHM_COMM=1`` keeps DeepSpeed's default).
"""
