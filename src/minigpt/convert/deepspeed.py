"""DeepSpeed checkpoints (ZeRO, and MPP-Qwen14B-style pipeline) -> a minigpt model directory.

Every file is read with ``torch.load(weights_only=True)`` (layer files through :func:`load_checkpoint`);
the only classes allowed beyond tensors and plain containers are DeepSpeed's own data holders
(:data:`DEEPSPEED_SAFE_CLASSES`: loss-scaler settings and fragment addresses in ZeRO optimizer files).
A file needing anything else is refused with :class:`UnsafeCheckpointError`; ``trust_pickle=True``
(CLI ``--trust-pickle``) loads it with full unpickling, which runs whatever code the file carries:
only for files you made yourself.

ZeRO layout (``engine.save_checkpoint(save_dir, tag, client_state=...)``, DeepSpeed's conventions)::

    save_dir/latest                                         text: the newest tag
    save_dir/<tag>/mp_rank_00_model_states.pt               stage 0-2: {'module': state dict, 'param_shapes',
                                                            'frozen_param_shapes', 'ds_config', 'ds_version', ...
                                                            + client_state}
    save_dir/<tag>/zero_pp_rank_<r>_mp_rank_00_optim_states.pt    stage 1-3: fp32 master partitions + moments
    save_dir/<tag>/zero_pp_rank_<r>_mp_rank_00_model_states.pt    stage 3 (its 'module' holds no real weights)

The module is a :class:`~minigpt.model.minigpt.MiniGPT`, so names are ``vision.*``, ``projector.*``, ``llm.*``
(``exclude_frozen_parameters=True`` leaves frozen parts out; they then come from the sources the config
records). A minigpt DeepSpeed strategy is expected to save ``client_state={"minigpt_config":
MiniGPTConfig.to_dict()}``; otherwise the config comes from ``--config``. Stage 0-2 read ``module`` (the
training dtype, e.g. bf16, as MiniGPT4Qwen's ``deepspeed2pth.py``); ``fp32=True`` and stage 3 rebuild the
fp32 master weights with ``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``.

Pipeline layout (MPP-Qwen14B ``train_pipeline.py``, DeepSpeed ``PipelineModule.save_state_dict``)::

    save_dir/<tag>/layer_XX-model_states.pt                 one flat state dict per pipeline layer

mapped by :data:`PIPELINE_LLM_NAMES` (layer ``i`` = global pipeline index):

=====================  ====================================  ======================  ======================
layer                  key                                   LLaMA-style base        Qwen(1) base
=====================  ====================================  ======================  ======================
00                     ``visionpipe.llm_proj.{weight,bias}``  projector (linear)     projector (linear)
00                     ``visionpipe.llm_proj.{0,2}.*``       projector (mlp2x_gelu)  projector (mlp2x_gelu)
00                     ``vision.*`` (our strategy, trained)  vision (as is)          vision (as is)
00                     ``visionpipe.{visual_encoder,ln_vision,Qformer,query_tokens}*``  vision (LAVIS names)
00                     ``wtepipe.word_embeddings.weight``    model.embed_tokens      transformer.wte
01-04                  (identity layers, no tensors)
B+j (B = first block)  ``layer.*``                           model.layers.{j}.*      transformer.h.{j}.*
after the blocks       ``final_layernorm.weight``            model.norm.weight       transformer.ln_f.weight
next                   ``lm_head.weight``                    lm_head.weight          lm_head.weight
last (frozen LLM)      ``occupy.weight`` (1000x1000 dummy)   ignored                 ignored
=====================  ====================================  ======================  ======================

LLaMA-style = the base LLM's own names are ``model.embed_tokens`` / ``model.layers.N`` / ``model.norm`` /
``lm_head`` and each pipeline block wraps one HF decoder layer (LLaMA, Qwen2, Qwen3, Mistral); Qwen(1) =
``QWenLMHeadModel`` (trust_remote_code), the LLM MPP-Qwen14B trains. The block index is the pipeline index
minus the first block's (5 in MPP); ``final_layernorm``/``lm_head`` are recognised by name, in any layer.
Other architectures are refused. Tensor-parallel layer files (``layer_XX-model_YY-...``) are not supported.
Our ``deepspeed_pipeline`` strategy also writes ``mp_rank_00_model_states.pt`` with the ``minigpt_config`` client
state: when present it gives the base LLM, template, vision, projector and freeze (no ``--llm``/``--template``
needed; a trained LLM's layers are then read as with ``--with-llm``).

Input: DeepSpeed's save dir (``latest``), a tag folder, or a training run: ``OUTPUT`` (its newest
``checkpoints/step_N``) or ``OUTPUT/checkpoints/step_N``, whose ``state.pt`` (read with ``weights_only=True``)
records the DeepSpeed folder and tag (``strategy.deepspeed = {dir, tag, layout}``). Key and folder names shared
with the strategies that write these files come from :mod:`minigpt.model.deepspeed_names`.

Output: frozen parts with a recorded source are referenced, not copied (unless ``full``), as training's ``final/``;
a frozen vision encoder whose checkpoint tensors differ from its source's is written. ``--vision DIR`` takes a
vision folder (recorded as the source) or a model directory such as the run's ``final/`` (its encoder is copied):
the way in for a run whose vision encoder was random and frozen, so in no DeepSpeed file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import pickle
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..files import unsafe_global
from ..model.deepspeed_names import (
    BLOCK,
    CONFIG_KEY,
    DS_DIR,
    EMBEDDING,
    FINAL_NORM,
    LM_HEAD,
    PROJECTOR,
    VISION,
    VISIONPIPE,
)
from ..model.llm import meta_llm
from ..safe_load import UnsafeCheckpointError, load_checkpoint, unwrap
from .lavis import ConversionReport, convert_lavis_vision

log = logging.getLogger(__name__)

__all__ = [
    "DEEPSPEED_SAFE_CLASSES",
    "PIPELINE_LLM_NAMES",
    "ConvertedCheckpoint",
    "UnsafeCheckpointError",
    "resolve_tag_dir",
    "load_torch_file",
    "zero_state_dict",
    "pipeline_state_dict",
    "pipeline_llm_names",
    "llm_parameter_shapes",
    "write_model_dir",
    "DeepSpeedConversion",
    "convert_deepspeed",
]

MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
_LAYER_FILE = re.compile(r"^layer_(\d+)-model_states\.pt$")
_TP_LAYER_FILE = re.compile(r"^layer_(\d+)-model_\d+-model_states\.pt$")
_TAG_DIR = re.compile(r"^global_step(\d+)$")

#: ``module:qualname`` of the DeepSpeed classes a ZeRO checkpoint may hold besides tensors and containers.
#: They are plain data holders (attributes only), so rebuilding them runs no foreign code.
DEEPSPEED_SAFE_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler:LossScaler",
    "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
    "deepspeed.utils.tensor_fragment:fragment_address",
    "deepspeed.runtime.zero.config:ZeroStageEnum",
)

#: Base-LLM naming -> (embedding, block prefix with ``{j}``, final norm prefix, LM head prefix).
PIPELINE_LLM_NAMES: dict[str, tuple[str, str, str, str]] = {
    "llama": ("model.embed_tokens.weight", "model.layers.{j}.", "model.norm.", "lm_head."),
    "qwen": ("transformer.wte.weight", "transformer.h.{j}.", "transformer.ln_f.", "lm_head."),
}


@dataclass
class ConvertedCheckpoint:
    """A MiniGPT-named state dict (``vision.*``, ``projector.*``, ``llm.*``; parts may be absent)."""

    state: dict[str, torch.Tensor]
    config: dict[str, Any] | None = None  # MiniGPTConfig.to_dict() recorded in the checkpoint, if any
    report: ConversionReport = field(default_factory=ConversionReport)


# ---------------------------------------------------------------------------------------------- reading files
def resolve_tag_dir(path: str | Path, tag: str | None = None) -> Path:
    """The folder holding the ``*_model_states.pt`` files: ``path`` itself, ``path/tag``, ``path/<latest>``
    or the highest ``path/global_stepN``."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    training = _training_tag_dir(path, tag)
    if training is not None:
        return training
    if tag:
        found = path / tag
        if not found.is_dir():
            raise FileNotFoundError(f"{path}: no tag folder {tag!r}")
        return found
    if any(path.glob("*model_states.pt")):
        return path
    latest = path / "latest"
    if latest.is_file():
        found = path / latest.read_text().strip()
        if not found.is_dir():
            raise FileNotFoundError(f"{latest} names {found.name!r}, which does not exist")
        return found
    steps = sorted((int(m[1]), p) for p in path.iterdir() if (m := _TAG_DIR.match(p.name)) and p.is_dir())
    if steps:
        return steps[-1][1]
    raise FileNotFoundError(f"{path}: no DeepSpeed checkpoint (no *model_states.pt, 'latest' or global_stepN)")


def _training_tag_dir(path: Path, tag: str | None) -> Path | None:
    """A training ``OUTPUT`` (its newest ``checkpoints/step_N``) or a ``step_N`` folder -> the DeepSpeed tag folder
    its ``state.pt`` records (``strategy.deepspeed = {dir, tag, ...}``); None for other folders."""
    from ..train.checkpoint import CHECKPOINTS, STATE, latest_checkpoint

    if (path / STATE).is_file():
        step = path
    elif (path / CHECKPOINTS).is_dir():
        step = latest_checkpoint(path)
        if step is None:  # no step folder (yet): DeepSpeed's own save dir, if any
            ds_dir = path / CHECKPOINTS / DS_DIR
            return resolve_tag_dir(ds_dir, tag) if ds_dir.is_dir() else None
    else:
        return None
    state = load_torch_file(step / STATE)  # weights_only=True
    info = ((state.get("strategy") or {}) if isinstance(state, Mapping) else {}).get("deepspeed")
    if not isinstance(info, Mapping) or "dir" not in info or "tag" not in info:
        raise ValueError(
            f"{step}: not written by a DeepSpeed strategy (its {STATE} records no strategy.deepspeed): "
            "nothing to convert; its trainable.safetensors holds the trained weights"
        )
    ds_dir = step.parent / info["dir"]
    found = ds_dir / (tag or info["tag"])
    if not found.is_dir():
        raise FileNotFoundError(f"{step}: its DeepSpeed files {found} are missing")
    return found


def _safe_classes() -> list[Any]:
    import importlib

    classes = []
    for spec in DEEPSPEED_SAFE_CLASSES:
        module, name = spec.split(":")
        try:
            classes.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: that class is simply not allowed
            continue
    return classes


def load_torch_file(path: str | Path, trust_pickle: bool = False, mmap: bool | None = None) -> Any:
    """``torch.load(weights_only=True)`` on CPU with :data:`DEEPSPEED_SAFE_CLASSES` allowed; anything else is
    refused unless ``trust_pickle`` (then full unpickling: runs the file's code)."""
    path = Path(path)
    kwargs: dict[str, Any] = {"map_location": "cpu"}
    if mmap:
        kwargs["mmap"] = True
    if trust_pickle:
        log.warning("%s: loading with full unpickling (--trust-pickle)", path)
        return torch.load(path, weights_only=False, **kwargs)
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as first:
        if "deepspeed" not in str(first):
            raise _unsafe(path, first) from None
    try:  # only now import DeepSpeed (slow) for its allow-listed classes
        with torch.serialization.safe_globals(_safe_classes()):
            return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        raise _unsafe(path, err) from None


def _unsafe(path: Path, err: Exception) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path}: refusing to load, it needs unsafe unpickling ({unsafe_global(err)}). If you made this file yourself, "
        "pass --trust-pickle (trust_pickle=True): that runs any code the file contains."
    )


def _load_state(path: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    if trust_pickle:
        return unwrap(load_torch_file(path, trust_pickle=True), str(path))
    try:
        return load_checkpoint(path)
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpointError(f"{err} Or, if you made this file yourself, pass --trust-pickle.") from None


class _TorchWithSafeLoad:
    """Stands in for the ``torch`` module inside ``zero_to_fp32`` so that its ``torch.load`` is ours."""

    def __init__(self, trust_pickle: bool) -> None:
        self._trust = trust_pickle

    def load(self, f: Any, map_location: Any = None, weights_only: Any = None, mmap: bool | None = None, **_: Any):
        return load_torch_file(f, trust_pickle=self._trust, mmap=mmap)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


@contextlib.contextmanager
def _zero_to_fp32(trust_pickle: bool) -> Iterator[Any]:
    from deepspeed.utils import zero_to_fp32

    real = zero_to_fp32.torch
    zero_to_fp32.torch = _TorchWithSafeLoad(trust_pickle)
    try:
        yield zero_to_fp32
    finally:
        zero_to_fp32.torch = real


# ---------------------------------------------------------------------------------------------- ZeRO
def zero_state_dict(tag_dir: str | Path, fp32: bool = False, trust_pickle: bool = False) -> ConvertedCheckpoint:
    """The module state dict of a ZeRO checkpoint folder (stage 0-2 ``module``; fp32 masters for stage 3
    or with ``fp32``), plus the ``minigpt_config`` it records."""
    tag_dir = Path(tag_dir)
    stage3 = not (tag_dir / MODEL_STATES).is_file() and (tag_dir / ZERO3_MODEL_STATES).is_file()
    meta_file = tag_dir / (ZERO3_MODEL_STATES if stage3 else MODEL_STATES)
    if not meta_file.is_file():
        raise FileNotFoundError(f"{tag_dir}: no {MODEL_STATES} (nor {ZERO3_MODEL_STATES}): not a ZeRO checkpoint")
    obj = load_torch_file(meta_file, trust_pickle)
    if not isinstance(obj, Mapping) or "module" not in obj:
        raise ValueError(f"{meta_file}: not a DeepSpeed model-states file (no 'module')")
    stage = (obj.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 3 if stage3 else None)
    report = ConversionReport()
    report.notes.append(
        f"DeepSpeed {obj.get('ds_version', '?')} checkpoint {tag_dir.name}, "
        f"ZeRO stage {stage if stage is not None else '?'}, step {obj.get('global_steps', '?')}"
    )
    if stage3 or fp32:
        if not any(tag_dir.glob("*_optim_states.pt")):
            raise FileNotFoundError(f"{tag_dir}: no *_optim_states.pt, so no fp32 master weights (drop --fp32)")
        out = io.StringIO()
        with _zero_to_fp32(trust_pickle) as z, contextlib.redirect_stdout(out):
            state = z.get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        log.debug("zero_to_fp32: %s", out.getvalue())
        state = dict(state)
        report.notes.append("weights: fp32 master copies rebuilt by deepspeed zero_to_fp32")
    else:
        state = unwrap(obj["module"], f"{meta_file} ['module']")
        empty = [k for k, v in state.items() if v.numel() == 0]
        if empty:
            raise ValueError(f"{meta_file}: {len(empty)} empty tensor(s) in 'module' (a ZeRO-3 partition?): use --fp32")
        dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in state.values() if v.is_floating_point()})
        report.notes.append(f"weights: 'module' as saved ({', '.join(dtypes) or 'no floats'})")
    config = obj.get(CONFIG_KEY)
    return ConvertedCheckpoint(_strip_wrappers(state), dict(config) if isinstance(config, Mapping) else None, report)


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a prefix every key shares (``module.``, ``_orig_mod.`` from DDP / torch.compile wrappers)."""
    for prefix in ("module.", "_orig_mod.", "_forward_module."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


# ---------------------------------------------------------------------------------------------- pipeline
def _layer_files(tag_dir: Path) -> dict[int, Path]:
    if any(_TP_LAYER_FILE.match(p.name) for p in tag_dir.iterdir()):
        raise ValueError(f"{tag_dir}: tensor-parallel layer files (layer_XX-model_YY-...) are not supported")
    files = {int(m[1]): p for p in tag_dir.iterdir() if (m := _LAYER_FILE.match(p.name))}
    if not files:
        raise FileNotFoundError(f"{tag_dir}: no layer_XX-model_states.pt files (not a pipeline checkpoint)")
    if 0 not in files:
        raise FileNotFoundError(f"{tag_dir}: no layer_00-model_states.pt (the vision/projector layer)")
    return dict(sorted(files.items()))


def llm_parameter_shapes(name_or_path: str, trust_remote_code: bool = False) -> tuple[dict[str, tuple], bool]:
    """Names and shapes of a causal LM's state dict (built on the meta device: nothing is loaded), and
    whether its LM head is tied to the input embedding."""
    model = meta_llm(name_or_path, trust_remote_code)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = out is not None and out.weight is emb.weight
    return shapes, tied


def pipeline_llm_names(base_names: list[str] | set[str] | Mapping[str, Any]) -> tuple[str, tuple[str, str, str, str]]:
    """Which :data:`PIPELINE_LLM_NAMES` layout the base LLM's parameter names follow."""
    names = set(base_names)
    for arch, (embed, block, _, _) in PIPELINE_LLM_NAMES.items():
        if embed in names and any(n.startswith(block.format(j=0)) for n in names):
            return arch, PIPELINE_LLM_NAMES[arch]
    sample = ", ".join(sorted(names)[:4])
    raise ValueError(
        "unsupported LLM architecture for pipeline checkpoints: expected LLaMA-style (model.embed_tokens, "
        "model.layers.N: LLaMA, Qwen2, Qwen3, Mistral) or Qwen(1) (transformer.wte, transformer.h.N) names; "
        f"got {sample}, ..."
    )


def map_pipeline_llm(
    layers: Mapping[int, Mapping[str, torch.Tensor]], base_shapes: Mapping[str, tuple], tied: bool
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Pipeline layer dicts -> the base LLM's names. Returns (state, ignored keys, notes); missing,
    surplus or misshaped tensors are an error."""
    arch, (embed, block, norm, head) = pipeline_llm_names(base_shapes)
    state: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    block_layers = [i for i, sd in layers.items() if any(k.startswith(f"{BLOCK}.") for k in sd)]
    first = block_layers[0] if block_layers else None
    if block_layers and block_layers != list(range(first, first + len(block_layers))):
        raise ValueError(f"pipeline block layers are not contiguous: {block_layers}")
    for i, sd in layers.items():
        for key, tensor in sd.items():
            if i == 0 and key == _EMBEDDING:
                name = embed
            elif i == 0:
                continue  # vision / projector: handled elsewhere
            elif key.startswith(f"{BLOCK}."):
                name = block.format(j=i - first) + key.removeprefix(f"{BLOCK}.")
            elif key.startswith(f"{FINAL_NORM}."):
                name = norm + key.removeprefix(f"{FINAL_NORM}.")
            elif key.startswith(f"{LM_HEAD}."):
                name = head + key.removeprefix(f"{LM_HEAD}.")
            else:
                ignored.append(f"layer_{i:02d}:{key}")
                continue
            if name in state:
                raise ValueError(f"two pipeline tensors map to {name}")
            state[name] = tensor
    surplus = sorted(set(state) - set(base_shapes))
    missing = sorted(set(base_shapes) - set(state) - ({head + "weight"} if tied else set()))
    if surplus or missing:
        raise ValueError(
            f"the pipeline LLM does not match the base LLM ({arch} names): "
            f"{len(missing)} missing (e.g. {', '.join(missing[:3])}), "
            f"{len(surplus)} surplus (e.g. {', '.join(surplus[:3])})"
        )
    wrong = [
        f"{k} {tuple(v.shape)} (base {base_shapes[k]})" for k, v in state.items() if tuple(v.shape) != base_shapes[k]
    ]
    if wrong:
        raise ValueError(f"pipeline LLM shape mismatch: {'; '.join(wrong[:5])}")
    n_blocks = len(block_layers)
    notes = [f"LLM ({arch} names): {n_blocks} blocks from pipeline layers {first}..{(first or 0) + n_blocks - 1}"]
    return state, ignored, notes


#: Projector key sets under ``visionpipe.llm_proj.`` -> minigpt projector type.
PIPELINE_PROJECTORS = {
    frozenset({"weight", "bias"}): "linear",
    frozenset({"0.weight", "0.bias", "2.weight", "2.bias"}): "mlp2x_gelu",
}
_PROJ = f"{PROJECTOR}."
_VISIONPIPE = f"{VISIONPIPE}."
_EMBEDDING = f"{EMBEDDING}.weight"


def pipeline_projector(layer0: Mapping[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    """Layer 0's ``visionpipe.llm_proj.*`` -> (projector type, float32 projector state): ``linear``
    (``weight``/``bias``) or ``mlp2x_gelu`` (``0.*`` and ``2.*``: Linear-GELU-Linear)."""
    state = {k.removeprefix(_PROJ): v for k, v in layer0.items() if k.startswith(_PROJ)}
    kind = PIPELINE_PROJECTORS.get(frozenset(state))
    if kind is None:
        raise ValueError(
            f"layer_00: no projector of a known type under {_PROJ}* (linear: weight/bias; mlp2x_gelu: "
            f"0.*/2.*); found {sorted(state) or 'none'}"
        )
    if kind == "mlp2x_gelu":
        (o0, i0), (o2, i2) = state["0.weight"].shape, state["2.weight"].shape
        if i2 != o0 or o2 != o0:
            raise ValueError(f"layer_00: mlp2x_gelu projector shapes do not chain: 0 {i0}->{o0}, 2 {i2}->{o2}")
    return kind, {k: v.to(torch.float32).contiguous() for k, v in state.items()}


def pipeline_state_dict(
    tag_dir: str | Path,
    base_llm: str | None = None,
    with_llm: bool = False,
    with_vision: bool = True,
    heads: int = 16,
    qformer_heads: int = 12,
    trust_remote_code: bool = False,
    trust_pickle: bool = False,
) -> tuple[ConvertedCheckpoint, Any]:
    """A pipeline checkpoint folder -> (MiniGPT-named state, LAVIS vision config or None).

    Always the projector (``linear`` or ``mlp2x_gelu``: ``converted.config["projector"]``); a trained vision
    encoder written by our pipeline strategy with its own names (``vision.*``) as it is; else the vision stack
    from layer 0's LAVIS-named ``visionpipe.*`` when ``with_vision`` (its ViT depth is what the file holds: the
    pipeline model was built with BLIP-2's 39 blocks); the LLM (mapped onto ``base_llm``'s names) only
    ``with_llm``: a frozen LLM equals its base.
    """
    tag_dir = Path(tag_dir)
    files = _layer_files(tag_dir)
    layer0 = _load_state(files[0], trust_pickle)
    kind, projector = pipeline_projector(layer0)
    report = ConversionReport()
    shapes = " -> ".join(
        str(projector[k].shape[1 - i])
        for i, k in enumerate(("weight", "weight") if kind == "linear" else ("0.weight", "2.weight"))
    )
    report.notes.append(f"{PROJECTOR}: {kind} projector ({shapes})")
    state = {f"projector.{k}": v for k, v in projector.items()}
    vision_config = None
    ours = {k: v for k, v in layer0.items() if k.startswith(f"{VISION}.")}
    vision_keys = [k for k in layer0 if k.startswith(_VISIONPIPE) and not k.startswith(_PROJ)]
    if ours and vision_keys:
        raise ValueError(
            f"layer_00 holds both {VISION}.* (minigpt names) and LAVIS-named {VISIONPIPE}.* vision tensors"
        )
    if ours:
        state.update(ours)
        report.notes.append(f"vision: {len(ours)} trained tensor(s) from layer_00 (vision.*)")
    elif with_vision and vision_keys:
        eva = {
            k.removeprefix(f"{_VISIONPIPE}visual_encoder."): v
            for k, v in layer0.items()
            if k.startswith(f"{_VISIONPIPE}visual_encoder.")
        }
        blip2_keys = tuple(_VISIONPIPE + k for k in ("ln_vision.", "Qformer.", "query_tokens"))
        blip2 = {k.removeprefix(_VISIONPIPE): v for k, v in layer0.items() if k.startswith(blip2_keys)}
        vision_config, vision_state, vision_report = convert_lavis_vision(
            eva, blip2, heads=heads, qformer_heads=qformer_heads, drop_last_block=False
        )
        state.update({f"vision.{k}": v for k, v in vision_state.items()})
        report.ignored += [f"layer_00:{_VISIONPIPE}{k}" for k in vision_report.ignored]
        report.notes.append(
            f"vision stack from layer_00 (ViT depth {vision_config.depth}, {vision_config.num_query_tokens} queries)"
        )
        report.notes += vision_report.notes
    elif vision_keys:
        report.notes.append(f"layer_00: {len(vision_keys)} {VISIONPIPE}.* tensors not used (vision given separately)")
    elif with_vision:
        report.notes.append("layer_00 holds no vision tensors: the vision encoder comes from its source")
    if with_llm:
        if not base_llm:
            raise ValueError("mapping the pipeline LLM needs the base LLM (--llm) for its names and config")
        base_shapes, tied = llm_parameter_shapes(base_llm, trust_remote_code)
        layers = {0: layer0, **{i: _load_state(p, trust_pickle) for i, p in files.items() if i}}
        llm, ignored, notes = map_pipeline_llm(layers, base_shapes, tied)
        state.update({f"llm.{k}": v for k, v in llm.items()})
        report.ignored += ignored
        report.notes += notes
    else:
        report.notes.append("LLM layers not read: the base LLM is used (pass --with-llm if the LLM was trained)")
    other0 = [k for k in layer0 if not k.startswith((_VISIONPIPE, f"{VISION}.")) and k != _EMBEDDING]
    report.ignored += [f"layer_00:{k}" for k in other0]
    return ConvertedCheckpoint(state, {"projector": kind}, report), vision_config


def _pipeline_client_config(tag_dir: Path, trust_pickle: bool, report: ConversionReport) -> dict[str, Any] | None:
    """The ``minigpt_config`` our pipeline strategy records in ``mp_rank_00_model_states.pt`` (client state)."""
    meta = tag_dir / MODEL_STATES
    if not meta.is_file():
        return None
    try:
        obj = load_torch_file(meta, trust_pickle)
    except UnsafeCheckpointError as err:  # e.g. an MPP run's own client state: the config then comes from options
        report.notes.append(f"{MODEL_STATES} not read ({err})")
        return None
    config = obj.get(CONFIG_KEY) if isinstance(obj, Mapping) else None
    return {k: v for k, v in config.items() if k != "format_version"} if isinstance(config, Mapping) else None


# ---------------------------------------------------------------------------------------------- writing
def _meta_llm(name_or_path: str, state: Mapping[str, torch.Tensor], trust_remote_code: bool) -> Any | None:
    """The LLM built on the meta device with ``state`` assigned, when ``state`` is complete; else None."""
    try:
        llm = meta_llm(name_or_path, trust_remote_code)
    except OSError as err:
        raise OSError(f"{err} (pass --llm)") from err
    own = llm.state_dict(keep_vars=True)
    emb, head = llm.get_input_embeddings(), llm.get_output_embeddings()
    tied: set[str] = set()
    if head is not None and head.weight is emb.weight:  # the head's names may be absent; the embedding's not
        emb_name = next(n for n, m in llm.named_modules() if m is emb) + ".weight"
        tied = {n for n, v in own.items() if v is emb.weight} - {emb_name}
    missing = set(own) - set(state) - tied
    if missing or set(state) - set(own):
        return None
    wrong = [k for k in state if tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        raise ValueError(f"llm: shape mismatch for {', '.join(wrong[:5])}")
    llm.load_state_dict(dict(state), strict=False, assign=True)
    llm.tie_weights()  # assign broke ties (and fills an absent tied head); a no-op for untied models
    return llm.eval()


def _load_part(module: torch.nn.Module, part: str, state: Mapping[str, torch.Tensor], source: str | None) -> str:
    """Copy ``state`` into ``module``; tensors it lacks must come from ``source`` (else an error)."""
    own = module.state_dict()
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise ValueError(
            f"{part}: {len(unexpected)} unexpected tensor(s) in the checkpoint, e.g. "
            f"{', '.join(unexpected[:4])} (LoRA/peft-wrapped or another architecture?)"
        )
    wrong = [f"{k} {tuple(v.shape)} (model {tuple(own[k].shape)})" for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"{part}: shape mismatch: {'; '.join(wrong[:5])}")
    missing = sorted(set(own) - set(state))
    if missing and source is None:
        raise ValueError(
            f"{part}: {len(missing)} tensor(s) neither in the checkpoint nor in a recorded source, "
            f"e.g. {', '.join(missing[:4])}"
        )
    module.load_state_dict(dict(state), strict=False)
    if not missing:
        return f"{part}: all {len(state)} tensors from the checkpoint"
    return f"{part}: {len(state)} tensors from the checkpoint, {len(missing)} from {source}"


def write_model_dir(
    converted: ConvertedCheckpoint, config: Any, out: str | Path, full: bool = False, vision_file: Path | None = None
) -> list[str]:
    """Build a MiniGPT from ``config`` with ``converted.state`` loaded and ``save_pretrained`` it to ``out``.

    Parts absent from the checkpoint come from the config's sources (``llm``, ``vision_weights``) or, for the
    vision encoder, from ``vision_file`` (a model directory's ``vision.safetensors``: then written into ``out``).
    With ``full`` every part is written (a self-contained folder); otherwise as training writes its results
    (``trainable_only``: frozen parts with a recorded source are referenced, not copied). A frozen vision encoder
    whose checkpoint tensors differ from its source's is written too.
    """
    from safetensors.torch import load_file

    from ..model.config import MiniGPTConfig
    from ..model.minigpt import MiniGPT
    from ..model.processor import MiniGPTProcessor

    state, report = converted.state, converted.report
    parts = {
        part: {k[len(part) + 1 :]: v for k, v in state.items() if k.startswith(part + ".")}
        for part in ("vision", "projector", "llm")
    }
    others = sorted(k for k in state if not k.startswith(("vision.", "projector.", "llm.")))
    if others:
        raise ValueError(
            f"{len(others)} key(s) outside vision./projector./llm. (not a MiniGPT state dict): {', '.join(others[:5])}"
        )
    if not parts["projector"]:
        raise ValueError("the checkpoint has no projector.* tensors")
    build = MiniGPTConfig.from_dict(config.to_dict())
    if build.vision_weights and not Path(build.vision_weights).is_dir():
        if not parts["vision"]:
            raise FileNotFoundError(
                f"vision_weights {build.vision_weights} does not exist and the checkpoint "
                "has no vision tensors: pass --vision DIR"
            )
        report.notes.append(f"vision_weights {build.vision_weights} not found: the checkpoint's vision is used")
        build.vision_weights = None
    if not parts["vision"] and not build.vision_weights and vision_file is None:
        raise ValueError(
            "the vision encoder is neither in the checkpoint nor recorded (vision_weights): pass --vision "
            "DIR (a vision folder, or a model directory such as the run's final/)"
        )
    llm = _meta_llm(build.llm, parts["llm"], build.trust_remote_code) if parts["llm"] else None
    model = MiniGPT.build(build, llm=llm)
    vision_source = build.vision_weights
    if vision_file is not None:
        _load_part(model.vision, f"--vision {vision_file}", load_file(vision_file), None)
        vision_source = str(vision_file)
    differs = vision_source is not None and _differs(model.vision, parts["vision"])
    vision_note = len(report.notes)
    if parts["vision"]:
        report.notes.append(
            _load_part(model.vision, "vision", parts["vision"], vision_source)
            + (f"; they differ from {vision_source}" if differs else "")
        )
    else:
        report.notes.append(f"vision: from {vision_source}")
    report.notes.append(_load_part(model.projector, "projector", parts["projector"], None))
    if llm is not None:
        report.notes.append(f"llm: all {len(parts['llm'])} tensors from the checkpoint")
    elif parts["llm"]:
        report.notes.append(_load_part(model.llm, "llm", parts["llm"], build.llm))
    else:
        report.notes.append(f"llm: from {build.llm}")
    model.apply_freeze(build.freeze)
    written = model.save_pretrained(out, trainable_only=not full, include=("vision",) if differs else ())
    if parts["vision"] and "vision" not in written:
        report.notes[vision_note] = (
            f"vision: the checkpoint's {len(parts['vision'])} tensors equal {vision_source}, "
            "which the folder refers to (not copied)"
        )
    MiniGPTProcessor.from_config(build).save_pretrained(out)
    return written


def _differs(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a tensor of ``state`` differs from ``module``'s (compared in the checkpoint's dtype)."""
    own = module.state_dict()
    return any(k in own and not torch.equal(own[k].to(v.dtype), v) for k, v in state.items())


@dataclass(frozen=True)
class DeepSpeedConversion:
    """What :func:`convert_deepspeed` reads and writes.

    Reading: ``tag`` (the checkpoint tag folder; None: ``latest``, else the highest ``global_stepN``), ``fp32``
    (ZeRO: rebuild fp32 master weights from the optimizer files), ``with_llm`` (pipeline: the LLM weights from the
    layer files), ``heads``/``qformer_heads`` (attention heads, not readable from weights), ``trust_pickle``.
    The model config: ``config`` (a :class:`MiniGPTConfig`, its dict, or a path: a ``config.json`` or a model
    directory) when the checkpoint records none; ``llm``/``vision``/``template``/``llm_dtype`` override its fields;
    ``trust_remote_code``. Writing: ``full`` stores every part."""

    tag: str | None = None
    config: Any = None
    llm: str | None = None
    vision: str | None = None
    template: str | None = None
    with_llm: bool = False
    fp32: bool = False
    heads: int = 16
    qformer_heads: int = 12
    llm_dtype: str | None = None
    full: bool = False
    trust_pickle: bool = False
    trust_remote_code: bool = False


def convert_deepspeed(
    checkpoint: str | Path, out: str | Path, conversion: DeepSpeedConversion = DeepSpeedConversion()
) -> tuple[list[str], ConversionReport]:
    """A ZeRO or pipeline checkpoint folder -> a model directory (see the module docstring and
    :class:`DeepSpeedConversion`). Returns the parts written and the report."""
    from ..model.config import CONFIG_FILE, REMOTE_CODE_IGNORED, MiniGPTConfig

    c = conversion
    with_llm = c.with_llm  # turned on below where a recorded config trains the LLM

    tag_dir = resolve_tag_dir(checkpoint, c.tag)
    overrides: dict[str, Any] = {}
    vision_file = None
    if c.llm:
        overrides["llm"] = c.llm
    if c.vision:
        vision_overrides, vision_file = _vision_option(Path(c.vision))
        overrides.update(vision_overrides)
    if c.template:
        overrides["template"] = c.template
    if c.llm_dtype:
        overrides["llm_dtype"] = c.llm_dtype
    overrides["trust_remote_code"] = c.trust_remote_code  # the call's flag, never a recorded config's

    if any(_LAYER_FILE.match(p.name) or _TP_LAYER_FILE.match(p.name) for p in tag_dir.iterdir()):
        if c.fp32:
            raise ValueError("--fp32 applies to ZeRO checkpoints, not pipeline layer files")
        report = ConversionReport()
        recorded = _pipeline_client_config(tag_dir, c.trust_pickle, report)
        given = _config_dict(c.config)
        if recorded is not None and given is not None:
            report.notes.append(f"--config ignored: the checkpoint records its {CONFIG_KEY}")
        source = recorded if recorded is not None else (given or {})
        recorded_trust = bool(source.get("trust_remote_code"))
        base = overrides.get("llm") or source.get("llm")
        if not base:
            raise ValueError("a pipeline checkpoint needs the base LLM: pass --llm")
        freeze = {"vision": True, "qformer": True, "projector": False, "llm": True, **(source.get("freeze") or {})}
        if recorded is not None and not freeze["llm"] and not with_llm:
            with_llm = True
            report.notes.append(f"the recorded {CONFIG_KEY} trains the LLM: its layers are read (as --with-llm)")
        converted, vision_config = pipeline_state_dict(
            tag_dir,
            base,
            with_llm=with_llm,
            with_vision=not c.vision,
            heads=c.heads,
            qformer_heads=c.qformer_heads,
            trust_pickle=c.trust_pickle,
            trust_remote_code=c.trust_remote_code,
        )
        converted.report.notes[:0] = report.notes
        kind = converted.config["projector"]
        if source.get("projector") not in (None, kind):
            raise ValueError(f"the layer files hold a {kind} projector, the config says {source['projector']!r}")
        data = {"template": "chatml", **source, "llm": base}
        data["freeze"] = {**freeze, "llm": not with_llm}
        if vision_config is not None:
            data["vision"], data["vision_weights"] = vision_config.to_dict(), None
        data.update({k: v for k, v in overrides.items() if k != "llm"})
        data["projector"] = kind
        converted.config = recorded
    else:
        if with_llm:
            raise ValueError("--with-llm applies to pipeline checkpoints; a ZeRO checkpoint holds what was saved")
        converted = zero_state_dict(tag_dir, fp32=c.fp32, trust_pickle=c.trust_pickle)
        data = converted.config or _config_dict(c.config)
        if data is None:
            raise ValueError(
                f"{tag_dir} records no {CONFIG_KEY} (client_state): pass --config "
                f"(a model directory or its {CONFIG_FILE})"
            )
        data = {k: v for k, v in data.items() if k != "format_version"}
        recorded_trust = bool(data.get("trust_remote_code"))
        data.update(overrides)
        if converted.config is not None and c.config is not None:
            converted.report.notes.append(f"--config ignored: the checkpoint records its {CONFIG_KEY}")
    if recorded_trust and not c.trust_remote_code:
        converted.report.notes.append(f"the recorded {CONFIG_KEY} {REMOTE_CODE_IGNORED}")
    written = write_model_dir(converted, MiniGPTConfig.from_dict(data), out, full=c.full, vision_file=vision_file)
    return written, converted.report


def _vision_option(path: Path) -> tuple[dict[str, Any], Path | None]:
    """``--vision DIR`` -> (config overrides, weights file to copy). A vision folder (``vision_config.json``) is
    recorded as the source; a model directory (e.g. the run's own ``final/``) gives its vision config and its
    ``vision.safetensors`` (copied), or the vision source it records."""
    import json

    from ..model.config import CONFIG_FILE
    from ..model.vision import VISION_CONFIG, VISION_WEIGHTS

    if (path / VISION_CONFIG).is_file():
        return {"vision_weights": str(path.resolve()), "vision": json.loads((path / VISION_CONFIG).read_text())}, None
    recorded = json.loads((path / CONFIG_FILE).read_text()) if (path / CONFIG_FILE).is_file() else {}
    if not isinstance(recorded.get("vision"), Mapping):
        raise FileNotFoundError(
            f"--vision {path}: neither a vision folder ({VISION_CONFIG}) nor a minigpt model "
            f"directory ({CONFIG_FILE} with a vision section)"
        )
    if (path / VISION_WEIGHTS).is_file():
        return {"vision_weights": None, "vision": recorded["vision"]}, path / VISION_WEIGHTS
    if not recorded.get("vision_weights"):
        raise FileNotFoundError(
            f"--vision {path}: the model directory has no {VISION_WEIGHTS} and records no vision_weights"
        )
    return {"vision_weights": recorded["vision_weights"], "vision": recorded["vision"]}, None


def _config_dict(config: Any) -> dict[str, Any] | None:
    import json

    from ..model.config import CONFIG_FILE

    if config is None:
        return None
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if isinstance(config, Mapping):
        return dict(config)
    path = Path(config)
    if path.is_dir():
        path = path / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--config {config}: no such file or model directory")
    return {k: v for k, v in json.loads(path.read_text()).items() if k != "format_version"}
