"""Less padding: sequence packing (several samples per row) and a length-grouped batch order.

**Packing.** :func:`collate_packed` puts the samples of a micro-batch into the fewest rows of at most ``capacity``
positions, balanced so that padding the rows to the longest wastes little (:func:`pack_rows`). Samples in a row must
not see each other, so the batch carries

- ``attention_mask``: a boolean ``[B, 1, T, T]`` block-diagonal causal mask (True = may attend); pads attend to
  pads only, so no row of the softmax is empty. :func:`additive_mask` turns it into the additive float mask that
  transformers' eager and SDPA attention take as is (a 4-D mask bypasses their own mask building);
- ``position_ids``: restarting at 0 for every sample, so rotary/learned positions are those of the unpacked sample;
- ``labels``: the first position of every sample set to -100, since the shifted loss would otherwise ask the last
  token of one sample to predict the first of the next.

The loss is then the same as without packing (the same supervised tokens, each seeing exactly its own sample;
tested to 1e-5 in float32). Images fill the image positions in row-major order, so pixels or cached features
must be reordered with the returned sample order.

**Length grouping.** :func:`length_grouped_order` permutes the positions of an epoch so that an optimizer step
holds samples of similar length: windows of ``window_steps`` steps are sorted by length, cut into steps, and the
steps of a window are shuffled (seeded by seed, epoch and window), as transformers' LengthGroupedSampler does
with its mega-batches. Inside a step the samples stay sorted, so each micro-batch is tight too. The order is a
pure function of (seed, epoch, lengths): resuming and any split of a step over accumulation and processes see the
same samples per step.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .tokenize import IGNORE_INDEX, Encoded, TextBatch


@dataclass
class PackedTextBatch(TextBatch):
    """A :class:`TextBatch` whose rows hold several samples: ``attention_mask`` is ``[B, 1, T, T]`` (bool)."""

    #: ``[B, T]``: 1, 2, ... for the samples of a row, 0 on padding.
    segment_ids: torch.Tensor | None = None

    @property
    def num_positions(self) -> int:
        return self.input_ids.numel()


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """The sample indices of each row: the fewest rows of at most ``capacity`` positions (or of the longest sample,
    when that is longer), balanced so that the rows, which are padded to the longest, are about equally long.

    For ``n = ceil(total / capacity), n + 1, ...`` the samples go longest first into the least-filled row (ties by
    index, so the result is deterministic) until no row is too long."""
    if capacity <= 0:
        raise ValueError(f"the packing capacity must be positive, got {capacity}")
    if not lengths:
        return []
    limit = max(capacity, max(lengths))
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    for n in range(max(1, -(-sum(lengths) // capacity)), len(lengths) + 1):
        rows: list[list[int]] = [[] for _ in range(n)]
        fill = [0] * n
        for i in order:
            r = min(range(n), key=lambda r: (fill[r], r))
            rows[r].append(i)
            fill[r] += lengths[i]
        if max(fill) <= limit:
            break
    return [row for row in rows if row]


def collate_packed(samples: Sequence[Encoded], pad_id: int, capacity: int) -> tuple[PackedTextBatch, list[int]]:
    """Pack ``samples`` into rows of at most ``capacity`` positions (see the module doc).

    Returns the batch and the order of the samples in it (row-major): images must be given in that order."""
    rows = pack_rows([len(s) for s in samples], capacity)
    width = max(sum(len(samples[i]) for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    image_mask = torch.zeros(shape, dtype=torch.bool)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.zeros(shape, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for k, i in enumerate(row, start=1):
            s, n = samples[i], len(samples[i])
            span = slice(start, start + n)
            input_ids[r, span] = torch.tensor(s.input_ids, dtype=torch.long)
            labels[r, span] = torch.tensor(s.labels, dtype=torch.long)
            labels[r, start] = IGNORE_INDEX  # never a target: in a row it would be predicted from the previous sample
            image_mask[r, span] = torch.tensor(s.image_mask, dtype=torch.bool)
            position_ids[r, span] = torch.arange(n)
            segment_ids[r, span] = k
            start += n
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = (same & causal).unsqueeze(1)
    batch = PackedTextBatch(input_ids, mask, labels, image_mask, position_ids=position_ids, segment_ids=segment_ids)
    return batch, [i for row in rows for i in row]


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean ``[B, 1, T, T]`` (True = attend) -> additive float mask of ``dtype`` (0 or the dtype's minimum)."""
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return out.masked_fill_(~mask, torch.finfo(dtype).min)


def length_grouped_order(
    lengths: Sequence[int], step_size: int, window_steps: int, seed: int, epoch: int = 0
) -> list[int]:
    """A permutation of ``range(len(lengths))``: windows of ``window_steps * step_size`` positions sorted by length
    (longest first, ties by position), cut into steps of ``step_size``, steps shuffled within their window."""
    if step_size <= 0 or window_steps <= 0:
        raise ValueError("step_size and window_steps must be positive")
    order: list[int] = []
    span = step_size * window_steps
    for w, start in enumerate(range(0, len(lengths), span)):
        window = sorted(range(start, min(start + span, len(lengths))), key=lambda i: (-lengths[i], i))
        steps = [window[j : j + step_size] for j in range(0, len(window), step_size)]
        random.Random(f"{seed}:{epoch}:{w}").shuffle(steps)
        order.extend(i for step in steps for i in step)
    return order


def padding_stats(
    lengths: Sequence[int], batches: Sequence[Sequence[int]], capacity: int | None = None
) -> dict[str, float]:
    """Positions computed and wasted when ``batches`` (lists of indices into ``lengths``) are padded to their longest
    sample, or packed into rows of ``capacity``."""
    tokens = computed = 0
    for batch in batches:
        sizes = [lengths[i] for i in batch]
        tokens += sum(sizes)
        if capacity is None:
            computed += len(sizes) * max(sizes)
        else:
            rows = pack_rows(sizes, capacity)
            computed += len(rows) * max(sum(sizes[i] for i in row) for row in rows)
    return {"tokens": tokens, "positions": computed, "pad_fraction": 1 - tokens / computed if computed else 0.0}


__all__ = ["PackedTextBatch", "pack_rows", "collate_packed", "additive_mask", "length_grouped_order", "padding_stats"]
