"""Training data: samples -> encoded text + pixels, a deterministic and resumable batch plan, collation.

The path is ``reader -> Sample -> SampleEncoder (template + tokenize + image transform) -> collate_items -> ModelBatch``.
A sample that cannot be used (missing or corrupt image, a conversation the template rejects, ...) becomes a
:class:`Skipped` naming it; :func:`collate_items` drops it and reports it in :attr:`TrainBatch.skipped`, and the loop warns
and counts. A dataset of which no record can be used is an error (:func:`check_usable`).

Order is a pure function of (seed, epoch, position): map-style datasets are mixed by ratio with
:class:`~minigpt.data.formats.MixedDataset` (fixed per epoch), streamed ones (webdataset) with
:class:`~minigpt.data.formats.MixedStream`; :class:`BatchPlan` cuts that order into micro-batches and shards them over
processes. The random crop of a sample is seeded by its position too, so resuming at a micro-batch, using DataLoader
workers or splitting a batch over processes never changes what a step sees.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..data.conversation import Sample
from ..data.features import FeatureCache
from ..data.formats import MixedDataset, MixedStream, SampleList, WebDatasetReader, read_dataset
from ..data.images import DEFAULT_MAX_PIXELS, ImageProcessor
from ..data.packing import collate_packed, length_grouped_order
from ..data.tokenize import Encoded, ModelBatch
from ..data.tokenize import collate as collate_text
from ..device import pins_memory
from ..model.processor import MiniGPTProcessor


@dataclass(frozen=True)
class Key:
    """What the batch plan hands the dataset: a position in an epoch's order (and the sample when streamed)."""

    epoch: int
    index: int
    sample: Sample | None = None


@dataclass
class Item:
    encoded: Encoded
    pixels: list[torch.Tensor]
    origin: str
    #: With a feature cache: the cached encoder outputs of the images (``pixels`` is then empty).
    features: list[torch.Tensor] | None = None


@dataclass(frozen=True)
class Skipped:
    origin: str
    reason: str


@dataclass
class TrainBatch:
    """A collated micro-batch: ``batch`` is None when every sample was skipped."""

    batch: ModelBatch | None
    num_samples: int
    num_tokens: int  # supervised (loss) tokens
    num_input_tokens: int  # non-padding positions, image positions included
    skipped: list[Skipped]
    #: With a feature cache: ``[N_images, tokens, dim]`` encoder outputs in slot order (``batch.pixel_values`` is None).
    features: torch.Tensor | None = None

    @property
    def empty(self) -> bool:
        return self.batch is None

    def pin_memory(self) -> TrainBatch:
        """A copy in pinned host memory (what ``DataLoader(pin_memory=True)`` calls)."""
        return _map_tensors(self, torch.Tensor.pin_memory)

    def to(self, device: torch.device, non_blocking: bool = False) -> TrainBatch:
        return _map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` with ``fn`` applied to every tensor in it, through (nested) dataclasses."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(
            obj, **{f.name: _map_tensors(getattr(obj, f.name), fn) for f in dataclasses.fields(obj) if f.init}
        )
    return obj


class DevicePrefetcher:
    """The micro-batches of ``batches`` on ``device``, each one's host->device copy issued before the previous one is
    handed out, so it overlaps that step's work. On an accelerator the copies are ``non_blocking`` (the loader pins
    the batches: ``make_loader(pin_memory=True)``); on the CPU ``to`` returns the same tensors."""

    def __init__(self, batches: Iterable[TrainBatch], device: torch.device) -> None:
        self.batches, self.device = batches, device

    def __iter__(self) -> Iterator[TrainBatch]:
        source = iter(self.batches)
        ahead = self._copy(next(source, None))
        while ahead is not None:
            current, ahead = ahead, self._copy(next(source, None))  # issued before ``current``'s step runs
            yield current

    def _copy(self, batch: TrainBatch | None) -> TrainBatch | None:
        return None if batch is None else batch.to(self.device, non_blocking=pins_memory(self.device))


class SampleEncoder:
    """Sample -> :class:`Item` (training encoding: labels on answers) or :class:`Skipped`, through the model's
    :class:`MiniGPTProcessor` (the same encoding as ``processor.prepare(train=True)``) and its image ``transform``
    (:meth:`MiniGPTProcessor.image_transform`, augmenting or not).

    Holds the processor, not the model, so DataLoader workers do not copy the model. With ``features`` (a
    :class:`FeatureCache`) images are looked up there instead of being loaded and transformed."""

    def __init__(
        self,
        processor: MiniGPTProcessor,
        transform: ImageProcessor,
        seed: int = 0,
        features: FeatureCache | None = None,
    ) -> None:
        self.processor, self.transform, self.seed, self.features = processor, transform, seed, features

    @classmethod
    def for_processor(
        cls,
        processor: MiniGPTProcessor,
        train: bool,
        seed: int = 0,
        min_scale: float = 0.5,
        hflip: bool = False,
        features: FeatureCache | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> SampleEncoder:
        """The encoder of a model's processor (the augmenting image transform when ``train``)."""
        return cls(processor, processor.image_transform(train, min_scale, hflip, max_pixels), seed, features)

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def image_tokens(self) -> int:
        return self.processor.image_tokens

    def length(self, sample: Sample) -> int:
        """Positions the sample takes (text tokens + image slots), without opening its images; 0 if it cannot encode."""
        try:
            return len(self.processor.encode(sample.conversation, train=True))
        except ValueError:
            return 0

    def __call__(self, sample: Sample, position: Any) -> Item | Skipped:
        origin = sample.origin or (f"sample {sample.id}" if sample.id else f"sample at {position}")
        try:
            sample.check()
            encoded = self.processor.encode(sample.conversation, train=True)
            if encoded.num_images_slots != self.image_tokens * len(sample.images):
                raise ValueError("max_txt_len cuts off an image; raise model.max_txt_len")
            if self.features is not None:
                features = [self.features.lookup(image, origin) for image in sample.images]
                return Item(encoded, [], origin, features)
            self.transform.rng.seed(f"{self.seed}:{position}")  # the crop depends on the position only
            pixels = [self.transform(image, origin) for image in sample.images]
        except (ValueError, OSError) as err:  # ImageError is a ValueError
            return Skipped(origin, str(err))
        return Item(encoded, pixels, origin)


class TrainDataset(torch.utils.data.Dataset):
    """Map from :class:`Key` to an encoded :class:`Item` (or :class:`Skipped`).

    ``source`` is indexed by position (a :class:`MixedDataset`, switched to the key's epoch, or a plain list);
    streamed keys carry their sample."""

    def __init__(self, source: Sequence[Sample] | None, encoder: SampleEncoder) -> None:
        self.source, self.encoder = source, encoder
        self._epoch = 0

    def __len__(self) -> int:
        return len(self.source) if self.source is not None else 0

    def __getitem__(self, key: Key) -> Item | Skipped:  # type: ignore[override]
        sample = key.sample
        if sample is None:
            if isinstance(self.source, MixedDataset) and key.epoch != self._epoch:
                self.source.set_epoch(key.epoch)
                self._epoch = key.epoch
            sample = self.source[key.index]  # type: ignore[index]
        return self.encoder(sample, (key.epoch, key.index))


def collate_items(items: list[Item | Skipped], pad_id: int, pack_len: int | None = None) -> TrainBatch:
    """Drop skipped samples (reporting them), right-pad the rest (or, with ``pack_len``, pack them into rows of that
    many positions: :mod:`minigpt.data.packing`) and stack their pixels or cached features in slot order."""
    good = [x for x in items if isinstance(x, Item)]
    skipped = [x for x in items if isinstance(x, Skipped)]
    if not good:
        return TrainBatch(None, 0, 0, 0, skipped)
    if pack_len is None:
        text = collate_text([x.encoded for x in good], pad_id, side="right")
    else:
        text, order = collate_packed([x.encoded for x in good], pad_id, pack_len)
        good = [good[i] for i in order]
    text = text.with_indices()  # here, on the CPU: the step then reads no mask back from the device
    pixels = [p for x in good for p in x.pixels]
    feats = [f for x in good for f in (x.features or [])]
    batch = ModelBatch(text, torch.stack(pixels) if pixels else None)
    num_input = sum(len(x.encoded) for x in good)
    return TrainBatch(
        batch, len(good), text.target_index.numel(), num_input, skipped, torch.stack(feats) if feats else None
    )


class BatchPlan:
    """The keys of this process's micro-batches ``start .. stop-1`` (counted over the whole run).

    Micro-batch ``m`` is number ``m % micro_per_epoch`` of epoch ``m // micro_per_epoch`` and covers the
    ``batch_size * world_size`` positions after the previous one; process ``rank`` takes its ``batch_size`` of them.
    An optimizer step of ``A`` micro-batches therefore covers the same samples whatever the split between
    accumulation, batch size and processes, and resuming at micro-batch ``m`` continues exactly. ``order`` (map-style
    data only) maps an epoch to a permutation of its positions, e.g. :class:`LengthGrouper`."""

    def __init__(
        self,
        batch_size: int,
        micro_per_epoch: int,
        start: int,
        stop: int,
        rank: int = 0,
        world_size: int = 1,
        stream: Iterable[Sample] | None = None,
        order: Callable[[int], Sequence[int]] | None = None,
    ) -> None:
        self.batch_size, self.micro_per_epoch = batch_size, micro_per_epoch
        self.start, self.stop, self.rank, self.world_size, self.stream = start, stop, rank, world_size, stream
        self.order = order

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[Key]]:
        b, span = self.batch_size, self.batch_size * self.world_size
        samples = iter(self.stream) if self.stream is not None else None
        if samples is not None:
            for _ in range(self.start * span):  # a stream is replayed up to the resume position
                next(samples)
        for m in range(self.start, self.stop):
            epoch, within = divmod(m, self.micro_per_epoch)
            if samples is None:
                first = within * span + self.rank * b
                if self.order is None:
                    yield [Key(epoch, first + i) for i in range(b)]
                else:
                    order = self.order(epoch)
                    yield [Key(epoch, int(order[first + i])) for i in range(b)]
            else:
                group = [next(samples) for _ in range(span)]
                first = m * span + self.rank * b
                yield [Key(epoch, first + i, s) for i, s in enumerate(group[self.rank * b : (self.rank + 1) * b])]


class _Reshuffled:
    """A map-style dataset as a stream: a new seeded order on every pass (for mixing with webdataset)."""

    def __init__(self, samples: Sequence[Sample], seed: int) -> None:
        self.samples, self.seed, self.passes = samples, seed, 0

    def __iter__(self) -> Iterator[Sample]:
        order = list(range(len(self.samples)))
        random.Random(f"{self.seed}:{self.passes}").shuffle(order)
        self.passes += 1
        return (self.samples[i] for i in order)


def check_usable(dataset: Iterable[Sample], encoder: SampleEncoder, name: str) -> Item:
    """The first record of ``dataset`` that encodes; ``ValueError`` when there is none."""
    skipped: list[Skipped] = []
    for i, sample in enumerate(dataset):
        result = encoder(sample, ("check", i))
        if isinstance(result, Item):
            return result
        skipped.append(result)
    first = f"; first: {skipped[0].origin}: {skipped[0].reason}" if skipped else ""
    raise ValueError(f"{name}: no valid record ({len(skipped)} skipped{first})")


class LengthGrouper:
    """The length-grouped order of an epoch's positions (:func:`minigpt.data.packing.length_grouped_order`).

    Lengths come from tokenizing each distinct sample once (text only, images are not opened); the epoch's mix is
    drawn by a private copy of the :class:`MixedDataset`, so the loader's own is not disturbed."""

    def __init__(
        self, mixed: MixedDataset, encoder: SampleEncoder, step_size: int, window_steps: int, seed: int
    ) -> None:
        self.mixed = MixedDataset(mixed.datasets, mixed.weights.tolist(), mixed.seed, mixed.length)
        self.encoder, self.step_size, self.window_steps, self.seed = encoder, step_size, window_steps, seed
        self._lengths: dict[int, int] = {}
        self._epoch: int | None = None
        self._order: list[int] = []

    def lengths(self, epoch: int) -> list[int]:
        self.mixed.set_epoch(epoch)
        out = []
        for i in range(len(self.mixed)):
            sample = self.mixed[i]
            n = self._lengths.get(id(sample))
            if n is None:
                n = self._lengths[id(sample)] = self.encoder.length(sample)
            out.append(n)
        return out

    def __call__(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            self._order = length_grouped_order(self.lengths(epoch), self.step_size, self.window_steps, self.seed, epoch)
            self._epoch = epoch
        return self._order


@dataclass(frozen=True)
class LoaderSettings:
    """How :meth:`TrainData.loader` batches: micro-batches of ``batch_size`` samples, ``grad_accum`` of them per
    optimizer step, padded with ``pad_id`` (or packed into rows of ``pack_len`` positions), read by ``num_workers``
    processes, in pinned memory with ``pin_memory``."""

    batch_size: int
    grad_accum: int
    pad_id: int
    num_workers: int = 0
    pack_len: int | None = None
    pin_memory: bool = False


class TrainData:
    """The training datasets of a config, mixed by ratio, with the epoch length in optimizer steps.

    Every dataset is checked to hold at least one usable record before training starts. ``group_by_length`` orders
    each epoch so that optimizer steps hold samples of similar length (:class:`LengthGrouper`, windows of
    ``group_window`` steps; map-style datasets only)."""

    def __init__(
        self,
        specs: Sequence[Any],
        encoder: SampleEncoder,
        seed: int,
        global_batch: int,
        iters_per_epoch: int | None = None,
        group_by_length: bool = False,
        group_window: int = 64,
    ) -> None:
        datasets = [read_dataset(spec.reader_spec()) for spec in specs]
        firsts = [check_usable(dataset, encoder, f"dataset {spec.path}") for spec, dataset in zip(specs, datasets)]
        #: A one-sample batch that stands in (with weight 0) for a micro-batch whose samples were all skipped.
        self.example_batch = collate_items(firsts[:1], encoder.tokenizer.pad_token_id)
        self.example = self.example_batch.batch
        ratios = [spec.ratio for spec in specs]
        self.stream: MixedStream | None = None
        if any(isinstance(d, WebDatasetReader) for d in datasets):
            if iters_per_epoch is None:
                raise ValueError("run.iters_per_epoch is required when a dataset is streamed (webdataset)")
            parts = [_Reshuffled(d, seed + k) if isinstance(d, SampleList) else d for k, d in enumerate(datasets)]
            self.stream = MixedStream(parts, ratios, seed)
            self.source: MixedDataset | None = None
            self.steps_per_epoch = iters_per_epoch
        else:
            total = sum(len(d) for d in datasets)
            self.steps_per_epoch = iters_per_epoch or total // global_batch
            if self.steps_per_epoch == 0:
                raise ValueError(
                    f"the training data has {total} samples, fewer than one optimizer step's {global_batch} "
                    "(batch_size x grad_accum x processes)"
                )
            self.source = MixedDataset(datasets, ratios, seed, length=self.steps_per_epoch * global_batch)
        self.sizes = [len(d) if isinstance(d, SampleList) else None for d in datasets]
        self.read_skipped = sum(len(d.report.skipped) for d in datasets if isinstance(d, SampleList))
        self._streamed = [d for d in datasets if isinstance(d, WebDatasetReader)]
        self._checked = sum(d.skipped_total for d in self._streamed)  # skipped by check_usable, before training
        self.dataset = TrainDataset(self.source, encoder)
        self.grouper: LengthGrouper | None = None
        if group_by_length:
            if self.source is None:
                raise ValueError(
                    "data.group_by_length needs map-style datasets; a webdataset is streamed "
                    "(use data.packing for less padding there)"
                )
            self.grouper = LengthGrouper(self.source, encoder, global_batch, group_window, seed)

    @property
    def skipped_records(self) -> int:
        """Malformed records skipped: those of the map-style datasets (read up front) and those of the streamed ones
        that this process's batch plan has read so far."""
        return self.read_skipped + sum(d.skipped_total for d in self._streamed) - self._checked

    def loader(
        self, settings: LoaderSettings, steps: range, rank: int = 0, world_size: int = 1
    ) -> torch.utils.data.DataLoader:
        """Micro-batches of the optimizer ``steps`` (e.g. ``range(start, total)``) for process ``rank`` of
        ``world_size``."""
        accum = settings.grad_accum
        plan = BatchPlan(
            settings.batch_size,
            self.steps_per_epoch * accum,
            steps.start * accum,
            steps.stop * accum,
            rank,
            world_size,
            self.stream,
            self.grouper,
        )
        return make_loader(
            self.dataset, plan, settings.pad_id, settings.num_workers, settings.pack_len, settings.pin_memory
        )


def eval_loader(
    specs: Sequence[Any],
    encoder: SampleEncoder,
    batch_size: int,
    rank: int,
    world_size: int,
    pad_id: int,
    num_workers: int = 0,
) -> torch.utils.data.DataLoader:
    """Every eval record once, positions ``rank::world_size``, in file order (streamed sets are read into memory)."""
    samples: list[Sample] = []
    for spec in specs:
        dataset = read_dataset(spec.reader_spec())
        check_usable(dataset, encoder, f"eval dataset {spec.path}")
        samples.extend(dataset)
    mine = list(range(rank, len(samples), world_size))
    batches = [[Key(0, i) for i in mine[j : j + batch_size]] for j in range(0, len(mine), batch_size)]
    return make_loader(TrainDataset(samples, encoder), batches, pad_id, num_workers)


def make_loader(
    dataset: TrainDataset,
    plan: Iterable[list[Key]],
    pad_id: int,
    num_workers: int,
    pack_len: int | None = None,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=plan,  # type: ignore[arg-type]
        collate_fn=functools.partial(collate_items, pad_id=pad_id, pack_len=pack_len),
        num_workers=num_workers,
        pin_memory=pin_memory,
        # Its own generator: creating a loader must not draw from the global torch RNG (exact resume).
        generator=torch.Generator().manual_seed(0),
    )


__all__ = [
    "Key",
    "Item",
    "Skipped",
    "TrainBatch",
    "DevicePrefetcher",
    "SampleEncoder",
    "TrainDataset",
    "collate_items",
    "BatchPlan",
    "TrainData",
    "LengthGrouper",
    "check_usable",
    "eval_loader",
    "make_loader",
]
