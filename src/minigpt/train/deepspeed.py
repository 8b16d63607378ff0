"""DeepSpeed: ZeRO data parallelism and an MPP-Qwen14B-style pipeline, as training strategies.

``run.strategy: deepspeed_zero`` (:class:`DeepSpeedZeRO`) runs the ordinary loop of :class:`~.loop.Trainer`:
``deepspeed.initialize`` wraps the model and our AdamW (no DeepSpeed optimizer, so no JIT-compiled ``fused_adam``),
the loop's per-micro-batch loss weights stay as they are (``engine.backward(scale_wrt_gas=False)``), the
accumulation boundary is set per micro-batch and ``engine.step()`` runs once per optimizer step, clipping by
DeepSpeed's ``gradient_clipping`` (the loop's ``max_grad_norm``). ZeRO stage 1-3; ``zero_init`` builds a ZeRO-3
LLM already partitioned (transformers' ``HfDeepSpeedConfig``: ``from_pretrained`` runs under ``zero.Init``).

``run.strategy: deepspeed_pipeline`` (:class:`DeepSpeedPipeline`, :class:`PipelineTrainer`) cuts the model into
pipeline layers (:func:`pipeline_layers`, :func:`build_pipeline`), as MPP-Qwen14B does:

=========  ===============================================  =====================================================
layer      module (state-dict keys in its layer file)       computes
=========  ===============================================  =====================================================
0          :class:`PipeHead`: ``vision.*`` (ours),           ``MiniGPT.embed``: token embeddings with the
           ``visionpipe.llm_proj.*``,                        projected visual tokens written into the image slots
           ``wtepipe.word_embeddings.weight``
1..k       identity (``identity_layers``, no file)           nothing (MPP: 4, to lighten stage 0 under uniform)
k+1+j      :class:`PipeBlock`: ``layer.*`` = LLM block j     causal mask + rotary embeddings from the positions,
                                                             then the HF decoder layer
last       :class:`PipeTail`: ``final_layernorm.weight``,   final norm; :class:`AnswerLoss` applies ``lm_head``
           ``lm_head.weight``                                at the supervised positions only (``_answer_loss``)
=========  ===============================================  =====================================================

A stage without both a trained matrix and a trained vector (e.g. a frozen LLM's) gets ``occupy.{weight,bias}`` (a
zero Linear(1, 1)) in its last layer, as MPP-Qwen14B's ``occupy`` layer. Every process builds the whole model on the
CPU and moves its stage's layers to its device. Parameters are marked model-parallel so that DeepSpeed's gradient
norm (clipping, ``grad_norm``) covers all stages. Default ZeRO stage 1 (0 allowed); LoRA, packing, the feature cache
and ``run.compile`` are not supported here; LLaMA-style LLMs only (LLaMA, Mistral, Qwen2/2.5/3).

The engine's ``train_batch`` runs a whole optimizer step (1F1B schedule over the stages), so the pipeline has its
own :class:`PipelineTrainer` (a :class:`~.loop.Trainer` with its own set-up, ``train_step`` and ``evaluate``).
The micro-batch tuple (:func:`pipe_batch`) is ``((input_ids, attention_mask, image_mask, pixel_values), (labels,
weight))``: stage 0 reads the first half, the last stage the second; ``weight = grad_accum x data-parallel size /
supervised tokens of the step`` turns DeepSpeed's mean over micro-batches and processes into the loop's
token-weighted mean (the loss a step reports is the same as with the other strategies).

Checkpoints (both modes): our ``OUTPUT/checkpoints/step_N/`` (``trainable.safetensors``: the trained parameters by
MiniGPT name, fp32 master copies where DeepSpeed keeps them; ``state.pt``: schedule, RNG, data position, counters and
``strategy.deepspeed = {dir, tag, mode, ...}``; ``meta.json``) plus DeepSpeed's own files from
``engine.save_checkpoint(OUTPUT/checkpoints/deepspeed, tag="global_stepN", client_state={"minigpt_config": ...},
exclude_frozen_parameters=True)``, written first: a ``step_N`` folder exists only once its DeepSpeed files are
complete, and resuming loads them (weights, fp32 masters, optimizer moments, loss scale) after ``initialize``.
DeepSpeed tags of checkpoints dropped by ``keep_last`` are deleted. ``minigpt convert deepspeed
OUTPUT/checkpoints/deepspeed`` turns the DeepSpeed files into a model directory.

CPU: DeepSpeed's CPU accelerator and gloo work (``DS_ACCELERATOR=cpu``); :func:`init_deepspeed` keeps DeepSpeed from
JIT-compiling its shared-memory all-reduce op (used by tensor-parallel inference only), which saves ~30 s per fresh
extension cache (``MINIGPT_DS_SHM_COMM=1`` keeps DeepSpeed's default).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..device import dist_backend, resolve_device, set_device
from .checkpoint import checkpoint_dir, list_checkpoints, save_checkpoint
from .loop import Trainer, build_model, build_optimizer, build_processor
from .strategy import Strategy

log = logging.getLogger(__name__)

#: DeepSpeed's save_dir inside ``OUTPUT/checkpoints``: ``latest`` and ``global_stepN/``.
DS_DIR = "deepspeed"
#: The client_state key holding ``MiniGPTConfig.to_dict()`` (read by :mod:`minigpt.convert.deepspeed`).
CONFIG_KEY = "minigpt_config"
PIPELINE_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


# ---------------------------------------------------------------------------------------------- config


def deepspeed_config(run: Any, dp_world_size: int, precision: torch.dtype | None, pipeline: bool = False) -> dict[str, Any]:
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
            raise ValueError(f"{source}: remove {key!r}; the optimizer and the schedule come from run.optimizer "
                             "and run.schedule")
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
            raise ValueError(f"{source}: {key} is {given!r}, but the run gives {value!r} (run.batch_size, "
                             "run.grad_accum, run.max_grad_norm, processes); leave it out or set it to \"auto\"")
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
            dist.init_process_group(backend=dist_backend(device), init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1)
        owns = True
    os.environ.setdefault("LOCAL_RANK", "0")  # PipelineModule and the engine read it
    deepspeed.init_distributed(dist_backend=dist_backend(device))
    if not log.isEnabledFor(logging.DEBUG):
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    return owns


# ---------------------------------------------------------------------------------------------- common base


class _DeepSpeed(Strategy):
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
            raise ValueError(f"DeepSpeed uses the {kind} accelerator but run.device is {name!r} ({device.type}): "
                             f"set DS_ACCELERATOR={device.type} (before the process starts) or change run.device")
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
                str(folder), tag=tag, load_module_strict=False, load_optimizer_states=True,
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

    def restore(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                weights: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        info = (state.get("strategy") or {}).get("deepspeed")
        if info is None:
            raise ValueError(f"cannot resume {path} with run.strategy {self.name}: it was not written by a DeepSpeed "
                             "strategy (resume it with the strategy that wrote it)")
        if info.get("layout") != self._layout():
            raise ValueError(f"cannot resume {path}: its DeepSpeed files were written with {info.get('layout')}, "
                             f"this run has {self._layout()}")
        folder = path.parent / info["dir"]
        if not (folder / info["tag"]).is_dir():
            raise FileNotFoundError(f"cannot resume {path}: its DeepSpeed files {folder / info['tag']} are missing")
        self._resume_from = (folder, info["tag"])  # loaded into the engine by prepare()

    def save_checkpoint(self, output_dir: Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any],
                        keep_last: int | None) -> Path | None:
        root = checkpoint_dir(output_dir)
        tag = f"global_step{step}"
        self.engine.save_checkpoint(str(root / DS_DIR), tag=tag, client_state={CONFIG_KEY: self._model_config},
                                    exclude_frozen_parameters=True)
        dist.barrier()  # every process's files are written before the step folder commits them
        path = None
        if self.is_main:
            info = {"dir": DS_DIR, "tag": tag, "layout": self._layout(), "precision": self.ds_precision}
            state = {**state, "strategy": {**state["strategy"], "deepspeed": info}}
            path = save_checkpoint(output_dir, step, weights, state, keep_last)
            kept = {f"global_step{int(p.name.removeprefix('step_'))}" for p in list_checkpoints(output_dir)}
            for old in (root / DS_DIR).glob("global_step*"):
                if old.is_dir() and old.name not in kept:
                    shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return path


def cpu_adam(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Our AdamW as DeepSpeed's CPU Adam (ZeRO-Offload wants it; its C++ op compiles on first use)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    first = optimizer.param_groups[0]
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
    return DeepSpeedCPUAdam(groups, lr=first["lr"], betas=first["betas"], eps=first["eps"], adamw_mode=True)


def _fp32(param: nn.Parameter) -> torch.Tensor:
    """The fp32 master copy of a trained parameter where DeepSpeed keeps one (collective over data parallelism)."""
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(param)
    return (param if full is None else full).detach().cpu()


# ---------------------------------------------------------------------------------------------- ZeRO


class DeepSpeedZeRO(_DeepSpeed):
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
        out = {n: _fp32(p) for n, p in self.unwrap(model).named_parameters() if p.requires_grad}
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


def gather_zero3(model: Any, main: bool) -> Any:
    """A CPU copy of a ZeRO-3 partitioned MiniGPT on the main process (None elsewhere): every process takes part,
    one module's parameters at a time; trained parameters come as their fp32 master copies."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    from ..model.minigpt import MiniGPT
    from ..model.projector import build_projector
    from ..model.vision import Blip2VisionEncoder

    state: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        trained = {n: _fp32(p) for n, p in own if p.requires_grad}
        with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=None):
            if main:
                for n, p in own:
                    state[f"{prefix}.{n}" if prefix else n] = trained.get(n, p.detach().cpu().clone())
    if not main:
        return None
    params = {n for n, _ in model.named_parameters()}
    for name, value in model.state_dict(keep_vars=True).items():
        if name not in params and name not in state:
            state[name] = value.detach().cpu()  # persistent buffers (not partitioned)
    config = model.config
    with torch.device("meta"):
        vision = Blip2VisionEncoder(config.vision)
        llm = AutoModelForCausalLM.from_config(model.llm.config, trust_remote_code=config.trust_remote_code)
        projector = build_projector(config.projector, vision.out_dim, llm.get_input_embeddings().embedding_dim)
    copy = MiniGPT(config, vision, projector, llm)
    copy.load_state_dict(state, strict=True, assign=True)
    llm.tie_weights()
    return copy


# ---------------------------------------------------------------------------------------------- pipeline layers


def _llm_parts(model: Any) -> tuple[Any, Any]:
    """(decoder body, LM) of a MiniGPT whose LLM the pipeline knows how to cut."""
    llm = model.llm
    family = getattr(llm.config, "model_type", "")
    body = getattr(llm, "model", None)
    if family not in PIPELINE_FAMILIES or not all(hasattr(body, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        raise ValueError(f"the pipeline cuts LLaMA-style LLMs ({', '.join(PIPELINE_FAMILIES)}: model.embed_tokens, "
                         f"model.layers, model.norm, lm_head); got {type(llm).__name__} ({family or 'unknown'}) "
                         "(a LoRA-wrapped LLM is not supported either)")
    return body, llm


class _PipeLayer(nn.Module):
    """A pipeline layer made of a MiniGPT's own modules: ``train()`` defers to the MiniGPT so that frozen parts
    stay in eval mode (DeepSpeed calls ``module.train()`` before every batch)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self._owner = [model]  # a list: not registered as a submodule

    def train(self, mode: bool = True) -> "_PipeLayer":
        super().train(mode)
        self._owner[0].train(mode)
        return self

    def occupy_stage(self, device: torch.device) -> None:
        """Give this layer a trained ``occupy`` Linear(1, 1) that takes part in its forward with weight 0 (so it
        always has a gradient, of 0). Every stage's optimizer needs a matrix and a vector (its two parameter groups:
        DeepSpeed's ZeRO-1 gradient norm runs one collective per group); MPP-Qwen14B adds a 1000x1000 ``occupy``
        layer for the same reason when the LLM is frozen."""
        self.occupy = nn.Linear(1, 1, device=device)
        nn.init.zeros_(self.occupy.weight)
        nn.init.zeros_(self.occupy.bias)

    def _occupied(self, x: torch.Tensor) -> torch.Tensor:
        occupy = getattr(self, "occupy", None)
        return x if occupy is None else x + ((occupy.weight.sum() + occupy.bias.sum()) * 0).to(x.dtype)


class PipeHead(_PipeLayer):
    """Layer 0 (MPP: ViT + ln_vision + Q-Former + query tokens + llm_proj + word embeddings): ``(input_ids,
    attention_mask, image_mask, pixel_values)`` -> ``(embeddings with the visual tokens, attention_mask)``."""

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self.vision = model.vision
        self.visionpipe = nn.Module()
        self.visionpipe.llm_proj = model.projector
        self.wtepipe = nn.Module()
        self.wtepipe.word_embeddings = model.llm.get_input_embeddings()

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        from ..data.tokenize import ModelBatch, TextBatch

        input_ids, attention_mask, image_mask, pixel_values = inputs
        text = TextBatch(input_ids, attention_mask, None, image_mask.bool())  # type: ignore[arg-type]
        embeds = self._owner[0].embed(ModelBatch(text, pixel_values if pixel_values.numel() else None))
        if not embeds.requires_grad:  # nothing before the LLM trains: still a tensor the engine can backward into
            embeds = embeds.detach().requires_grad_()
        return self._occupied(embeds), attention_mask


class PipeBlock(_PipeLayer):
    """One LLM decoder layer (``layer.*``); the causal mask and the rotary embeddings are computed here from the
    attention mask and the positions (0..T-1), exactly as the HF model body does before its layers."""

    def __init__(self, model: Any, index: int) -> None:
        super().__init__(model)
        body, llm = _llm_parts(model)
        self.layer = body.layers[index]
        self.rotary = body.rotary_emb  # no state-dict entries (inv_freq is not persistent)
        types = getattr(llm.config, "layer_types", None)
        self.attention_type = types[index] if types else "full_attention"
        self._config = llm.config

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, attention_mask = inputs
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = causal_mask(self._config, hidden, attention_mask, positions, self.attention_type)
        out = self.layer(hidden, attention_mask=mask, position_ids=positions,
                         position_embeddings=self.rotary(hidden, positions))
        return self._occupied(out[0] if isinstance(out, tuple) else out), attention_mask


def causal_mask(config: Any, embeds: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
                attention_type: str = "full_attention") -> Any:
    """The mask the HF model body builds for its layers (transformers 5 and 4.5x signatures)."""
    import inspect

    from transformers import masking_utils

    make = (masking_utils.create_sliding_window_causal_mask if attention_type == "sliding_attention"
            else masking_utils.create_causal_mask)
    if "inputs_embeds" in inspect.signature(make).parameters:
        return make(config=config, inputs_embeds=embeds, attention_mask=attention_mask, cache=None,
                    position_ids=positions)
    return make(config=config, input_embeds=embeds, attention_mask=attention_mask,  # transformers 4.5x
                cache_position=positions[0], past_key_values=None, position_ids=positions)


class PipeTail(_PipeLayer):
    """The last layer: the final norm (``final_layernorm``) and the LM head (``lm_head``, applied by
    :class:`AnswerLoss` at the supervised positions only)."""

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        body, llm = _llm_parts(model)
        self.final_layernorm = body.norm
        self.lm_head = llm.get_output_embeddings()

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self._occupied(self.final_layernorm(inputs[0]))


class AnswerLoss:
    """``loss_fn(hidden, (labels, weight))``: the summed answer-token cross-entropy (MiniGPT's ``_answer_loss``,
    LM head at the supervised positions) times ``weight``."""

    def __init__(self, model: Any) -> None:
        self._owner = model

    def __call__(self, hidden: torch.Tensor, labels: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        targets, weight = labels
        out = self._owner._answer_loss(hidden, targets)
        return out.loss * out.num_tokens * weight.to(out.loss.dtype)


def identity_layer(inputs: Any) -> Any:
    """A parameter-free pipeline layer (MPP-Qwen14B's layers 1-4)."""
    return inputs


def pipeline_layers(model: Any, identity_layers: int = 0) -> list[Any]:
    """The MiniGPT as a list of pipeline layers (head, identities, one per LLM block, tail); run one after the
    other they compute ``MiniGPT.forward``'s hidden states, and :class:`AnswerLoss` its loss."""
    body, _ = _llm_parts(model)
    n = len(body.layers)
    return [PipeHead(model), *([identity_layer] * identity_layers), *(PipeBlock(model, i) for i in range(n)),
            PipeTail(model)]


def pipe_batch(batch: Any, weight: float, image_size: int | None = None) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """A :class:`~minigpt.model.minigpt.ModelBatch` as the pipeline's micro-batch: ``((input_ids, attention_mask,
    image_mask, pixel_values), (labels, weight))``; a batch without images gets an empty pixel tensor."""
    text = batch.text
    pixels = batch.pixel_values
    if pixels is None:
        size = image_size or 1
        pixels = torch.zeros(0, 3, size, size)
    return (text.input_ids, text.attention_mask, text.image_mask, pixels), (text.labels, torch.tensor(float(weight)))


def build_pipeline(
    model: Any,
    num_stages: int,
    partition_method: str = "uniform",
    identity_layers: int = 0,
    activation_checkpoint_interval: int = 0,
) -> Any:
    """``deepspeed.pipe.PipelineModule`` of ``model`` (see :func:`pipeline_layers`) over the processes started
    (their number is a multiple of ``num_stages``; the rest is data parallelism). This process's layers are moved
    to its device; the others stay where they are (the whole model is built on every process). A stage without a
    trained matrix and a trained vector gets an ``occupy`` Linear(1, 1) in its last layer
    (:meth:`_PipeLayer.occupy_stage`)."""
    from deepspeed.pipe import PipelineModule

    _, llm = _llm_parts(model)
    head, emb = llm.get_output_embeddings(), llm.get_input_embeddings()
    if num_stages > 1 and head.weight is emb.weight and head.weight.requires_grad:
        raise ValueError("a trained LLM with tied input/output embeddings cannot be split into pipeline stages "
                         "(the tied weight would live on two stages); freeze the LLM or use one stage / ZeRO")
    pipe = PipelineModule(
        layers=pipeline_layers(model, identity_layers), num_stages=num_stages, loss_fn=AnswerLoss(model),
        partition_method=partition_method, activation_checkpoint_interval=activation_checkpoint_interval,
        dynamic_shape=True,  # micro-batches differ in length (and in size when samples are skipped)
    )
    trained = [p for p in pipe.parameters() if p.requires_grad]
    if not (any(p.ndim >= 2 for p in trained) and any(p.ndim < 2 for p in trained)):
        local = [f for f in pipe.forward_funcs if isinstance(f, _PipeLayer)]
        if not local:
            raise ValueError(f"pipeline stage {pipe.stage_id} holds no layer (only identities); use fewer stages or "
                             "fewer identity_layers")
        local[-1].occupy_stage(_pipe_device())
    for param in pipe.parameters():
        # Every parameter lives on one stage only. DeepSpeed's gradient norm (clipping) sums over the pipeline
        # the parameters marked model-parallel and, of the others, only stage 0's: mark them all.
        param.model_parallel = True
    return pipe


def _pipe_device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0))))


# ---------------------------------------------------------------------------------------------- pipeline strategy


class DeepSpeedPipeline(_DeepSpeed):
    """Pipeline parallelism (``run.deepspeed.pipeline_stages``) x data parallelism over the processes started.

    ``rank`` / ``world_size`` are this process's data-parallel index and size (what the data loader shards by);
    ``is_main`` is global rank 0 (stage 0 of the first pipeline), which writes the outputs."""

    name = "deepspeed_pipeline"

    def __init__(self, run: Any) -> None:
        super().__init__(run)
        from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

        stages = run.deepspeed.pipeline_stages
        if self.global_world % stages:
            raise ValueError(f"run.deepspeed.pipeline_stages {stages} does not divide the {self.global_world} "
                             "processes started")
        coord = PipeDataParallelTopology(num_pp=stages, num_dp=self.global_world // stages).get_coord(self.global_rank)
        self.stages, self.stage = stages, coord.pipe
        self.rank, self.world_size = coord.data, self.global_world // stages
        self.ds_config = deepspeed_config(run, self.world_size, self.precision, pipeline=True)
        self._names: dict[int, str] = {}
        log.info("DeepSpeed pipeline: %d stages x %d data-parallel, %s, ZeRO-%d", stages, self.world_size,
                 self.ds_precision, self.ds_config["zero_optimization"]["stage"])

    @property
    def is_main(self) -> bool:
        return self.global_rank == 0

    @property
    def trainer_class(self) -> type:
        return PipelineTrainer

    def _layout(self) -> dict[str, Any]:
        return {**super()._layout(), "stages": self.stages}

    def _group(self) -> Any:
        return self.engine.grid.get_data_parallel_group() if self.engine is not None else None

    def build(self, model: Any) -> Any:
        """This process's part of the pipeline (see :func:`build_pipeline`)."""
        section = self.run.deepspeed
        self._names = {id(p): n for n, p in model.named_parameters()}
        self._model_config = model.config.to_dict()
        return build_pipeline(model, self.stages, section.partition_method, section.identity_layers)

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        ds_optimizer = self._initialize(model, optimizer, self.ds_config)
        return self.engine, ds_optimizer

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every stage's trained parameters (fp32 masters where kept), gathered on the main process."""
        local = {self._names[id(p)]: _fp32(p) for p in self.engine.module.parameters()
                 if p.requires_grad and id(p) in self._names}
        gathered: list[Any] | None = [None] * self.global_world if self.is_main else None
        dist.gather_object(local if self.rank == 0 else {}, gathered, dst=0)
        if not self.is_main:
            return {}
        return {k: v for part in gathered for k, v in part.items()}  # type: ignore[union-attr]

    def final_model(self, model: nn.Module) -> nn.Module:
        """The main process's MiniGPT with every stage's trained weights copied in."""
        weights = self.trainable_state(model)
        if self.is_main:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, value in weights.items():
                    params[name].copy_(value.to(params[name].device, params[name].dtype))
        return model


class PipelineTrainer(Trainer):
    """The loop of :class:`~.loop.Trainer` with DeepSpeed's pipeline engine doing each step
    (``engine.train_batch``) and each evaluation (``engine.eval_batch``)."""

    def __init__(self, config: Any, strategy: DeepSpeedPipeline) -> None:
        run, data = config.run, config.data
        problems = [what for what, bad in (
            ("model.lora", config.model.lora is not None), ("data.packing", getattr(data, "packing", False)),
            ("data.feature_cache", getattr(data, "feature_cache", None) is not None),
            ("run.compile", getattr(run, "compile", False)),
        ) if bad]
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
        items = [self._pipe_inputs(self.data.example, 0.0) if b.empty else self._pipe_inputs(b.batch, scale) for b in micro]
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
        self.reporter.log({"step": self.step, "eval_loss": loss, "eval_tokens": int(total_tokens),
                           "eval_skipped": int(skipped)})
        return loss

    def _all_max(self, value: int) -> int:
        tensor = torch.tensor([value], dtype=torch.int64, device=self.strategy.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def _train_mode(self) -> None:
        self.model.train()


# ---------------------------------------------------------------------------------------------- entry


def make_deepspeed_strategy(run: Any) -> Strategy:
    """``run.strategy`` deepspeed_zero -> :class:`DeepSpeedZeRO`; deepspeed_pipeline -> :class:`DeepSpeedPipeline`."""
    if run.strategy == "deepspeed_pipeline":
        return DeepSpeedPipeline(run)
    if run.deepspeed.pipeline_stages != 1:
        raise ValueError("run.deepspeed.pipeline_stages applies to run.strategy deepspeed_pipeline")
    return DeepSpeedZeRO(run)


__all__ = [
    "DeepSpeedZeRO", "DeepSpeedPipeline", "PipelineTrainer", "PipeHead", "PipeBlock", "PipeTail", "AnswerLoss",
    "deepspeed_config", "build_pipeline", "pipeline_layers", "pipe_batch", "init_deepspeed", "skip_shm_comm",
    "make_deepspeed_strategy", "gather_zero3", "DS_DIR", "CONFIG_KEY",
]
