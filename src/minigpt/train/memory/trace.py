"""The activation side of a training step, counted by running the step's own code on fake tensors.

The model is built on the meta device from configs alone, turned into fake CPU tensors (shapes and dtypes, no
storage: :class:`torch._subclasses.fake_tensor.FakeTensorMode`), given its LoRA adapters and gradient
checkpointing, and one micro-batch of the planned shape goes through :func:`minigpt.train.loop.forward_backward`
under :class:`.counting.LiveBytes`. So the count follows what is live in our code, not a textbook formula: the
answer-only LM head, the chunked loss, the 4-D masks, what a frozen layer does not save, checkpointing, autocast.
Nothing is allocated and no weight is read; a 7B model's step takes seconds.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .counting import LiveBytes, module_tensors

#: Token id of an image slot and of the synthetic samples' first token.
SLOT, BOS = 0, 1


@dataclass
class Shape:
    """A micro-batch: ``batch`` samples of ``positions`` positions each (``image_tokens`` per image, ``images``
    images), of which ``answers`` are supervised; the images as pixels (vision pass in the step) or cached
    features."""

    batch: int
    positions: int
    answers: int
    images: int = 1
    vision_in_step: bool = True


def synthetic_items(shape: Shape, image_tokens: int, image_size: int, feature_dim: int, vocab: int) -> list[Any]:
    """``shape.batch`` training items (``[BOS][images][prompt][answer]``) with pixels or cached features."""
    from ...data.tokenize import Encoded
    from ..data import Item

    rng = random.Random(0)
    prompt = shape.positions - shape.answers - 1 - shape.images * image_tokens
    if prompt < 0:
        raise ValueError(
            f"{shape.positions} positions cannot hold {shape.images} image(s) of {image_tokens} tokens and "
            f"{shape.answers} answer tokens"
        )
    items = []
    for i in range(shape.batch):
        enc = Encoded()
        enc.extend([BOS], supervised=False)
        enc.extend([SLOT] * (image_tokens * shape.images), supervised=False, image=True)
        enc.extend([rng.randrange(3, vocab) for _ in range(prompt)], supervised=False)
        enc.extend([rng.randrange(3, vocab) for _ in range(shape.answers)], supervised=True)
        if shape.vision_in_step:
            items.append(Item(enc, [torch.zeros(3, image_size, image_size)] * shape.images, f"synthetic {i}"))
        else:
            feats = [torch.zeros(image_tokens, feature_dim, dtype=torch.float16)] * shape.images
            items.append(Item(enc, [], f"synthetic {i}", feats))
    return items


def synthetic_batch(vision: Any, vocab: int, shape: Shape) -> Any:
    """A collated :class:`minigpt.train.data.TrainBatch` of ``shape`` for a model of ``vision`` (a VisionConfig) and
    an LLM of ``vocab`` tokens (real, small CPU tensors)."""
    from ..data import collate_items

    items = synthetic_items(shape, vision.num_tokens, vision.image_size, vision.out_dim, vocab)
    return collate_items(items, SLOT)


def batch_bytes(batch: Any) -> int:
    """Bytes of a TrainBatch's tensors (ids, labels, masks, indices, pixels or features)."""
    text = batch.batch.text
    tensors = [v for v in vars(text).values() if isinstance(v, torch.Tensor)]
    tensors += [t for t in (batch.batch.pixel_values, batch.features) if t is not None]
    return sum({id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors}.values())


@dataclass
class StepTrace:
    """Bytes counted over one micro-batch's forward and backward (weights not included): the peak, what is still
    live at the end (the gradients of the trainable parameters), and the peak of all but the gradients (what a
    ZeRO-2/3 process holds besides its share of them)."""

    peak: int
    end: int
    without_grads: int


def trace_step(
    build: Callable[[], nn.Module], shape: Shape, amp: str, checkpointing: bool, micro_batches: int = 1
) -> StepTrace:
    """Run ``micro_batches`` forward + backward of ``shape`` on the model ``build`` makes on the meta device (moved
    to fake CPU tensors here) and count the bytes they make live."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..strategy import Strategy

    strategy = Strategy("cpu", amp)
    model = build()
    batch = synthetic_batch(model.config.vision, model.llm.config.vocab_size, shape)
    with FakeTensorMode(allow_non_fake_inputs=True):
        return _trace(to_fake(model), batch, strategy, checkpointing, micro_batches)


def _trace(model: nn.Module, batch: Any, strategy: Any, checkpointing: bool, micro_batches: int) -> StepTrace:
    from ..loop import forward_backward

    if checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model.llm.train()
    tokens = batch.num_tokens * micro_batches
    with LiveBytes(record=True) as counter:
        counter.track(module_tensors(model))  # views of the weights are not new bytes
        weights = counter.current
        for _ in range(micro_batches):
            forward_backward(model, strategy, [batch], tokens, batch)
        grads = counter.serials(p.grad for p in model.parameters() if p.grad is not None)
        return StepTrace(counter.peak - weights, counter.current - weights, counter.peak_without(grads) - weights)


def to_fake(model: nn.Module) -> nn.Module:
    """``model`` (built on the meta device) with fake CPU tensors in place of its parameters and buffers (shared ones
    stay shared); call inside a ``FakeTensorMode``. (``Module.to_empty`` cannot: it swaps tensors the fake mode
    holds weak references to.)"""
    done: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is None:
                    continue
                if id(tensor) not in done:
                    empty = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
                    if isinstance(tensor, nn.Parameter):
                        empty = nn.Parameter(empty, requires_grad=tensor.requires_grad)
                    done[id(tensor)] = empty
                store[name] = done[id(tensor)]
    return model


__all__ = [
    "BOS",
    "SLOT",
    "Shape",
    "StepTrace",
    "batch_bytes",
    "synthetic_batch",
    "synthetic_items",
    "to_fake",
    "trace_step",
]
