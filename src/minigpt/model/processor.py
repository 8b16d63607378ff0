"""The processor: template + tokenizer + image processor, paired with a model as transformers pairs them.

Conversations and images in, a :class:`~minigpt.data.tokenize.ModelBatch` out (:meth:`MiniGPTProcessor.prepare`);
generated ids in, answer text out (:meth:`~MiniGPTProcessor.decode`); and the ids and strings that end an answer.
Its settings are the model config's (``template``, ``max_txt_len``, the vision input size and normalisation); the
tokenizer is saved in the model directory's ``tokenizer/`` folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.conversation import Conversation, ImageLike, Sample
from ..data.images import DEFAULT_MAX_PIXELS, ImageProcessor
from ..data.templates import Template, get_template
from ..data.tokenize import Encoded, ModelBatch, collate, encode_conversation
from .config import MiniGPTConfig
from .llm import load_tokenizer
from .minigpt import LLM_DIR, MiniGPT, load_model_config

TOKENIZER_DIR = "tokenizer"


class MiniGPTProcessor:
    """Prepares model inputs and reads model outputs for one :class:`MiniGPTConfig` (shared with its model, so a
    template switched here is the one the model directory records)."""

    def __init__(self, config: MiniGPTConfig, tokenizer: Any) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.image_processor = self.image_transform()

    @classmethod
    def from_config(cls, config: MiniGPTConfig, tokenizer: Any = None) -> MiniGPTProcessor:
        """The processor of ``config``, its tokenizer loaded from ``config.llm`` unless given."""
        if tokenizer is None:
            tokenizer = load_tokenizer(config.llm, config.llm_gguf_file, config.trust_remote_code)
        return cls(config, tokenizer)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, config: MiniGPTConfig | None = None, trust_remote_code: bool = False
    ) -> MiniGPTProcessor:
        """The processor of a model directory (``config`` if already read): its ``tokenizer/`` (or ``llm/``) folder,
        else the tokenizer of the LLM source it records."""
        directory = Path(directory)
        config = config or load_model_config(directory, trust_remote_code)
        for name in (TOKENIZER_DIR, LLM_DIR):
            if (directory / name / "tokenizer_config.json").is_file():
                return cls(config, load_tokenizer(directory / name, None, config.trust_remote_code))
        return cls.from_config(config)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the tokenizer to ``directory/tokenizer`` (and into ``llm/`` when the model wrote one, so that it is a
        complete transformers folder); the settings are in the model's ``config.json``."""
        directory = Path(directory)
        self.tokenizer.save_pretrained(directory / TOKENIZER_DIR)
        if (directory / LLM_DIR).is_dir():
            self.tokenizer.save_pretrained(directory / LLM_DIR)

    # ------------------------------------------------------------------ settings
    @property
    def template(self) -> Template:
        return get_template(self.config.template)

    def set_template(self, name: str) -> None:
        """Switch the prompt template (e.g. from stage 1's ``caption`` to a chat template)."""
        get_template(name)
        self.config.template = name

    def image_transform(
        self,
        augment: bool = False,
        min_scale: float = 0.5,
        hflip: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> ImageProcessor:
        """The model's image transform (size and normalisation from the config); ``augment``: training's random
        resized crop (scale ``min_scale``-1, and a horizontal flip with ``hflip``). :attr:`image_processor` is the
        plain one."""
        vision = self.config.vision
        return ImageProcessor(
            vision.image_size,
            vision.mean,
            vision.std,
            train=augment,
            min_scale=min_scale,
            hflip=hflip,
            max_pixels=max_pixels,
        )

    @property
    def image_tokens(self) -> int:
        return self.config.vision.num_tokens

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    # ------------------------------------------------------------------ inputs
    def encode(self, conversation: Conversation, train: bool = True) -> Encoded:
        """Template + tokenize one conversation (labels on the answers; ``train=False``: a generation prompt), with
        the config's ``system_prompt`` where the conversation has no system turn."""
        return encode_conversation(
            conversation.with_system(self.config.system_prompt),
            self.template,
            self.tokenizer,
            self.image_tokens,
            self.config.max_txt_len,
            train=train,
        )

    def prepare(
        self,
        conversations: Conversation | Sequence[Conversation],
        images: Sequence[ImageLike] | Sequence[Sequence[ImageLike]] | None = None,
        train: bool = True,
        transform: ImageProcessor | None = None,
    ) -> ModelBatch:
        """Template, tokenize, load/process images (with ``transform``, e.g. an augmenting
        :meth:`image_transform`; default :attr:`image_processor`) and pad (right for training, left for generation).
        Training's data loader encodes through the same :meth:`encode` and transform."""
        transform = transform or self.image_processor
        if isinstance(conversations, Conversation):
            conversations = [conversations]
        encoded, pixels = [], []
        for i, (conv, imgs) in enumerate(zip(conversations, distribute_images(conversations, images))):
            Sample(conv, list(imgs), origin=f"conversation {i}").check()
            encoded.append(self.encode(conv, train=train))
            pixels.extend(transform(img) for img in imgs)
        text = collate(encoded, self.pad_token_id, side="right" if train else "left")
        return ModelBatch(text, torch.stack(pixels) if pixels else None)

    __call__ = prepare

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    # ------------------------------------------------------------------ outputs
    def stop_strings(self, extra: Sequence[str] = ()) -> list[str]:
        """The template's stop strings and ``extra``."""
        return [*self.template.stop_strings, *extra]

    def end_token_ids(self) -> list[int]:
        """Ids that end an answer: the template's one-token stop ids and the tokenizer's EOS."""
        ends = {ids[0] for ids in self.template.stop_token_ids(self.tokenizer) if len(ids) == 1}
        if self.tokenizer.eos_token_id is not None:
            ends.add(self.tokenizer.eos_token_id)
        return sorted(ends)

    def decode(self, ids: torch.Tensor | Sequence[int], extra_stops: Sequence[str] = ()) -> str:
        """Generated ids -> answer text, cut at EOS/pad and at the first stop string."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        end_ids = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id} - {None}
        cut = next((i for i, tok in enumerate(ids) if tok in end_ids), len(ids))
        text = self.tokenizer.decode(ids[:cut], skip_special_tokens=False)
        for stop in extra_stops:
            text = text.split(stop, 1)[0]
        return self.template.postprocess(text)


def load_pretrained(
    directory: str | Path, llm_kwargs: dict[str, Any] | None = None, trust_remote_code: bool = False, **overrides: Any
) -> tuple[MiniGPT, MiniGPTProcessor]:
    """A model directory's model (:meth:`MiniGPT.from_pretrained`, same arguments) and its processor, sharing the
    config."""
    model = MiniGPT.from_pretrained(directory, llm_kwargs, trust_remote_code, **overrides)
    return model, MiniGPTProcessor.from_pretrained(directory, model.config)


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
    if flat:  # leave the surplus with the last conversation so that Sample.check names the problem
        out[-1].extend(flat)
    return out


__all__ = ["MiniGPTProcessor", "TOKENIZER_DIR", "distribute_images", "load_pretrained"]
