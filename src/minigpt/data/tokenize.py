"""Chunks -> token ids, labels and image positions; and a batch of those -> padded tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import torch

from .conversation import Conversation
from .templates import IMAGE_SLOT, Chunk, Template

IGNORE_INDEX = -100


@dataclass
class Encoded:
    """One tokenized sample. ``image_mask[i]`` is True where an image embedding goes."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    image_mask: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    def extend(self, ids: Sequence[int], supervised: bool, image: bool = False) -> None:
        self.input_ids += list(ids)
        self.labels += list(ids) if supervised else [IGNORE_INDEX] * len(ids)
        self.image_mask += [image] * len(ids)

    @property
    def num_images_slots(self) -> int:
        return sum(self.image_mask)


def encode_chunks(
    chunks: list[Chunk],
    tokenizer: Any,
    image_tokens: int,
    max_len: int | None = None,
    truncation: Literal["answer", "total"] = "answer",
    slot_id: int = 0,
) -> Encoded:
    """Tokenize each chunk on its own, splitting text at :data:`IMAGE_SLOT`.

    Every image slot becomes ``image_tokens`` positions holding ``slot_id`` (their embeddings are
    replaced by the model). With ``truncation="answer"`` each supervised chunk is cut to ``max_len``
    tokens; with ``"total"`` the whole sequence is. A cut through an image is an error.
    """
    enc = Encoded()
    for chunk in chunks:
        if chunk.ids is not None:
            enc.extend(chunk.ids, chunk.supervised)
            continue
        pieces = chunk.text.split(IMAGE_SLOT)
        for i, piece in enumerate(pieces):
            if i > 0:
                enc.extend([slot_id] * image_tokens, supervised=False, image=True)
            if not piece:
                continue
            ids = tokenizer.encode(piece, add_special_tokens=False)
            if chunk.supervised and truncation == "answer" and max_len is not None:
                ids = ids[:max_len]
            enc.extend(ids, chunk.supervised)
    if truncation == "total" and max_len is not None and len(enc) > max_len:
        if sum(enc.image_mask[:max_len]) % image_tokens:
            raise ValueError(f"max_len {max_len} cuts through an image; raise the maximum text length")
        enc.input_ids, enc.labels, enc.image_mask = (
            enc.input_ids[:max_len],
            enc.labels[:max_len],
            enc.image_mask[:max_len],
        )
    return enc


def encode_conversation(
    conv: Conversation,
    template: Template,
    tokenizer: Any,
    image_tokens: int,
    max_len: int | None = None,
    train: bool = True,
) -> Encoded:
    """Render (training or generation prompt) and tokenize a conversation."""
    chunks = template.render_train(conv, tokenizer) if train else template.render_prompt(conv, tokenizer)
    return encode_chunks(
        chunks,
        tokenizer,
        image_tokens,
        max_len if train else None,
        template.truncation,
        slot_id=tokenizer.pad_token_id or 0,
    )


@dataclass
class TextBatch:
    """Padded (or packed) token ids, masks and labels of a batch.

    The ``*_index`` / ``target_ids`` fields are what the training step needs from the masks, computed on the CPU by
    :meth:`with_indices` (in collation) so that the step on an accelerator never waits for a data-dependent shape;
    when None the model computes them from the masks (a host sync on an accelerator)."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T]
    image_mask: torch.Tensor  # [B, T] bool
    #: Positions restarting per sample in packed rows (None: 0..T-1, the LLM's default).
    position_ids: torch.Tensor | None = None
    #: Rows padded at the end only (:func:`collate` ``side="right"``): causal attention alone keeps real tokens off
    #: the pads, so the training forward needs no padding mask.
    right_padded: bool = False
    #: ``[N_slots]`` flat indices into ``[B * T]`` of the image positions, in slot order.
    image_index: torch.Tensor | None = None
    #: ``[N]`` flat indices into ``[B * T]`` of the positions whose next token is supervised, and ``[N]`` those tokens.
    target_index: torch.Tensor | None = None
    target_ids: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> TextBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v.to(device) for k, v in moved.items() if isinstance(v, torch.Tensor)})

    def with_indices(self) -> TextBatch:
        """A copy with ``image_index``, ``target_index`` and ``target_ids`` computed from the masks and labels (meant
        for CPU tensors: on an accelerator this reads back)."""
        target_index, target_ids = next_token_targets(self.labels)
        return replace(
            self, image_index=image_positions(self.image_mask), target_index=target_index, target_ids=target_ids
        )


@dataclass
class ModelBatch:
    """What the model takes: tokenized conversations plus the pixels of all their images, in slot order."""

    text: TextBatch
    pixel_values: torch.Tensor | None  # [N_images, 3, S, S]

    def to(self, device: torch.device | str) -> ModelBatch:
        pixels = self.pixel_values.to(device) if self.pixel_values is not None else None
        return ModelBatch(self.text.to(device), pixels)


def image_positions(image_mask: torch.Tensor) -> torch.Tensor:
    """Flat indices into ``[B * T]`` of the True positions of ``image_mask`` (row-major: slot order)."""
    return image_mask.reshape(-1).nonzero().squeeze(1)


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices into ``[B * T]`` of the positions whose next label is supervised (not ``IGNORE_INDEX``), and
    those labels: the rows and targets of the shifted next-token loss."""
    following = labels[:, 1:]
    rows, cols = (following != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows * labels.shape[1] + cols, following[rows, cols]


def collate(
    samples: list[Encoded],
    pad_id: int,
    side: Literal["right", "left"] = "right",
    pad_to: int | None = None,
) -> TextBatch:
    """Pad to the longest sample (or to ``pad_to``): pads have attention 0 and label -100."""
    length = max([len(s) for s in samples] + [pad_to or 0])
    rows: dict[str, list[list[Any]]] = {"ids": [], "att": [], "lab": [], "img": []}
    for s in samples:
        n = length - len(s)
        for key, values, fill in (
            ("ids", s.input_ids, pad_id),
            ("att", [1] * len(s), 0),
            ("lab", s.labels, IGNORE_INDEX),
            ("img", s.image_mask, False),
        ):
            rows[key].append(list(values) + [fill] * n if side == "right" else [fill] * n + list(values))
    return TextBatch(
        input_ids=torch.tensor(rows["ids"], dtype=torch.long),
        attention_mask=torch.tensor(rows["att"], dtype=torch.long),
        labels=torch.tensor(rows["lab"], dtype=torch.long),
        image_mask=torch.tensor(rows["img"], dtype=torch.bool),
        right_padded=side == "right",
    )
