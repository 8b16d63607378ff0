"""Convert LAVIS / MiniGPT-4 / transformers BLIP-2 checkpoints onto :class:`Blip2VisionEncoder` names.

Our names are those of transformers' ``Blip2ForConditionalGeneration``. LAVIS names map through
:data:`LAVIS_RULES`; EVA's ``attn.q_bias``/``attn.v_bias`` become ``self_attn.qkv.bias = cat(q, 0, v)``.
Like LAVIS (``load_state_dict(strict=False)``), keys the model has no place for are ignored and reported;
keys it needs but the files lack are an error. A vision-encoder directory holds ``vision_config.json`` +
``vision.safetensors`` (:func:`save_vision`, :func:`load_vision_folder`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import Blip2Config, Blip2VisionConfig

from minigpt.model.projector import projector_state
from minigpt.model.vision import (
    VISION_CONFIG,
    Blip2VisionEncoder,
    VisionConfig,
    load_vision_folder,
    save_vision,
    vision_encoder,
)
from minigpt.safe_load import load_checkpoint, unwrap

__all__ = [
    "ConversionReport",
    "MissingKeysError",
    "load_checkpoint",
    "vision_config_from_lavis",
    "convert_lavis_vision",
    "convert_minigpt4_projector",
    "save_projector",
    "convert_hf_blip2",
    "checkpoint_vision",
    "is_hf_blip2",
    "save_vision",
    "load_vision_source",
]

StateDict = dict[str, torch.Tensor]
Source = str | Path | Mapping[str, torch.Tensor]

HF_PREFIXES = ("vision_model.", "qformer.", "query_tokens")

#: (LAVIS name, our name); ``{i}``/``{n}`` are numbers, ``{a}`` one name part, ``{r}`` the rest. First match wins.
LAVIS_RULES = [
    ("cls_token", "vision_model.embeddings.class_embedding"),
    ("pos_embed", "vision_model.embeddings.position_embedding"),
    ("patch_embed.proj.{r}", "vision_model.embeddings.patch_embedding.{r}"),
    ("blocks.{i}.norm{n}.{r}", "vision_model.encoder.layers.{i}.layer_norm{n}.{r}"),
    ("blocks.{i}.attn.proj.{r}", "vision_model.encoder.layers.{i}.self_attn.projection.{r}"),
    ("blocks.{i}.attn.{r}", "vision_model.encoder.layers.{i}.self_attn.{r}"),  # qkv.weight, q_bias, v_bias
    ("blocks.{i}.mlp.{r}", "vision_model.encoder.layers.{i}.mlp.{r}"),
    ("ln_vision.{r}", "vision_model.post_layernorm.{r}"),
    ("query_tokens", "query_tokens"),
    ("Qformer.bert.embeddings.LayerNorm.{r}", "qformer.layernorm.{r}"),
    ("Qformer.bert.encoder.layer.{i}.{a}.self.{r}", "qformer.encoder.layer.{i}.{a}.attention.{r}"),
    ("Qformer.bert.encoder.{r}", "qformer.encoder.{r}"),
]
_FIELDS = {"i": r"\d+", "n": r"\d+", "a": r"[^.]+", "r": r".+"}


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w)\}", template)
    pattern = "".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>{_FIELDS[p]})" for k, p in enumerate(parts))
    return re.compile(pattern)


_RULES = [(_compile(src), src, _compile(dst), dst) for src, dst in LAVIS_RULES]


def _lavis_to_ours(name: str) -> str | None:
    for src_re, _, _, dst in _RULES:
        if m := src_re.fullmatch(name):
            return dst.format(**m.groupdict())
    return None


def _ours_to_lavis(name: str) -> str:
    """LAVIS name(s) of one of our keys, for error messages."""
    if name.endswith("self_attn.qkv.bias"):
        stem = _ours_to_lavis(name.removesuffix("qkv.bias") + "q_bias").removesuffix("q_bias")
        return f"{stem}q_bias + {stem}v_bias"
    for _, src, dst_re, _ in _RULES:
        if m := dst_re.fullmatch(name):
            return src.format(**m.groupdict())
    return name


class MissingKeysError(ValueError):
    """The checkpoint lacks tensors the encoder needs (named as in the source)."""


@dataclass
class ConversionReport:
    """What a conversion left out (source key names) and what else is worth knowing."""

    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"note: {n}" for n in self.notes]
        if self.ignored:
            lines.append(f"ignored {len(self.ignored)} key(s): {', '.join(self.ignored)}")
        return "\n".join(lines)


def _state(source: Source) -> StateDict:
    return load_checkpoint(source) if isinstance(source, (str, Path)) else unwrap(source)


def _fuse_qv_bias(state: StateDict) -> None:
    """``*.q_bias`` + ``*.v_bias`` -> ``*.qkv.bias = cat(q, 0, v)`` (EVA and old transformers layouts)."""
    for q_key in [k for k in state if k.endswith(".q_bias")]:
        stem = q_key.removesuffix("q_bias")
        if stem + "v_bias" in state:
            q, v = state.pop(q_key), state.pop(stem + "v_bias")
            state[stem + "qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])


def _rename_lavis(eva_state: Source, blip2_state: Source, drop_last_block: bool) -> tuple[StateDict, list[str]]:
    """Our-named tensors and the source keys no rule matched (or in the dropped last block).

    ``visual_encoder.*`` keys of the BLIP-2 file override the EVA file, as LAVIS' second load does.
    """
    source = dict(_state(eva_state))
    source.update({k.removeprefix("visual_encoder."): v for k, v in _state(blip2_state).items()})
    blocks = {int(m[1]) for k in source if (m := re.match(r"blocks\.(\d+)\.", k))}
    last = max(blocks) if drop_last_block and blocks else None
    state: StateDict = {}
    unmatched = []
    for key, tensor in source.items():
        name = _lavis_to_ours(key)
        if name is None or (last is not None and key.startswith(f"blocks.{last}.")):
            unmatched.append(key)
        else:
            state[name] = tensor
    _fuse_qv_bias(state)
    return state, unmatched


def _count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    return len({m[1] for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})


def _infer_config(
    state: Mapping[str, torch.Tensor], heads: int, qformer_heads: int, describe: Callable[[str], str] = str
) -> VisionConfig:
    """Architecture from tensor shapes (our names); head counts cannot be inferred."""

    def need(key: str) -> torch.Tensor:
        if key not in state:
            raise MissingKeysError(f"missing required key: {describe(key)}")
        return state[key]

    width = need("vision_model.embeddings.class_embedding").shape[-1]
    patch = need("vision_model.embeddings.patch_embedding.weight").shape[-1]
    patches = need("vision_model.embeddings.position_embedding").shape[1] - 1
    grid = math.isqrt(patches)
    if grid * grid != patches:
        raise ValueError(f"{describe('vision_model.embeddings.position_embedding')}: {patches} patches, no square")
    queries = need("query_tokens")
    qformer_depth = _count(state, "qformer.encoder.layer.")
    cross_re = re.compile(r"qformer\.encoder\.layer\.(\d+)\.crossattention\.")
    cross = sorted({int(m[1]) for k in state if (m := cross_re.match(k))})
    freq = cross[1] - cross[0] if len(cross) > 1 else max(qformer_depth, 1)
    if cross != list(range(0, qformer_depth, freq)):
        raise ValueError(f"cross-attention on Q-Former layers {cross} is not every k-th layer from layer 0")
    for name, dim, count, flag in (
        ("ViT", width, heads, "--heads"),
        ("Q-Former", queries.shape[2], qformer_heads, "--qformer-heads"),
    ):
        if dim % count:
            fits = ", ".join(str(h) for h in (1, 2, 4, 8, 12, 16, 32) if h < dim and dim % h == 0)
            raise ValueError(
                f"{name} width {dim} is not divisible by {count} heads: give its head count with {flag} "
                f"(the weights do not record it; one that divides {dim}, e.g. {fits})"
            )
    return VisionConfig(
        image_size=grid * patch,
        patch_size=patch,
        width=width,
        depth=_count(state, "vision_model.encoder.layers."),
        heads=heads,
        mlp_dim=need("vision_model.encoder.layers.0.mlp.fc1.weight").shape[0],
        num_query_tokens=queries.shape[1],
        qformer_width=queries.shape[2],
        qformer_depth=qformer_depth,
        qformer_heads=qformer_heads,
        qformer_mlp_dim=need("qformer.encoder.layer.0.intermediate_query.dense.weight").shape[0],
        cross_attention_freq=freq,
    )


def _select(
    config: VisionConfig, state: StateDict, describe: Callable[[str], str] = str
) -> tuple[StateDict, ConversionReport]:
    """Keep the keys the encoder has (float32), check shapes, report the rest; missing keys raise."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Blip2VisionEncoder(config).state_dict().items()}
    missing = [describe(k) for k in shapes if k not in state]
    if missing:
        raise MissingKeysError(f"missing {len(missing)} required key(s): {', '.join(missing)}")
    wrong = [f"{describe(k)} {tuple(state[k].shape)} (need {s})" for k, s in shapes.items() if state[k].shape != s]
    if wrong:
        raise ValueError(f"shape mismatch: {'; '.join(wrong)}")
    report = ConversionReport(ignored=[describe(k) for k in state if k not in shapes])
    upcast = sorted({str(state[k].dtype) for k in shapes if state[k].dtype != torch.float32})
    if upcast:
        report.notes.append(f"upcast {', '.join(upcast)} to torch.float32")
    return {k: state[k].to(torch.float32).contiguous() for k in shapes}, report


def vision_config_from_lavis(
    eva_state: Source, blip2_state: Source, heads: int = 16, qformer_heads: int = 12, drop_last_block: bool = True
) -> VisionConfig:
    """Infer the architecture from an ``eva_vit_g.pth``-style and a ``blip2_pretrained*.pth``-style state.

    ``drop_last_block``: BLIP-2 builds 39 blocks and loads the 40-block EVA file with strict=False.
    """
    state, _ = _rename_lavis(eva_state, blip2_state, drop_last_block)
    return _infer_config(state, heads, qformer_heads, _ours_to_lavis)


def convert_lavis_vision(
    eva_state: Source,
    blip2_state: Source,
    heads: int = 16,
    qformer_heads: int = 12,
    drop_last_block: bool = True,
) -> tuple[VisionConfig, StateDict, ConversionReport]:
    """LAVIS EVA ViT + BLIP-2 (``ln_vision``, Q-Former, queries) -> (config, our float32 state, report)."""
    state, unmatched = _rename_lavis(eva_state, blip2_state, drop_last_block)
    config = _infer_config(state, heads, qformer_heads, _ours_to_lavis)
    out, report = _select(config, state, _ours_to_lavis)
    report.ignored = unmatched + report.ignored
    return config, out, report


def convert_minigpt4_projector(ckpt: Source) -> tuple[StateDict, ConversionReport]:
    """``llama_proj`` (MiniGPT-4), ``llm_proj`` (MiniGPT4Qwen), ``visionpipe.llm_proj`` (MPP pipeline
    ``layer_00-model_states.pt``) or ``language_projection`` (a transformers BLIP-2 folder) -> float32
    ``{"weight", "bias"}`` of an ``nn.Linear``."""
    state = _hf_weights(Path(ckpt), ("language_projection.",)) if is_hf_blip2(ckpt) else _state(ckpt)
    try:
        out, prefix = projector_state(state)
    except ValueError as err:
        raise MissingKeysError(str(err)) from None
    out_dim, in_dim = out["weight"].shape
    used = {prefix + name for name in out}
    ignored = [k for k in state if k not in used]
    notes = [f"{prefix.rstrip('.')}: in {in_dim} -> out {out_dim}"]
    vision = [k for k in ignored if _lavis_to_ours(k.removeprefix("visual_encoder.")) is not None]
    if vision:
        notes.append(
            f"{len(vision)} key(s) belong to the vision stack (e.g. {vision[0]}: a trained Q-Former), not "
            "to a projector; 'minigpt convert assemble' loads them into the model"
        )
    return out, ConversionReport(ignored=ignored, notes=notes)


def save_projector(ckpt: str | Path, out: str | Path) -> tuple[StateDict, ConversionReport]:
    """:func:`convert_minigpt4_projector` written to ``out``, a ``.safetensors`` file (its folder created) whose
    metadata names the source file; returns the state and the report."""
    from minigpt.files import save_safetensors

    if not str(out).endswith(".safetensors"):
        raise ValueError(f"--out {out}: the projector is written as .safetensors")
    state, report = convert_minigpt4_projector(ckpt)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, out, metadata={"format": "pt", "source": Path(ckpt).name})
    return state, report


def checkpoint_vision(config: VisionConfig, ckpt: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    """The vision-stack tensors a MiniGPT-4 / MiniGPT4Qwen checkpoint holds besides its projector (a trained
    Q-Former: ``query_tokens``, ``Qformer.bert.*``; ``ln_vision.*``, ``visual_encoder.*``), on our names, in
    float32, for an encoder of ``config``; and the checkpoint keys they came from. Text-side Q-Former keys have no
    place in the encoder and are left out (not returned); a tensor of the wrong shape is an error."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Blip2VisionEncoder(config).state_dict().items()}
    renamed: StateDict = {}
    sources: dict[str, list[str]] = {}
    for key, tensor in unwrap(ckpt).items():
        name = _lavis_to_ours(key.removeprefix("visual_encoder."))
        if name is not None:
            renamed[name] = tensor
            sources[name] = [key]
    for q_key in [k for k in renamed if k.endswith(".q_bias")]:  # EVA's q/v biases become one qkv.bias
        stem = q_key.removesuffix("q_bias")
        sources[stem + "qkv.bias"] = sources.pop(q_key) + sources.pop(stem + "v_bias", [])
    _fuse_qv_bias(renamed)
    kept = {k: v for k, v in renamed.items() if k in shapes}
    wrong = [
        f"{_ours_to_lavis(k)} {tuple(v.shape)} (need {shapes[k]})" for k, v in kept.items() if v.shape != shapes[k]
    ]
    if wrong:
        raise ValueError(f"the checkpoint's vision tensors do not fit the vision encoder: {'; '.join(wrong)}")
    return {k: v.to(torch.float32).contiguous() for k, v in kept.items()}, [s for k in kept for s in sources[k]]


def is_hf_blip2(path: str | Path | Mapping[str, torch.Tensor]) -> bool:
    """Whether ``path`` is a transformers BLIP-2 folder (``config.json`` with ``model_type`` ``blip-2``)."""
    if not isinstance(path, (str, Path)) or not (Path(path) / "config.json").is_file():
        return False
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type") == "blip-2"
    except (json.JSONDecodeError, AttributeError):
        return False


def _hf_weights(directory: Path, prefixes: tuple[str, ...] = HF_PREFIXES) -> StateDict:
    """The tensors under ``prefixes`` of a transformers checkpoint (the rest, e.g. the language model, is never
    read)."""
    state: StateDict = {}
    if files := sorted(directory.glob("*.safetensors")):
        for file in files:
            with safe_open(file, "pt") as f:
                state.update({k: f.get_tensor(k) for k in f.keys() if k.startswith(prefixes)})
    else:
        for file in sorted(directory.glob("pytorch_model*.bin")):
            state.update({k: v for k, v in load_checkpoint(file).items() if k.startswith(prefixes)})
    if not state:
        raise FileNotFoundError(
            f"{directory}: no {' / '.join(p.rstrip('.') for p in prefixes)} weights in "
            "*.safetensors or pytorch_model*.bin"
        )
    return state


def _config_from_hf(hf: Blip2Config) -> VisionConfig:
    v, q = hf.vision_config, hf.qformer_config
    if v.hidden_act != "gelu" or q.hidden_act != "gelu" or not v.qkv_bias:
        raise ValueError(f"unsupported BLIP-2 variant: act {v.hidden_act}/{q.hidden_act}, qkv_bias {v.qkv_bias}")
    if q.encoder_hidden_size != v.hidden_size:
        raise ValueError(f"Q-Former encoder_hidden_size {q.encoder_hidden_size} != ViT width {v.hidden_size}")
    return VisionConfig(
        image_size=v.image_size,
        patch_size=v.patch_size,
        width=v.hidden_size,
        depth=v.num_hidden_layers,
        heads=v.num_attention_heads,
        mlp_dim=v.intermediate_size,
        vit_eps=v.layer_norm_eps,
        num_query_tokens=hf.num_query_tokens,
        qformer_width=q.hidden_size,
        qformer_depth=q.num_hidden_layers,
        qformer_heads=q.num_attention_heads,
        qformer_mlp_dim=q.intermediate_size,
        qformer_eps=q.layer_norm_eps,
        cross_attention_freq=q.cross_attention_frequency,
    )


def convert_hf_blip2(
    directory_or_state: Source, heads: int = 16, qformer_heads: int = 12
) -> tuple[VisionConfig, StateDict, ConversionReport]:
    """A transformers BLIP-2 directory (config.json + weights) or state dict -> (config, state, report).

    From a directory the architecture comes from its config.json; from a state dict it is inferred
    from shapes (then ``heads``/``qformer_heads`` apply). ``ln_vision`` keeps LAVIS' eps 1e-5.
    """
    if isinstance(directory_or_state, Mapping):
        state = {k: v for k, v in unwrap(directory_or_state).items() if k.startswith(HF_PREFIXES)}
        config, hf_eps = _infer_config(state, heads, qformer_heads), Blip2VisionConfig().layer_norm_eps
    else:
        directory = Path(directory_or_state)
        hf = Blip2Config.from_pretrained(directory)
        config, state, hf_eps = _config_from_hf(hf), _hf_weights(directory), hf.vision_config.layer_norm_eps
    _fuse_qv_bias(state)
    out, report = _select(config, state)
    report.notes.insert(0, f"post_layernorm eps {config.ln_vision_eps} (LAVIS ln_vision), not transformers' {hf_eps}")
    return config, out, report


def load_vision_source(directory: str | Path) -> Blip2VisionEncoder:
    """A vision folder (:func:`minigpt.model.vision.save_vision`), or a transformers BLIP-2 folder (converted as
    ``convert hf-blip2`` does) -> encoder in eval mode (strict load, no random init)."""
    directory = Path(directory)
    if (directory / VISION_CONFIG).is_file():
        return load_vision_folder(directory)
    if not is_hf_blip2(directory):
        raise FileNotFoundError(
            f"{directory}: not a vision encoder folder ({VISION_CONFIG}, from 'minigpt convert lavis' or 'hf-blip2') "
            "nor a transformers BLIP-2 folder (config.json with model_type blip-2)"
        )
    config, state, _ = convert_hf_blip2(directory)
    return vision_encoder(config, state)
