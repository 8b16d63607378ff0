"""MiniGPT: frozen vision encoder (+ Q-Former) -> projector -> a Hugging Face causal LM."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, StoppingCriteriaList

from ..data.conversation import Conversation, ImageLike, Sample
from ..data.images import ImageProcessor
from ..data.packing import additive_mask
from ..data.templates import Template, get_template
from ..data.tokenize import Encoded, TextBatch, collate, encode_conversation, image_positions, next_token_targets
from ..device import parse_dtype
from ..infer.batching import SlotScheduler, generate_batch
from ..infer.decoding import DecodingSettings, FastDecodingUnsupported
from ..infer.generate import GenerationOptions, StopOnStrings
from .llm import load_llm, load_tokenizer
from .loss import linear_cross_entropy, resolve_loss_impl
from .projector import build_projector
from .vision import Blip2VisionEncoder, VisionConfig

log = logging.getLogger(__name__)

PARTS = ("vision", "qformer", "projector", "llm")
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1


@dataclass
class MiniGPTConfig:
    """Everything needed to rebuild a model; saved as ``config.json`` in a model directory."""

    llm: str
    vision: VisionConfig = field(default_factory=VisionConfig)
    #: Directory with ``vision_config.json`` + ``vision.safetensors`` (see :mod:`minigpt.convert`), or None.
    vision_weights: str | None = None
    projector: str = "linear"
    projector_weights: str | None = None
    llm_gguf_file: str | None = None
    llm_dtype: str = "float32"
    vision_dtype: str = "float32"
    template: str = "vicuna0"
    max_txt_len: int = 160
    freeze: dict[str, bool] = field(
        default_factory=lambda: {"vision": True, "qformer": True, "projector": False, "llm": True}
    )
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = VisionConfig.from_dict(self.vision)
        unknown = set(self.freeze) - set(PARTS)
        if unknown:
            raise ValueError(f"unknown part(s) in freeze: {', '.join(sorted(unknown))}; parts are {', '.join(PARTS)}")
        self.freeze = {part: bool(self.freeze.get(part, part != "projector")) for part in PARTS}
        get_template(self.template)
        parse_dtype(self.llm_dtype)
        parse_dtype(self.vision_dtype)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["vision"] = self.vision.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MiniGPTConfig":
        data = {k: v for k, v in data.items() if k != "format_version"}
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown model config key(s): {', '.join(unknown)}")
        return cls(**data)


@dataclass
class ModelBatch:
    """Tokenized conversations plus the pixels of all their images, in slot order."""

    text: TextBatch
    pixel_values: torch.Tensor | None  # [N_images, 3, S, S]

    def to(self, device: torch.device | str) -> "ModelBatch":
        pixels = self.pixel_values.to(device) if self.pixel_values is not None else None
        return ModelBatch(self.text.to(device), pixels)


@dataclass
class MiniGPTOutput:
    loss: torch.Tensor | None
    num_tokens: int  # supervised tokens in the batch


class MiniGPT(nn.Module):
    """The composed model. Build with :meth:`build` (from parts) or :meth:`from_pretrained`."""

    def __init__(
        self,
        config: MiniGPTConfig,
        vision: Blip2VisionEncoder,
        projector: nn.Module,
        llm: PreTrainedModel,
        tokenizer: Any,
    ) -> None:
        super().__init__()
        self.config = config
        self.vision = vision
        self.projector = projector
        self.llm = llm
        self.tokenizer = tokenizer
        self.template: Template = get_template(config.template)
        self.image_processor = ImageProcessor(size=config.vision.image_size, mean=config.vision.mean, std=config.vision.std)
        #: How the loss is computed: auto, plain, chunked or liger (:mod:`minigpt.model.loss`); training sets it.
        self.loss_impl = "auto"
        self._decoding = DecodingSettings()
        self._slot_scheduler: SlotScheduler | None = None
        self.apply_freeze(config.freeze)

    # ------------------------------------------------------------------ building and loading
    @classmethod
    def build(
        cls,
        config: MiniGPTConfig,
        llm: PreTrainedModel | None = None,
        tokenizer: Any = None,
        llm_kwargs: dict[str, Any] | None = None,
    ) -> "MiniGPT":
        """Build from a config: vision weights from ``vision_weights`` (random init if None), the LLM
        from ``config.llm`` unless given (``llm_kwargs`` go to its ``from_pretrained``, e.g. a
        quantization config), and a fresh (or ``projector_weights``) projector."""
        vision = load_vision_encoder(config)
        if llm is None:
            llm = load_llm(
                config.llm, config.llm_dtype, config.llm_gguf_file, config.trust_remote_code, **(llm_kwargs or {})
            )
        if tokenizer is None:
            tokenizer = load_tokenizer(config.llm, config.llm_gguf_file, config.trust_remote_code)
        projector = build_projector(config.projector, vision.out_dim, llm.get_input_embeddings().embedding_dim)
        if config.projector_weights:
            projector.load_state_dict(load_projector_weights(config.projector_weights))
        return cls(config, vision, projector, llm, tokenizer)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, llm_kwargs: dict[str, Any] | None = None, **overrides: Any
    ) -> "MiniGPT":
        """Load a directory written by :meth:`save_pretrained`. Parts not stored there come from the
        sources recorded in its config (``llm``, ``vision_weights``); ``overrides`` change config fields;
        ``llm_kwargs`` go to the LLM's ``from_pretrained``."""
        directory = Path(directory)
        config_path = directory / CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(f"{directory} is not a minigpt model directory (no {CONFIG_FILE})")
        try:
            data = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from err
        data = {**resolve_sources(data, directory), **overrides}
        config = MiniGPTConfig.from_dict(data)
        llm_dir = directory / "llm"
        if llm_dir.is_dir():
            config_for_build = MiniGPTConfig.from_dict({**config.to_dict(), "llm": str(llm_dir), "llm_gguf_file": None})
        else:
            config_for_build = config
        if (directory / "vision.safetensors").is_file():
            config_for_build.vision_weights = None
        model = cls.build(config_for_build, llm_kwargs=llm_kwargs)
        model.config = config
        for name, module in (("vision", model.vision), ("projector", model.projector)):
            path = directory / f"{name}.safetensors"
            if path.is_file():
                module.load_state_dict(load_file(path), strict=True)
        model.apply_freeze(config.freeze)
        return model

    def save_pretrained(
        self, directory: str | Path, trainable_only: bool = False, include: Sequence[str] = ()
    ) -> list[str]:
        """Write ``config.json`` and the parts as safetensors (LLM as a ``transformers`` folder).

        With ``trainable_only`` the frozen parts that can be rebuilt from their recorded source
        (``config.llm``, ``config.vision_weights``) are left out, so a projector-only checkpoint
        is a few MB; ``include`` names frozen parts to write anyway (e.g. an LLM with merged LoRA
        weights). Returns the names of the parts written.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        trainable = {p for p in PARTS if not self.config.freeze[p]} | set(include)
        written = []
        vision_trainable = bool(trainable & {"vision", "qformer"})
        if not trainable_only or vision_trainable or not self.config.vision_weights:
            if trainable_only and not vision_trainable:
                log.info("saving the frozen vision encoder too: it has no recorded source (vision_weights)")
            save_file(_contiguous(self.vision.state_dict()), directory / "vision.safetensors")
            written.append("vision")
        save_file(_contiguous(self.projector.state_dict()), directory / "projector.safetensors")
        written.append("projector")
        if not trainable_only or "llm" in trainable:
            self.llm.save_pretrained(directory / "llm")
            self.tokenizer.save_pretrained(directory / "llm")
            written.append("llm")
        data = {"format_version": FORMAT_VERSION, **self.config.to_dict()}
        if "vision" in written:
            data["vision_weights"] = None
        (directory / CONFIG_FILE).write_text(json.dumps(data, indent=2) + "\n")
        return written

    def set_template(self, name: str) -> None:
        """Switch the prompt template (e.g. from stage 1's ``caption`` to a chat template)."""
        self.template = get_template(name)
        self.config.template = name

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
            for item in items:
                params = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
                for param in params:
                    param.requires_grad_(not self.config.freeze[part])
        self.train(self.training)

    def train(self, mode: bool = True) -> "MiniGPT":
        super().train(mode)
        for part, items in self.parts().items():
            if self.config.freeze[part]:
                for item in items:
                    if isinstance(item, nn.Module):
                        item.eval()
        return self

    def trainable_parameters(self) -> Iterable[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    @property
    def device(self) -> torch.device:
        return self.projector_weight.device

    @property
    def projector_weight(self) -> torch.Tensor:
        return next(self.projector.parameters())

    # ------------------------------------------------------------------ data preparation
    @property
    def image_tokens(self) -> int:
        return self.vision.num_tokens

    def encode(self, conversation: Conversation, train: bool = True) -> Encoded:
        return encode_conversation(
            conversation, self.template, self.tokenizer, self.image_tokens, self.config.max_txt_len, train=train
        )

    def prepare(
        self,
        conversations: Sequence[Conversation],
        images: Sequence[ImageLike] | Sequence[Sequence[ImageLike]] | None = None,
        train: bool = True,
    ) -> ModelBatch:
        """Template, tokenize, load/process images and pad (right for training, left for generation)."""
        per_conv = distribute_images(conversations, images)
        encoded, pixels = [], []
        for i, (conv, imgs) in enumerate(zip(conversations, per_conv)):
            Sample(conv, list(imgs), origin=f"conversation {i}").check()
            encoded.append(self.encode(conv, train=train))
            pixels.extend(self.image_processor(img) for img in imgs)
        text = collate(encoded, self.tokenizer.pad_token_id, side="right" if train else "left")
        return ModelBatch(text, torch.stack(pixels) if pixels else None)

    # ------------------------------------------------------------------ forward
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels [N,3,S,S] -> LLM-space visual tokens [N, num_tokens, D_llm]."""
        feats = self.vision(pixel_values)
        out = self.projector(feats.to(self.projector_weight.dtype))
        return out

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
            flat = embeds.reshape(-1, width).index_copy(0, index, image_embeds.to(embeds.dtype).reshape(-1, width))
            embeds = flat.view_as(embeds)
        return embeds

    def forward(
        self,
        images: Sequence[ImageLike] | Sequence[Sequence[ImageLike]] | None = None,
        conversations: Sequence[Conversation] | None = None,
        *,
        batch: ModelBatch | None = None,
        image_embeds: torch.Tensor | None = None,
    ) -> MiniGPTOutput:
        """Loss over supervised (answer) tokens only. Pass ``images`` + ``conversations`` or a prepared
        ``batch`` (optionally with precomputed ``image_embeds``, e.g. from a feature cache)."""
        if batch is None:
            if conversations is None:
                raise ValueError("pass conversations (with their images) or a prepared batch")
            batch = self.prepare(conversations, images, train=True).to(self.device)
        embeds = self.embed(batch, image_embeds)
        body = self.llm.get_decoder() if hasattr(self.llm, "get_decoder") else self.llm.base_model
        text = batch.text
        hidden = body(
            inputs_embeds=embeds, attention_mask=self._attention_mask(text, embeds.dtype),
            position_ids=text.position_ids, use_cache=False,
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
        if (text.right_padded and getattr(config, "_attn_implementation", None) in ("sdpa", "eager")
                and width <= (getattr(config, "sliding_window", None) or width)):
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
            rows, self.llm.get_output_embeddings(), target_ids, self.loss_impl,
            scale=getattr(config, "logit_scale", None), softcap=getattr(config, "final_logit_softcapping", None),
        )
        return MiniGPTOutput(loss=loss, num_tokens=count)

    def resolved_loss_impl(self, num_tokens: int) -> str:
        """The loss implementation a batch of ``num_tokens`` supervised tokens runs (``loss_impl`` resolved)."""
        return resolve_loss_impl(self.loss_impl, self.llm.get_output_embeddings(), num_tokens, self.device)

    # ------------------------------------------------------------------ generation
    @property
    def decoding(self) -> DecodingSettings:
        """How :meth:`generate` decodes (:class:`~minigpt.infer.decoding.DecodingSettings`); setting it frees the
        slot decoder's cache."""
        return self._decoding

    @decoding.setter
    def decoding(self, settings: DecodingSettings) -> None:
        self._decoding, self._slot_scheduler = settings, None

    def end_token_ids(self) -> list[int]:
        """Ids that end an answer: the template's one-token stop ids and the tokenizer's EOS."""
        ends = {ids[0] for ids in self.template.stop_token_ids(self.tokenizer) if len(ids) == 1}
        if self.tokenizer.eos_token_id is not None:
            ends.add(self.tokenizer.eos_token_id)
        return sorted(ends)

    @torch.inference_mode()
    def generate(
        self,
        conversations: Conversation | Sequence[Conversation],
        images: Sequence[ImageLike] | Sequence[Sequence[ImageLike]] | None = None,
        options: GenerationOptions | None = None,
        streamer: Any = None,
    ) -> list[str]:
        """Answer the last user turn of each conversation (batched, left-padded). Decodes on the slot decoder
        (static KV cache, CUDA graph) or with transformers' ``generate``, as ``self.decoding`` says."""
        if isinstance(conversations, Conversation):
            conversations = [conversations]
        options = options or GenerationOptions()
        batch = self.prepare(conversations, images, train=False).to(self.device)
        embeds = self.embed(batch)
        stops = list(self.template.stop_strings) + list(options.stop)
        if options.seed is not None:
            torch.manual_seed(options.seed)
        text = batch.text
        static = self.decoding.use_static(self.device, options.num_beams)
        scheduler = self._scheduler(text.input_ids, options) if static else None
        if scheduler is not None:
            try:
                rows = generate_batch(scheduler, embeds, text.attention_mask, text.input_ids, options, stops, streamer)
                return [self.decode(ids, options.stop) for ids in rows]
            except FastDecodingUnsupported as err:  # e.g. a prompt beyond a sliding window
                log.warning("static decoding cannot answer this batch (%s); using transformers' generate", err)
        prompt_len = text.input_ids.shape[1]
        # input_ids ride along with the embeddings so repetition penalty also sees the prompt.
        out = self.llm.generate(
            input_ids=text.input_ids,
            inputs_embeds=embeds,
            attention_mask=text.attention_mask,
            stopping_criteria=StoppingCriteriaList([StopOnStrings(self.tokenizer, stops, prompt_len)]),
            eos_token_id=self.end_token_ids() or None,
            pad_token_id=self.tokenizer.pad_token_id,
            streamer=streamer,
            **options.hf_kwargs(),
        )
        return [self.decode(row[prompt_len:], options.stop) for row in out]

    def _scheduler(self, input_ids: torch.Tensor, options: GenerationOptions) -> SlotScheduler | None:
        """The slot scheduler for a batch like this one (reused while it fits), or None where the LLM cannot use
        it (then the plain path runs; the reason is logged once)."""
        settings = self.decoding
        if settings.max_len:
            max_len = settings.max_len
        else:
            limit = int(getattr(self.llm.config, "max_position_embeddings", 0) or 1 << 30)
            needed = input_ids.shape[1] + options.max_new_tokens
            max_len = min(-(-needed // 256) * 256, max(limit, needed))
        current = self._slot_scheduler
        if current is not None and current.slots >= input_ids.shape[0] and current.max_len >= max_len:
            return current
        self._slot_scheduler = None  # free the old cache first
        scheduler = SlotScheduler.for_model(self, input_ids.shape[0], max_len)
        if scheduler is None:
            self.decoding = DecodingSettings(mode="plain")
        self._slot_scheduler = scheduler
        return scheduler

    def decode(self, ids: torch.Tensor | list[int], extra_stops: Sequence[str] = ()) -> str:
        """Generated ids -> answer text, cut at EOS/pad and at the first stop string."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        end_ids = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id} - {None}
        for i, tok in enumerate(ids):
            if tok in end_ids:
                ids = ids[:i]
                break
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        for stop in extra_stops:
            text = text.split(stop, 1)[0]
        return self.template.postprocess(text)

    # ------------------------------------------------------------------ reporting
    def parameter_counts(self) -> dict[str, dict[str, int]]:
        counts = {}
        for part, items in self.parts().items():
            params = [p for item in items for p in ([item] if isinstance(item, nn.Parameter) else item.parameters())]
            counts[part] = {
                "total": sum(p.numel() for p in params),
                "trainable": sum(p.numel() for p in params if p.requires_grad),
            }
        return counts


def distribute_images(
    conversations: Sequence[Conversation],
    images: Sequence[ImageLike] | Sequence[Sequence[ImageLike]] | None,
) -> list[list[ImageLike]]:
    """Per-conversation image lists: given as such, or a flat list handed out to slots in order."""
    if not images:
        return [[] for _ in conversations]
    if all(isinstance(x, (list, tuple)) for x in images):
        if len(images) != len(conversations):
            raise ValueError(f"{len(images)} image lists for {len(conversations)} conversations")
        return [list(x) for x in images]
    flat = list(images)
    out = []
    for conv in conversations:
        out.append(flat[: conv.num_images])
        flat = flat[conv.num_images :]
    if flat:
        # Leave the surplus with the last conversation so Sample.check names the problem.
        out[-1].extend(flat)
    return out


def resolve_sources(data: dict[str, Any], directory: Path) -> dict[str, Any]:
    """``data`` with the sources recorded relative to the model ``directory`` (``llm``, ``vision_weights``,
    ``projector_weights``; ``convert assemble`` writes them so) as absolute paths; hub ids and others unchanged."""
    out = dict(data)
    for key in ("llm", "vision_weights", "projector_weights"):
        value = out.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute() and (directory / value).exists():
            out[key] = str((directory / value).resolve())
    return out


def load_vision_encoder(config: MiniGPTConfig) -> Blip2VisionEncoder:
    """The vision encoder of ``config``: random init, or weights from ``config.vision_weights``."""
    if config.vision_weights:
        from ..convert.lavis import load_vision

        encoder = load_vision(config.vision_weights)
        if encoder.config.to_dict() != config.vision.to_dict():
            config.vision = encoder.config
    else:
        encoder = Blip2VisionEncoder(config.vision)
    return encoder.to(parse_dtype(config.vision_dtype))


def load_projector_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A projector state dict from our safetensors or an original MiniGPT-4/MiniGPT4Qwen checkpoint."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(path)
    from ..convert.lavis import convert_minigpt4_projector, load_checkpoint

    return convert_minigpt4_projector(load_checkpoint(path))[0]


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in state.items()}


__all__ = ["MiniGPT", "MiniGPTConfig", "ModelBatch", "MiniGPTOutput"]
