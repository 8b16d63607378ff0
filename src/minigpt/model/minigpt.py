"""MiniGPT: frozen vision encoder (+ Q-Former) -> projector -> a Hugging Face causal LM.

The model is an ``nn.Module`` and nothing more: pixels -> visual tokens, visual tokens written into their slots
among the token embeddings, the LLM body, and the LM head + cross-entropy on the answer tokens only. Turning
conversations into batches is the processor's job (:mod:`minigpt.model.processor`); decoding is the engine's
(:mod:`minigpt.infer.engine`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from textwrap import shorten
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from ..data.packing import additive_mask
from ..data.tokenize import ModelBatch, TextBatch, image_positions, next_token_targets
from ..device import parse_dtype
from ..files import respect_umask, save_safetensors
from ..safe_load import load_safetensors
from .config import CONFIG_FILE, PARTS, REMOTE_CODE_IGNORED, MiniGPTConfig, read_config, write_config
from .llm import decoder_body, is_quantized, load_llm, load_lora_adapter
from .loss import linear_cross_entropy, resolve_loss_impl
from .projector import build_projector, load_projector_weights
from .vision import Blip2VisionEncoder, load_vision_folder

log = logging.getLogger(__name__)

#: The saved parts of a model directory besides ``config.json`` (the LLM is a transformers folder, ``llm/``).
PART_FILES = {"vision": "vision.safetensors", "projector": "projector.safetensors"}
LLM_DIR = "llm"
#: A peft LoRA adapter over the recorded base LLM (``config.llm``): what QLoRA training saves instead of ``llm/``.
ADAPTER_DIR = "llm_adapter"


@dataclass
class MiniGPTOutput:
    loss: torch.Tensor | None
    num_tokens: int  # supervised tokens in the batch


class MiniGPT(nn.Module):
    """The composed model. Build with :meth:`build` (from a config) or :meth:`from_pretrained` (a directory)."""

    def __init__(
        self, config: MiniGPTConfig, vision: Blip2VisionEncoder, projector: nn.Module, llm: PreTrainedModel
    ) -> None:
        super().__init__()
        self.config = config
        self.vision = vision
        self.projector = projector
        self.llm = llm
        #: How the loss is computed: auto, plain, chunked or liger (:mod:`minigpt.model.loss`); training sets it.
        self.loss_impl = "auto"
        self.apply_freeze(config.freeze)

    # ------------------------------------------------------------------ building, loading, saving
    @classmethod
    def build(
        cls,
        config: MiniGPTConfig,
        llm: PreTrainedModel | None = None,
        llm_kwargs: dict[str, Any] | None = None,
        init_from: str | Path | None = None,
    ) -> MiniGPT:
        """Build from a config: vision weights from ``vision_weights`` (random init if None), the LLM from
        ``config.llm`` unless given (``llm_kwargs`` go to its ``from_pretrained``, e.g. a quantization config), and a
        fresh (or ``projector_weights``) projector. ``init_from``: a model directory whose saved parts (``llm/``,
        vision encoder, projector) replace those; its LoRA adapter (``llm_adapter/``) goes onto the LLM (merged,
        unless ``llm_kwargs`` quantize it)."""
        init = Path(init_from) if init_from is not None else None
        if init is not None:
            read_config(init)  # a clear error when it is not a model directory
        vision = load_vision_encoder(config, init)
        if llm is None:
            source, gguf = (
                (str(init / LLM_DIR), None)
                if init is not None and (init / LLM_DIR).is_dir()
                else (config.llm, config.llm_gguf_file)
            )
            llm = load_llm(source, config.llm_dtype, gguf, config.trust_remote_code, **(llm_kwargs or {}))
            if init is not None and (init / ADAPTER_DIR).is_dir():
                llm = load_lora_adapter(llm, init / ADAPTER_DIR)
        projector = build_projector(config.projector, vision.out_dim, llm.get_input_embeddings().embedding_dim)
        saved = init / PART_FILES["projector"] if init is not None else None
        if saved is not None and saved.is_file():
            load_saved_part(projector, saved, "projector")
        elif config.projector_weights:
            projector.load_state_dict(load_projector_weights(config.projector_weights))
        return cls(config, vision, projector, llm)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        llm_kwargs: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
        **overrides: Any,
    ) -> MiniGPT:
        """Load a directory written by :meth:`save_pretrained`. Parts not stored there come from the sources its
        config records (``llm``, ``vision_weights``); ``overrides`` change config fields; ``llm_kwargs`` go to the
        LLM's ``from_pretrained``. The LLM's own code runs only with ``trust_remote_code=True`` here: a directory
        cannot turn it on for itself."""
        config = load_model_config(directory, trust_remote_code, **overrides)
        return cls.build(config, llm_kwargs=llm_kwargs, init_from=directory)

    def save_pretrained(
        self, directory: str | Path, trainable_only: bool = False, include: Sequence[str] = ()
    ) -> list[str]:
        """Write ``config.json`` and the parts as safetensors (the LLM as a transformers folder, ``llm/``).

        With ``trainable_only`` the frozen parts that can be rebuilt from their recorded source (``config.llm``,
        ``config.vision_weights``) are left out, so a projector-only checkpoint is a few MB; ``include`` names frozen
        parts to write anyway (e.g. an LLM with merged LoRA weights). Returns the names of the parts written. The
        tokenizer is the processor's to save (:meth:`MiniGPTProcessor.save_pretrained`)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        trainable = {p for p in PARTS if not self.config.freeze[p]} | set(include)
        vision_trainable = bool(trainable & {"vision", "qformer"})
        written = []
        if not trainable_only or vision_trainable or not self.config.vision_weights:
            if trainable_only and not vision_trainable:
                log.info("saving the frozen vision encoder too: it has no recorded source (vision_weights)")
            written.append("vision")
        written.append("projector")
        for name in written:
            save_safetensors(_contiguous(getattr(self, name).state_dict()), directory / PART_FILES[name])
        if not trainable_only or "llm" in trainable:
            self.llm.save_pretrained(directory / LLM_DIR)
            respect_umask(directory / LLM_DIR)
            written.append("llm")
        write_config(directory, self.config, **({"vision_weights": None} if "vision" in written else {}))
        return written

    # ------------------------------------------------------------------ freezing
    def parts(self) -> dict[str, list[nn.Module | nn.Parameter]]:
        parts = dict(self.vision.part_names())
        parts.setdefault("qformer", [])
        parts["projector"] = [self.projector]
        parts["llm"] = [self.llm]
        return parts

    def apply_freeze(self, freeze: dict[str, bool]) -> None:
        """Freeze parts explicitly: frozen parts get no gradients and stay in eval mode."""
        self.config.freeze = {p: bool(freeze.get(p, self.config.freeze[p])) for p in PARTS}
        for part, items in self.parts().items():
            for param in _parameters(items):
                param.requires_grad_(not self.config.freeze[part])
        self.train(self.training)

    def train(self, mode: bool = True) -> MiniGPT:
        super().train(mode)
        for part, items in self.parts().items():
            if self.config.freeze[part]:
                for item in items:
                    if isinstance(item, nn.Module):
                        item.eval()
        return self

    def trainable_parameters(self) -> Iterable[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def parameter_counts(self) -> dict[str, dict[str, int]]:
        """Total and trainable parameters per part."""
        counts = {}
        for part, items in self.parts().items():
            params = list(_parameters(items))
            counts[part] = {
                "total": sum(p.numel() for p in params),
                "trainable": sum(p.numel() for p in params if p.requires_grad),
            }
        return counts

    def place(self, device: torch.device) -> MiniGPT:
        """Move to ``device``; a bitsandbytes LLM is loaded on its device (``device_map``) and stays there."""
        if not is_quantized(self.llm):
            return self.to(device)
        self.vision.to(device)
        self.projector.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.projector_weight.device

    @property
    def projector_weight(self) -> torch.Tensor:
        return next(self.projector.parameters())

    @property
    def image_tokens(self) -> int:
        """Visual tokens (LLM positions) per image."""
        return self.vision.num_tokens

    # ------------------------------------------------------------------ forward
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels [N,3,S,S] -> LLM-space visual tokens [N, num_tokens, D_llm]."""
        return self.projector(self.vision(pixel_values).to(self.projector_weight.dtype))

    def embed(self, batch: ModelBatch, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the visual tokens written into the image slots."""
        text = batch.text
        embeds = self.llm.get_input_embeddings()(text.input_ids)
        index = text.image_index if text.image_index is not None else image_positions(text.image_mask)
        slots = index.numel()
        if image_embeds is None and batch.pixel_values is not None:
            image_embeds = self.encode_images(batch.pixel_values)
        given = 0 if image_embeds is None else image_embeds.shape[0] * image_embeds.shape[1]
        if slots != given:
            raise ValueError(f"the batch has {slots} image positions but {given} image embeddings")
        if slots:
            width = embeds.shape[-1]
            # image_embeds move to the embedding layer's device (a device map may put the LLM elsewhere)
            visual = image_embeds.to(embeds.device, embeds.dtype).reshape(-1, width)
            flat = embeds.reshape(-1, width).index_copy(0, index.to(embeds.device), visual)
            embeds = flat.view_as(embeds)
        return embeds

    def forward(self, batch: ModelBatch, image_embeds: torch.Tensor | None = None) -> MiniGPTOutput:
        """Loss over the supervised (answer) tokens of a prepared ``batch`` (optionally with precomputed
        ``image_embeds``, e.g. from a feature cache)."""
        embeds = self.embed(batch, image_embeds)
        text = batch.text
        hidden = decoder_body(self.llm)(
            inputs_embeds=embeds,
            attention_mask=self._attention_mask(text, embeds.dtype),
            position_ids=text.position_ids,
            use_cache=False,
        ).last_hidden_state
        return self._answer_loss(hidden, text.labels, text.target_index, text.target_ids)

    def _attention_mask(self, text: TextBatch, dtype: torch.dtype) -> torch.Tensor:
        """The mask the LLM body gets: packed rows' block-diagonal causal mask, or for right-padded rows a plain
        causal one (pads only ever follow the real tokens; SDPA/eager attention, rows within any sliding window),
        both 4-D additive masks that transformers takes as they are, without reading them back (its 2-D mask
        handling syncs with the host); else the 2-D padding mask."""
        mask = text.attention_mask
        if mask.ndim == 4:
            return additive_mask(mask, dtype)
        config, width = self.llm.config, mask.shape[1]
        if (
            text.right_padded
            and getattr(config, "_attn_implementation", None) in ("sdpa", "eager")
            and width <= (getattr(config, "sliding_window", None) or width)
        ):
            return additive_mask(torch.ones(1, 1, width, width, dtype=torch.bool, device=mask.device).tril(), dtype)
        return mask

    def _answer_loss(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        target_index: torch.Tensor | None = None,
        target_ids: torch.Tensor | None = None,
    ) -> MiniGPTOutput:
        """Next-token cross-entropy, with the LM head applied only at supervised positions: ``target_index`` (flat
        into ``[B * T]``) and ``target_ids`` as :meth:`TextBatch.with_indices` gives them, else from ``labels``."""
        if target_index is None or target_ids is None:
            target_index, target_ids = next_token_targets(labels)
        count = target_index.numel()
        if count == 0:
            return MiniGPTOutput(loss=hidden.sum() * 0.0, num_tokens=0)
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, target_index)
        config = self.llm.config
        loss = linear_cross_entropy(
            rows,
            self.llm.get_output_embeddings(),
            target_ids,
            self.loss_impl,
            scale=getattr(config, "logit_scale", None),
            softcap=getattr(config, "final_logit_softcapping", None),
        )
        return MiniGPTOutput(loss=loss, num_tokens=count)

    def resolved_loss_impl(self, num_tokens: int) -> str:
        """The loss implementation a batch of ``num_tokens`` supervised tokens runs (``loss_impl`` resolved)."""
        return resolve_loss_impl(self.loss_impl, self.llm.get_output_embeddings(), num_tokens, self.device)


def load_model_config(directory: str | Path, trust_remote_code: bool = False, **overrides: Any) -> MiniGPTConfig:
    """The config of a model directory with ``overrides``; ``trust_remote_code`` is the caller's alone (a directory
    that asks for it is warned about and ignored)."""
    data = resolve_sources(read_config(directory), Path(directory))
    _check_references(data, Path(directory))
    if "vision" not in data and (Path(directory) / PART_FILES["vision"]).is_file():
        raise ValueError(
            f'{Path(directory) / CONFIG_FILE}: no "vision" key, so the architecture of '
            f'{PART_FILES["vision"]} is unknown: add it (a preset such as "eva_vit_g" or "tiny", or the '
            "encoder's fields, as save_pretrained writes them)"
        )
    if data.get("trust_remote_code") and not trust_remote_code:
        log.warning("%s %s", directory, REMOTE_CODE_IGNORED)
    return MiniGPTConfig.from_dict({**data, **overrides, "trust_remote_code": trust_remote_code})


def resolve_sources(data: dict[str, Any], directory: Path) -> dict[str, Any]:
    """``data`` with the sources recorded relative to the model ``directory`` (``llm``, ``vision_weights``,
    ``projector_weights``; ``convert assemble`` writes them so) as absolute paths; hub ids and others unchanged."""
    out = dict(data)
    for key in ("llm", "vision_weights", "projector_weights"):
        value = out.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute() and (directory / value).exists():
            out[key] = str((directory / value).resolve())
    return out


def _check_references(data: dict[str, Any], directory: Path) -> None:
    """A relative local source that exists neither under the model ``directory`` nor from the working directory, and
    is needed (the part is not stored in the directory), is one error saying what it resolved to: the folder moved
    without what it references. A bare ``llm`` name or ``org/name`` may be a hub id and is left to the loader."""
    stored = {
        "llm": (directory / LLM_DIR).is_dir(),
        "vision_weights": (directory / PART_FILES["vision"]).is_file(),
        "projector_weights": (directory / PART_FILES["projector"]).is_file(),
    }
    for key, present in stored.items():
        value = data.get(key)
        if present or not isinstance(value, str) or not value or Path(value).is_absolute() or Path(value).exists():
            continue
        if key == "llm" and not value.startswith(".") and value.count("/") < 2:
            continue
        raise FileNotFoundError(
            f"{directory / CONFIG_FILE}: {key} {value!r} is relative to the model folder and resolves to "
            f"{(directory / value).resolve()}, which does not exist: the folder was moved without what it "
            f"references (move them together, or set {key} to where it is now)"
        )


def load_vision_encoder(config: MiniGPTConfig, init_from: Path | None = None) -> Blip2VisionEncoder:
    """The vision encoder of ``config``: the one a model directory ``init_from`` stores, else the weights of
    ``config.vision_weights``, else random init."""
    saved = init_from / PART_FILES["vision"] if init_from is not None else None
    if saved is not None and saved.is_file():
        encoder = Blip2VisionEncoder(config.vision)
        load_saved_part(encoder, saved, "vision")
    elif config.vision_weights:
        encoder = load_vision_folder(config.vision_weights)
        if encoder.config.to_dict() != config.vision.to_dict():
            config.vision = encoder.config
    else:
        encoder = Blip2VisionEncoder(config.vision)
    return encoder.to(parse_dtype(config.vision_dtype))


def load_saved_part(module: nn.Module, path: Path, what: str) -> None:
    """Load a model directory's part file into ``module`` (strict); a damaged file or tensors that do not fit the
    architecture ``config.json`` describes are one line naming the file, not a traceback of every mismatch."""
    try:
        module.load_state_dict(load_safetensors(path), strict=True)
    except RuntimeError as err:
        problems = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        raise ValueError(
            f"{path}: its tensors do not fit the {what} architecture {path.parent / CONFIG_FILE} describes "
            f"({len(problems)} problem(s), first: {shorten(problems[0] if problems else str(err), 200)})"
        ) from None


def _parameters(items: Iterable[nn.Module | nn.Parameter]) -> Iterable[nn.Parameter]:
    for item in items:
        yield from ([item] if isinstance(item, nn.Parameter) else item.parameters())


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in state.items()}


__all__ = [
    "ADAPTER_DIR",
    "LLM_DIR",
    "PART_FILES",
    "MiniGPT",
    "MiniGPTConfig",
    "MiniGPTOutput",
    "load_model_config",
    "load_vision_encoder",
]
