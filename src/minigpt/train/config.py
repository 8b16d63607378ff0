"""Typed training configuration: a YAML file plus dotted ``key=value`` overrides -> :class:`TrainConfig`.

Three sections, every key checked (unknown keys and wrong types are errors naming the key path and the file):

- ``model``: the model config, :class:`~minigpt.model.config.MiniGPTConfig` (LLM, vision encoder, projector, template,
  freezing, dtypes, max text length) plus ``lora`` and ``init_from``;
- ``data``: the training datasets (format, path, ratio) and an optional eval set;
- ``run``: optimizer, schedule, length, batch, accumulation, precision, checkpoints, logging, seed.

Steps are optimizer steps throughout (``iters_per_epoch``, ``warmup_steps``, ``max_steps``, ``save_every``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..console import describe_error, error_key
from ..data.formats import TRAIN_FORMATS
from ..data.images import DEFAULT_MAX_PIXELS
from ..model.config import MiniGPTConfig

#: ``data.datasets[].format``: the formats with a training reader (:data:`minigpt.data.formats.DATASET_FORMATS`).
TrainFormat = Literal[TRAIN_FORMATS]  # type: ignore[valid-type]


class ConfigError(ValueError):
    """A config that cannot be read or does not validate; the message names the file and the key paths."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# ---------------------------------------------------------------------------------------------- model


class LoraSection(Section):
    """LoRA on the LLM via peft (the base LLM stays frozen; the adapters train)."""

    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class ModelSection(MiniGPTConfig):
    """The model config (:class:`~minigpt.model.config.MiniGPTConfig`) plus the keys only training reads."""

    lora: LoraSection | None = None
    #: A model directory written by ``save_pretrained`` (e.g. stage 1's ``final``): its saved parts are loaded.
    init_from: str | None = None
    #: The LM head + cross-entropy on the answer tokens: ``auto`` (Liger-Kernel's fused kernel on CUDA when installed,
    #: else ``plain`` for few tokens and ``chunked`` for many), ``plain``, ``chunked`` or ``liger``
    #: (:mod:`minigpt.model.loss`).
    loss_impl: Literal["auto", "plain", "chunked", "liger"] = "auto"
    #: QLoRA: load the frozen LLM quantized through bitsandbytes (``4bit``: NF4 or FP4; ``8bit``: LLM.int8) and train
    #: LoRA adapters on it (needs ``lora``); null: the LLM in ``llm_dtype``. Training only: ``final`` records the
    #: unquantized base and the adapter, and chat/eval/serve quantize again only when asked (``--load-in-4bit``).
    llm_quantization: Literal["4bit", "8bit"] | None = None
    #: 4-bit only: the data type of the quantized weights (``nf4``: QLoRA's NormalFloat) and double quantization
    #: (the blocks' scales quantized too: about 0.4 bits per weight less).
    llm_quant_type: Literal["nf4", "fp4"] = "nf4"
    llm_quant_double: bool = True

    @model_validator(mode="after")
    def _check_lora(self) -> ModelSection:
        if self.lora is not None and not self.freeze["llm"]:
            raise ValueError("lora needs the LLM frozen (freeze.llm: true); unfreeze it or use LoRA, not both")
        if self.llm_quantization is not None:
            if self.lora is None:
                raise ValueError(
                    f"llm_quantization {self.llm_quantization} trains LoRA adapters on a quantized LLM (QLoRA): "
                    "set model.lora, or drop llm_quantization"
                )
            if self.llm_gguf_file:
                raise ValueError("llm_quantization needs a transformers LLM, not a GGUF file (llm_gguf_file)")
        fields = type(self).model_fields
        explicit = {f for f in ("llm_quant_type", "llm_quant_double") if getattr(self, f) != fields[f].default}
        if explicit and self.llm_quantization != "4bit":
            raise ValueError(f"{', '.join(sorted(explicit))} apply to llm_quantization: 4bit only")
        return self

    def minigpt_config(self) -> MiniGPTConfig:
        """The :class:`MiniGPTConfig` this section describes (without the training-only keys)."""
        return MiniGPTConfig.from_dict(self.to_dict())


# ---------------------------------------------------------------------------------------------- data


class DatasetSpec(Section):
    """One dataset: ``path`` is the JSON file (llava, minigpt4qwen, captions_json), the folder holding
    ``filter_cap.json`` (cc_sbu_align) or the shards (webdataset: a folder, a brace pattern or a list)."""

    format: TrainFormat
    path: str | list[str]
    image_root: str | None = None
    ratio: float = Field(1.0, gt=0)
    #: cc_sbu_align only: ``instructions`` (MiniGPT-4 stage 2) or ``captions``; and the instruction list.
    mode: Literal["instructions", "captions"] | None = None
    instructions: list[str] | None = None
    #: Read image paths that leave the image root (``../x.jpg``); by default such records are skipped and counted.
    allow_outside_root: bool = False
    #: Caption formats: clean captions with MiniGPT-4's ``blip_caption`` processor keeping this many words (its
    #: stage 1 uses 50, MiniGPT4Qwen 100); null: captions as given.
    blip_caption: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check_options(self) -> DatasetSpec:
        if isinstance(self.path, list) and self.format != "webdataset":
            raise ValueError(f"a list of paths is for webdataset shards, not {self.format}")
        if self.allow_outside_root and self.format == "webdataset":
            raise ValueError("allow_outside_root does not apply to webdataset (images are inside the shards)")
        if self.image_root is not None and self.format in ("cc_sbu_align", "webdataset"):
            raise ValueError(f"image_root does not apply to {self.format} (images are under path)")
        if (self.mode is not None or self.instructions is not None) and self.format != "cc_sbu_align":
            raise ValueError("mode and instructions apply to cc_sbu_align only")
        if self.blip_caption is not None and self.format not in ("captions_json", "cc_sbu_align", "webdataset"):
            raise ValueError(f"blip_caption applies to the caption formats, not {self.format}")
        return self

    def reader_spec(self) -> dict[str, Any]:
        """Keyword arguments for :func:`minigpt.data.formats.read_dataset`."""
        if self.format == "webdataset":
            spec: dict[str, Any] = {"format": self.format, "urls_or_dir": self.path}
        elif self.format == "cc_sbu_align":
            spec = {"format": self.format, "root": self.path}
            if self.mode is not None:
                spec["mode"] = self.mode
            if self.instructions is not None:
                spec["instructions"] = self.instructions
        else:
            spec = {"format": self.format, "path": self.path, "image_root": self.image_root}
        if self.allow_outside_root:
            spec["allow_outside_root"] = True
        if self.blip_caption is not None:
            spec["blip_caption"] = self.blip_caption
        return spec


class DataSection(Section):
    datasets: list[DatasetSpec] = Field(min_length=1)
    #: Held-out data for the eval loss (ratios ignored; every record once).
    eval: list[DatasetSpec] = []
    num_workers: int = Field(2, ge=0)
    #: Training images: RandomResizedCrop(scale=(min_scale, 1)) when ``augment``, else the eval resize.
    augment: bool = True
    min_scale: float = Field(0.5, gt=0.0, le=1.0)
    hflip: bool = False
    #: Images with more pixels are skipped (counted) without being decoded; null: no limit.
    max_image_pixels: int | None = Field(DEFAULT_MAX_PIXELS, gt=0)
    #: A folder written by ``minigpt data cache-features``: the frozen encoder's outputs are read instead of the
    #: images (needs model.freeze.vision/qformer true and augment false). Eval data still reads images.
    feature_cache: str | None = None
    #: Pack each micro-batch's samples into rows of up to ``pack_len`` positions (block-diagonal attention).
    packing: bool = False
    pack_len: int = Field(1024, gt=0)
    #: Order each epoch so that an optimizer step holds samples of similar length (map-style datasets only), in
    #: windows of ``group_window`` optimizer steps.
    group_by_length: bool = False
    group_window: int = Field(64, gt=0)

    @model_validator(mode="after")
    def _check_grouping(self) -> DataSection:
        if self.group_by_length and any(d.format == "webdataset" for d in self.datasets):
            raise ValueError("group_by_length needs map-style datasets; a webdataset is streamed (use packing)")
        return self


# ---------------------------------------------------------------------------------------------- run


class OptimizerSection(Section):
    """AdamW; weight decay applies to matrices only (never to biases, norms or other 1-D parameters)."""

    name: Literal["adamw"] = "adamw"
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.05, ge=0)


class ScheduleSection(Section):
    """``linear_warmup_cosine`` (MiniGPT-4/LAVIS): linear from ``warmup_lr`` to ``lr`` over ``warmup_steps``,
    then ``min_lr + (lr - min_lr) * (1 + cos(pi * step / total_steps)) / 2`` with the cosine counting the warmup
    steps too. ``constant``: ``lr`` after the same optional warmup."""

    name: Literal["linear_warmup_cosine", "constant"] = "linear_warmup_cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_lr: float = Field(1e-6, ge=0)
    min_lr: float = Field(0.0, ge=0)


class EvalTaskSection(Section):
    """A generation task scored during training (see ``minigpt eval``), on the main process."""

    task: Literal["caption", "vqa", "mcq", "pope"]
    data: str | list[str]
    images: str | None = None
    limit: int | None = Field(200, gt=0)
    batch_size: int = Field(8, gt=0)
    max_new_tokens: int = Field(10, gt=0)


class DeepSpeedSection(Section):
    """``run.strategy: deepspeed_zero | deepspeed_pipeline`` (see :mod:`minigpt.train.deepspeed`). Batch size,
    accumulation, clipping and precision always come from ``run``; the JSON holds the rest (ZeRO buckets, offload)."""

    #: A DeepSpeed JSON config (e.g. configs/ds_zero2.json); no ``optimizer``/``scheduler`` (ours are used).
    config: str | None = None
    #: ZeRO stage; default: the JSON's, else 2 (deepspeed_zero) or 1 (deepspeed_pipeline, which allows 0-1).
    zero_stage: Literal[0, 1, 2, 3] | None = None
    #: ZeRO-3: build the LLM already partitioned (transformers + deepspeed.zero.Init) instead of whole per process.
    zero_init: bool = False
    #: Pipeline: number of stages (divides the number of processes; the rest is data parallelism).
    pipeline_stages: int = Field(1, gt=0)
    #: Pipeline: ``uniform`` (layers), ``parameters`` (trainable ones) or ``type:REGEX`` (e.g. ``type:PipeBlock``).
    partition_method: str = Field("uniform", pattern=r"^(uniform|parameters|type:.+)$")
    #: Pipeline: parameter-free layers after layer 0 (MPP-Qwen14B: 4) to lighten stage 0 under ``uniform``.
    identity_layers: int = Field(0, ge=0)


class FSDPSection(Section):
    """``run.strategy: fsdp`` (see :mod:`minigpt.train.fsdp`): PyTorch FSDP2, every decoder layer and then the rest
    of the model sharded over the processes; mixed precision from ``run.amp``."""

    #: Keep the sharded parameters, gradients and optimizer state in CPU memory (the optimizer steps there).
    cpu_offload: bool = False
    #: Free each layer's gathered parameters after its forward (gathered again for backward): less memory, more
    #: communication. False keeps them from forward to backward (ZeRO-2-like memory for the parameters).
    reshard_after_forward: bool = True


class RunSection(Section):
    output_dir: str = "outputs/run"
    seed: int = 42
    epochs: int = Field(1, gt=0)
    #: Optimizer steps per epoch; default: the epoch's samples (sum of dataset sizes) / global batch.
    #: Required when a dataset is streamed (webdataset).
    iters_per_epoch: int | None = Field(None, gt=0)
    #: Stop after this many optimizer steps in all (the schedule spans them), whatever ``epochs`` says.
    max_steps: int | None = Field(None, gt=0)
    batch_size: int = Field(8, gt=0, description="samples per device per micro-batch")
    grad_accum: int = Field(1, gt=0)
    optimizer: OptimizerSection = OptimizerSection()
    schedule: ScheduleSection = ScheduleSection()
    max_grad_norm: float | None = Field(None, gt=0)
    #: Autocast dtype: ``auto`` (bf16 where supported, fp16 + loss scaling otherwise, none on CPU), bf16, fp16, no.
    amp: Literal["auto", "bf16", "bfloat16", "fp16", "float16", "no"] = "auto"
    device: str = "auto"
    strategy: Literal["auto", "single", "ddp", "fsdp", "deepspeed_zero", "deepspeed_pipeline"] = "auto"
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    fsdp: FSDPSection = FSDPSection()
    #: DDP only: needed when some trainable parameters get no gradient (e.g. an unfrozen Q-Former's text FFN).
    find_unused_parameters: bool = False
    grad_checkpointing: bool = False
    #: LLM attention kernel: sdpa, eager (as the original code) or flash_attention_2 (needs flash-attn, no packing).
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    #: torch.compile each LLM decoder layer (regional compilation: the first steps are slow while it compiles).
    compile: bool = False
    deterministic: bool = False
    #: Predict the run's peak memory before loading and stop when it cannot fit: null checks on accelerators only,
    #: true on CPU too (against the available RAM), false never (``--no-memory-check``; minigpt.train.memory.check).
    memory_check: bool | None = None
    #: ``auto``: continue from the newest checkpoint in output_dir if any; ``none``: start fresh; or a path.
    resume: str = "auto"
    save_every: int = Field(1000, gt=0)
    keep_last: int = Field(2, gt=0)
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(0, ge=0, description="0: evaluate at the end only (when there is eval data)")
    eval_at_start: bool = False
    #: Also score a task (VQA accuracy, CIDEr, ...) at each evaluation; logged as ``eval/<task>/<metric>``.
    eval_task: EvalTaskSection | None = None
    eval_batch_size: int | None = Field(None, gt=0)
    report_to: list[Literal["tensorboard", "wandb"]] = []
    wandb_project: str = "minigpt"

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML 1.1 reads a bare ``no`` (or ``off``, ``false``) as false

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        from ..device import check_device_name

        return check_device_name(value)


def _check_fsdp(config: TrainConfig) -> None:
    """What ``run.strategy: fsdp`` does not run (yet), as one-line errors."""
    if config.model.lora is not None:
        raise ValueError("model.lora with run.strategy fsdp is not supported; use ddp (LoRA weights are small)")
    if config.run.eval_task is not None:
        raise ValueError("run.eval_task generates on the main process alone, which FSDP cannot; use ddp")
    if config.run.amp in ("fp16", "float16"):
        raise ValueError("run.strategy fsdp trains in bf16 or fp32 (run.amp bf16 or no): no fp16 loss scaling")


class TrainConfig(Section):
    model: ModelSection
    data: DataSection
    run: RunSection

    @model_validator(mode="after")
    def _check_speedups(self) -> TrainConfig:
        if self.data.feature_cache is not None:
            from ..data.features import check_trainable

            check_trainable(self.model.freeze, self.data.augment, self.model.vision.use_qformer)
        if self.model.llm_quantization and self.run.strategy.startswith(("deepspeed", "fsdp")):
            raise ValueError(
                "model.llm_quantization (QLoRA) runs with run.strategy single or ddp; DeepSpeed cannot partition "
                "bitsandbytes weights (nor can FSDP)"
            )
        if self.run.strategy == "fsdp":
            _check_fsdp(self)
        if self.data.packing and self.run.attn_implementation == "flash_attention_2":
            raise ValueError("data.packing needs run.attn_implementation sdpa or eager (a 4-D attention mask)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ---------------------------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read ``path`` (YAML), apply ``key.sub=value`` overrides (values parsed as YAML; list items by index,
    e.g. ``data.datasets.0.path=x.json``) and validate."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with model, data and run sections")
    overridden = {}
    for item in overrides:
        key, value = apply_override(data, item, path)
        overridden[key] = item
    return validate_config(data, str(path), overridden)


def apply_override(data: dict[str, Any], item: str, source: str | Path = "<config>") -> tuple[str, Any]:
    """Set ``a.b.0.c=value`` in ``data`` in place (creating mappings as needed)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. run.batch_size=4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {item!r}: {where} is not an index of a {len(node)}-item list ({source})")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(f"override {item!r}: {'.'.join(parts[:i])} is a value, not a section ({source})")
    return key, value


def validate_config(
    data: dict[str, Any], source: str = "<config>", overridden: dict[str, str] | None = None
) -> TrainConfig:
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        lines = [_describe(e, data, overridden or {}) for e in err.errors()]
        raise ConfigError(f"{source}: invalid config:\n" + "\n".join(f"  {line}" for line in lines)) from None


def _describe(error: Any, data: dict[str, Any], overridden: dict[str, str]) -> str:
    key = error_key(error)
    fields = _fields_at(key.split(".")[:-1]) if error["type"] == "extra_forbidden" else []
    message = describe_error(error, fields)
    origin = next((item for k, item in overridden.items() if key == k or key.startswith(k + ".")), None)
    return message + (f" [from override {origin}]" if origin else "")


def _fields_at(loc: list[str]) -> list[str]:
    model: Any = TrainConfig
    for part in loc:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        model = _model_of(field.annotation)
        if model is None:
            return []
    return list(model.model_fields)


def keys_named(name: str, model: Any = TrainConfig, prefix: str = "") -> list[str]:
    """The dotted keys of the config whose last part is ``name`` (``batch_size`` -> ``run.batch_size``)."""
    keys = []
    for field_name, field in model.model_fields.items():
        if field_name == name:
            keys.append(prefix + field_name)
        sub = _model_of(field.annotation)
        if sub is not None and sub is not model:
            keys += keys_named(name, sub, f"{prefix}{field_name}.")
    return keys


def _model_of(annotation: Any) -> Any:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


# ---------------------------------------------------------------------------------------------- paths

#: A Hugging Face hub id: ``NAME`` or ``ORG/NAME``.
HUB_ID = re.compile(r"^(?!\.)[\w.-]{1,96}(/(?!\.)[\w.-]{1,96})?$")


def check_paths(config: TrainConfig) -> None:
    """:class:`ConfigError` listing every file or folder of ``config`` that is not there, by key path, so that a
    typo stops the run before anything (a 7B LLM) is loaded."""
    problems = [f"  {key}: {problem}" for key, problem in path_problems(config)]
    if problems:
        raise ConfigError("paths not found:\n" + "\n".join(problems))


def path_problems(config: TrainConfig) -> Iterator[tuple[str, str]]:
    """``(key, problem)`` for each file or folder of ``config`` that is not there."""
    model, data, run = config.model, config.data, config.run
    if not Path(model.llm).exists() and not HUB_ID.match(model.llm):
        yield "model.llm", f"no such folder: {model.llm} (nor a hub id ORG/NAME)"
    for key in ("vision_weights", "projector_weights", "init_from"):
        yield from _missing(f"model.{key}", getattr(model, key))
    for section, specs in (("datasets", data.datasets), ("eval", data.eval)):
        for i, spec in enumerate(specs):
            yield from _dataset_problems(f"data.{section}.{i}", spec)
    yield from _missing("data.feature_cache", data.feature_cache)
    if run.resume not in ("auto", "none"):
        yield from _missing("run.resume", run.resume)
    yield from _missing("run.deepspeed.config", run.deepspeed.config)
    if run.eval_task is not None:
        yield from _missing("run.eval_task.data", run.eval_task.data)
        yield from _missing("run.eval_task.images", run.eval_task.images)


def _dataset_problems(key: str, spec: DatasetSpec) -> Iterator[tuple[str, str]]:
    if spec.format == "webdataset":
        from ..data.formats import WebDatasetReader

        try:
            WebDatasetReader(spec.path)  # expands brace patterns and checks every shard
        except (ValueError, FileNotFoundError) as err:
            yield f"{key}.path", str(err)
    elif spec.format == "cc_sbu_align":
        yield from _missing(f"{key}.path", str(Path(str(spec.path)) / "filter_cap.json"))
    else:
        yield from _missing(f"{key}.path", spec.path)
    yield from _missing(f"{key}.image_root", spec.image_root)


def _missing(key: str, path: str | list[str] | None) -> Iterator[tuple[str, str]]:
    """``(key, problem)`` for ``path`` (or each path of a list, ``key.N``) that does not exist."""
    for sub, item in [("", path)] if not isinstance(path, list) else [(f".{j}", p) for j, p in enumerate(path)]:
        if item is not None and not Path(item).exists():
            yield key + sub, f"not found: {item}"


__all__ = [
    "ConfigError",
    "TrainConfig",
    "ModelSection",
    "LoraSection",
    "DataSection",
    "DatasetSpec",
    "RunSection",
    "DeepSpeedSection",
    "OptimizerSection",
    "ScheduleSection",
    "load_config",
    "validate_config",
    "apply_override",
    "check_paths",
]
