"""``run.strategy: deepspeed_pipeline``: the MiniGPT cut into pipeline layers, as MPP-Qwen14B does, and the
strategy that runs them (:class:`DeepSpeedPipeline`, with :class:`~.trainer.PipelineTrainer`).

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

The key names come from :mod:`minigpt.model.deepspeed_names`. A stage without both a trained matrix and a trained
vector (e.g. a frozen LLM's) gets ``occupy.{weight,bias}`` (a zero Linear(1, 1)) in its last layer, as MPP-Qwen14B's
``occupy`` layer. Every process builds the whole model on the CPU and moves its stage's layers to its device.
Parameters are marked model-parallel so that DeepSpeed's gradient norm (clipping, ``grad_norm``) covers all stages.
Default ZeRO stage 1 (0 allowed); LoRA, packing, the feature cache and ``run.compile`` are not supported here;
LLaMA-style LLMs only (LLaMA, Mistral, Qwen2/2.5/3).

The micro-batch tuple (:func:`pipe_batch`) is ``((input_ids, attention_mask, image_mask, pixel_values), (labels,
weight))``: stage 0 reads the first half, the last stage the second.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ...model import deepspeed_names as names
from .base import DeepSpeedStrategy, fp32_master
from .config import deepspeed_config

log = logging.getLogger(__name__)

PIPELINE_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def _llm_parts(model: Any) -> tuple[Any, Any]:
    """(decoder body, LM) of a MiniGPT whose LLM the pipeline knows how to cut."""
    llm = model.llm
    family = getattr(llm.config, "model_type", "")
    body = getattr(llm, "model", None)
    if family not in PIPELINE_FAMILIES or not all(
        hasattr(body, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")
    ):
        raise ValueError(
            f"the pipeline cuts LLaMA-style LLMs ({', '.join(PIPELINE_FAMILIES)}: model.embed_tokens, "
            f"model.layers, model.norm, lm_head); got {type(llm).__name__} ({family or 'unknown'}) "
            "(a LoRA-wrapped LLM is not supported either)"
        )
    return body, llm


class _PipeLayer(nn.Module):
    """A pipeline layer made of a MiniGPT's own modules: ``train()`` defers to the MiniGPT so that frozen parts
    stay in eval mode (DeepSpeed calls ``module.train()`` before every batch)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self._owner = [model]  # a list: not registered as a submodule

    def attach(self, path: str, module: nn.Module) -> None:
        """Register ``module`` at the dotted ``path`` (a :mod:`~minigpt.model.deepspeed_names` key prefix), with
        empty modules in between: its parameters are then named ``path.*`` in the layer file."""
        *parents, name = path.split(".")
        owner: nn.Module = self
        for part in parents:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        owner.add_module(name, module)

    def train(self, mode: bool = True) -> _PipeLayer:
        super().train(mode)
        self._owner[0].train(mode)
        return self

    def occupy_stage(self, device: torch.device) -> None:
        """Give this layer a trained ``occupy`` Linear(1, 1) that takes part in its forward with weight 0 (so it
        always has a gradient, of 0). Every stage's optimizer needs a matrix and a vector (its two parameter groups:
        DeepSpeed's ZeRO-1 gradient norm runs one collective per group); MPP-Qwen14B adds a 1000x1000 ``occupy``
        layer for the same reason when the LLM is frozen."""
        occupy = nn.Linear(1, 1, device=device)
        nn.init.zeros_(occupy.weight)
        nn.init.zeros_(occupy.bias)
        self.attach(names.OCCUPY, occupy)

    def _occupied(self, x: torch.Tensor) -> torch.Tensor:
        occupy = getattr(self, names.OCCUPY, None)
        return x if occupy is None else x + ((occupy.weight.sum() + occupy.bias.sum()) * 0).to(x.dtype)


class PipeHead(_PipeLayer):
    """Layer 0 (MPP: ViT + ln_vision + Q-Former + query tokens + llm_proj + word embeddings): ``(input_ids,
    attention_mask, image_mask, pixel_values)`` -> ``(embeddings with the visual tokens, attention_mask)``."""

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self.attach(names.VISION, model.vision)
        self.attach(names.PROJECTOR, model.projector)
        self.attach(names.EMBEDDING, model.llm.get_input_embeddings())

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        from ...data.tokenize import ModelBatch, TextBatch

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
        self.attach(names.BLOCK, body.layers[index])
        self.rotary = body.rotary_emb  # no state-dict entries (inv_freq is not persistent)
        types = getattr(llm.config, "layer_types", None)
        self.attention_type = types[index] if types else "full_attention"
        self._config = llm.config

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, attention_mask = inputs
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = causal_mask(self._config, hidden, attention_mask, positions, self.attention_type)
        block = self.get_submodule(names.BLOCK)
        out = block(
            hidden, attention_mask=mask, position_ids=positions, position_embeddings=self.rotary(hidden, positions)
        )
        return self._occupied(out[0] if isinstance(out, tuple) else out), attention_mask


def causal_mask(
    config: Any,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    attention_type: str = "full_attention",
) -> Any:
    """The mask the HF model body builds for its layers (transformers 5 and 4.5x signatures)."""
    import inspect

    from transformers import masking_utils

    make = (
        masking_utils.create_sliding_window_causal_mask
        if attention_type == "sliding_attention"
        else masking_utils.create_causal_mask
    )
    if "inputs_embeds" in inspect.signature(make).parameters:
        return make(
            config=config, inputs_embeds=embeds, attention_mask=attention_mask, cache=None, position_ids=positions
        )
    return make(
        config=config,
        input_embeds=embeds,
        attention_mask=attention_mask,  # transformers 4.5x
        cache_position=positions[0],
        past_key_values=None,
        position_ids=positions,
    )


class PipeTail(_PipeLayer):
    """The last layer: the final norm (``final_layernorm``) and the LM head (``lm_head``, applied by
    :class:`AnswerLoss` at the supervised positions only)."""

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        body, llm = _llm_parts(model)
        self.attach(names.FINAL_NORM, body.norm)
        self.attach(names.LM_HEAD, llm.get_output_embeddings())

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self._occupied(self.get_submodule(names.FINAL_NORM)(inputs[0]))


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
    return [
        PipeHead(model),
        *([identity_layer] * identity_layers),
        *(PipeBlock(model, i) for i in range(n)),
        PipeTail(model),
    ]


def pipe_batch(
    batch: Any, weight: float, image_size: int | None = None
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
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
        raise ValueError(
            "a trained LLM with tied input/output embeddings cannot be split into pipeline stages "
            "(the tied weight would live on two stages); freeze the LLM or use one stage / ZeRO"
        )
    pipe = PipelineModule(
        layers=pipeline_layers(model, identity_layers),
        num_stages=num_stages,
        loss_fn=AnswerLoss(model),
        partition_method=partition_method,
        activation_checkpoint_interval=activation_checkpoint_interval,
        dynamic_shape=True,  # micro-batches differ in length (and in size when samples are skipped)
    )
    trained = [p for p in pipe.parameters() if p.requires_grad]
    if not (any(p.ndim >= 2 for p in trained) and any(p.ndim < 2 for p in trained)):
        local = [f for f in pipe.forward_funcs if isinstance(f, _PipeLayer)]
        if not local:
            raise ValueError(
                f"pipeline stage {pipe.stage_id} holds no layer (only identities); use fewer stages or "
                "fewer identity_layers"
            )
        local[-1].occupy_stage(_pipe_device())
    for param in pipe.parameters():
        # Every parameter lives on one stage only. DeepSpeed's gradient norm (clipping) sums over the pipeline
        # the parameters marked model-parallel and, of the others, only stage 0's: mark them all.
        param.model_parallel = True
    return pipe


def _pipe_device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0))))


# ---------------------------------------------------------------------------------------------- strategy


class DeepSpeedPipeline(DeepSpeedStrategy):
    """Pipeline parallelism (``run.deepspeed.pipeline_stages``) x data parallelism over the processes started.

    ``rank`` / ``world_size`` are this process's data-parallel index and size (what the data loader shards by);
    ``is_main`` is global rank 0 (stage 0 of the first pipeline), which writes the outputs."""

    name = "deepspeed_pipeline"

    def __init__(self, run: Any) -> None:
        super().__init__(run)
        from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

        stages = run.deepspeed.pipeline_stages
        if self.global_world % stages:
            raise ValueError(
                f"run.deepspeed.pipeline_stages {stages} does not divide the {self.global_world} processes started"
            )
        coord = PipeDataParallelTopology(num_pp=stages, num_dp=self.global_world // stages).get_coord(self.global_rank)
        self.stages, self.stage = stages, coord.pipe
        self.rank, self.world_size = coord.data, self.global_world // stages
        self.ds_config = deepspeed_config(run, self.world_size, self.precision, pipeline=True)
        self._names: dict[int, str] = {}
        log.info(
            "DeepSpeed pipeline: %d stages x %d data-parallel, %s, ZeRO-%d",
            stages,
            self.world_size,
            self.ds_precision,
            self.ds_config["zero_optimization"]["stage"],
        )

    @property
    def is_main(self) -> bool:
        return self.global_rank == 0

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
        local = {
            self._names[id(p)]: fp32_master(p)
            for p in self.engine.module.parameters()
            if p.requires_grad and id(p) in self._names
        }
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
