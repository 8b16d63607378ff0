"""Visual-feature cache: the frozen vision encoder's outputs (ViT + ln_vision + Q-Former), computed once.

With the vision encoder and the Q-Former frozen and no image augmentation, an image always gives the same
Q-Former output, so stage 1 need not run the ViT every step: ``minigpt data cache-features`` computes the outputs
once and training reads them (``data.feature_cache``). What is cached is the encoder output *before* the
projector (``[num_tokens, out_dim]`` per image, 32 x 768 for BLIP-2), so the projector still trains; the loss is the
same as computing the encoder in the step (up to the storage dtype's rounding: float16 by default).

A cache is a folder::

    cache.json                    manifest: vision config, weight fingerprint, image transform, dtype, shards
    features-00000.safetensors    tensor "features" [N, tokens, dim] + metadata "keys" (JSON list of N keys)

An image's key is the BLAKE2b-128 hash of its bytes (the file's contents for a path, the encoded bytes of a
webdataset sample), so a moved or renamed file still hits and identical images are stored once. Shards are read
lazily through memory maps, so a cache larger than memory works. Running ``cache-features`` again on the same
folder adds only the missing images (an interrupted run resumes).

The cache is refused (``ValueError`` naming the cause) when the model's vision config, weights or image transform
differ from those it was computed with, and by the training config when the vision encoder or the Q-Former train or
augmentation is on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..files import atomic_path, atomic_write_text, save_safetensors
from .conversation import Sample
from .images import ImageError, ImageProcessor

log = logging.getLogger(__name__)

MANIFEST = "cache.json"
FORMAT_VERSION = 1
TENSOR = "features"
SAMPLE_PER_TENSOR = 1024  # elements per weight tensor in the fingerprint
TOLERANCE = 1e-3  # relative, on the fingerprint's sums (tolerates float16/bfloat16 copies of the same weights)


# ---------------------------------------------------------------------------------------------- keys and checks


def image_key(image: Any, origin: str | None = None) -> str:
    """The cache key of an image: a hash of its bytes (file contents, encoded bytes or raw pixels)."""
    h = hashlib.blake2b(digest_size=16)
    if isinstance(image, (str, Path)):
        path = Path(image)
        try:
            h.update(path.read_bytes())
        except OSError as err:
            where = f" (in {origin})" if origin else ""
            raise ImageError(f"cannot read image {path}{where}: {err.strerror or err}") from None
    elif isinstance(image, (bytes, bytearray, memoryview)):
        h.update(bytes(image))
    else:
        if isinstance(image, torch.Tensor):
            array = image.detach().cpu().numpy()
        elif isinstance(image, np.ndarray):
            array = image
        else:  # a PIL image
            array = np.asarray(image)
            h.update(str(getattr(image, "mode", "")).encode())
        h.update(f"{array.dtype}{array.shape}".encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def weight_fingerprint(module: nn.Module) -> dict[str, list[Any]]:
    """Per state-dict tensor: shape, and the sum and absolute sum of a strided sample of its values (float64)."""
    out: dict[str, list[Any]] = {}
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLE_PER_TENSOR)
        sample = flat[::step][:SAMPLE_PER_TENSOR].double().cpu()
        out[name] = [list(tensor.shape), float(sample.sum()), float(sample.abs().sum())]
    return out


def fingerprint_mismatch(expected: dict[str, list[Any]], actual: dict[str, list[Any]]) -> str | None:
    """None when both fingerprints describe the same weights (up to a half-precision copy), else the first difference."""
    if set(expected) != set(actual):
        diff = sorted(set(expected) ^ set(actual))
        return f"different parameters ({', '.join(diff[:3])}{', ...' if len(diff) > 3 else ''})"
    for name in expected:
        (shape_a, sum_a, abs_a), (shape_b, sum_b, abs_b) = expected[name], actual[name]
        if list(shape_a) != list(shape_b):
            return f"{name} has shape {list(shape_b)}, the cache's encoder {list(shape_a)}"
        scale = max(abs_a, abs_b, 1e-12)
        if abs(sum_a - sum_b) > TOLERANCE * scale or abs(abs_a - abs_b) > TOLERANCE * scale:
            return f"{name} holds other values"
    return None


def transform_of(config: Any) -> dict[str, Any]:
    """What the pixels depend on: the eval transform (bicubic resize to size x size, normalise)."""
    return {"resize": "bicubic", "size": config.image_size, "mean": list(config.mean), "std": list(config.std)}


def _vision_config_dict(config: Any) -> dict[str, Any]:
    data = config.to_dict()
    data["mean"], data["std"] = list(data["mean"]), list(data["std"])
    return data


def check_trainable(freeze: dict[str, bool], augment: bool, use_qformer: bool = True) -> None:
    """Refuse a feature cache where the encoder output would change while training: a trainable vision encoder or
    Q-Former, or augmented images."""
    moving = [p for p in ("vision", "qformer") if not freeze.get(p, True) and (p == "vision" or use_qformer)]
    if moving:
        raise ValueError(
            f"data.feature_cache needs the vision encoder and Q-Former frozen, but {' and '.join(moving)} train "
            "(cached features come from frozen weights); set model.freeze." + "/".join(moving) + ": true or drop "
            "data.feature_cache"
        )
    if augment:
        raise ValueError(
            "data.feature_cache needs data.augment: false (features are computed once from the eval resize; a random "
            "crop would differ every epoch)"
        )


# ---------------------------------------------------------------------------------------------- reading


class FeatureCache:
    """A cache folder, opened for lookups (lazily: shards are memory-mapped per process on first use)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(
                f"{self.path} is not a feature cache (no {MANIFEST}); write one with `minigpt data cache-features`"
            )
        self.manifest = json.loads(manifest.read_text())
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{manifest}: unsupported feature cache version {self.manifest.get('format_version')}")
        self._index: dict[str, tuple[int, int]] | None = None
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    # -- description
    @property
    def shards(self) -> list[str]:
        return list(self.manifest["shards"])

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["num_tokens"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    @property
    def index(self) -> dict[str, tuple[int, int]]:
        if self._index is None:
            from safetensors import safe_open

            index: dict[str, tuple[int, int]] = {}
            for s, name in enumerate(self.shards):
                with safe_open(str(self.path / name), framework="pt") as f:
                    keys = json.loads((f.metadata() or {}).get("keys", "[]"))
                for row, key in enumerate(keys):
                    index.setdefault(key, (s, row))
            self._index = index
        return self._index

    def check(self, encoder: nn.Module) -> None:
        """Raise ``ValueError`` unless the cache was computed with this encoder (config, weights, transform)."""
        config = encoder.config  # type: ignore[attr-defined]
        mine, theirs = _vision_config_dict(config), self.manifest["vision"]
        if mine != theirs:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ValueError(
                f"feature cache {self.path} was computed with another vision config "
                f"(differs in {', '.join(diff)}); recompute it with `minigpt data cache-features`"
            )
        problem = fingerprint_mismatch(self.manifest["fingerprint"], weight_fingerprint(encoder))
        if problem:
            raise ValueError(
                f"feature cache {self.path} was computed with other vision weights ({problem}); "
                "recompute it with `minigpt data cache-features` for this model"
            )
        if self.manifest["transform"] != transform_of(config):
            raise ValueError(f"feature cache {self.path} was computed with another image transform")

    # -- lookups
    def get(self, key: str) -> torch.Tensor | None:
        """``[num_tokens, dim]`` for ``key`` (in the stored dtype), or None."""
        where = self.index.get(key)
        if where is None:
            return None
        shard, row = where
        return self._handle(shard).get_slice(TENSOR)[row : row + 1][0]

    def lookup(self, image: Any, origin: str | None = None) -> torch.Tensor:
        """The features of ``image``; ``ValueError`` (so the sample is skipped and named) when it is not cached."""
        key = image_key(image, origin)
        found = self.get(key)
        if found is None:
            name = image if isinstance(image, (str, Path)) else type(image).__name__
            where = f" (in {origin})" if origin else ""
            raise ValueError(
                f"image {name}{where} is not in the feature cache {self.path}; run "
                "`minigpt data cache-features` on this dataset"
            )
        return found

    def _handle(self, shard: int) -> Any:
        if self._pid != os.getpid():  # a forked DataLoader worker opens its own maps
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(shard)
        if handle is None:
            from safetensors import safe_open

            handle = safe_open(str(self.path / self.shards[shard]), framework="pt")
            self._handles[shard] = handle
        return handle

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


def open_feature_cache(path: str | Path, model: Any, augment: bool) -> FeatureCache:
    """Open ``path`` for training ``model`` (a MiniGPT): refuse it when it does not apply (see the module doc)."""
    check_trainable(model.config.freeze, augment, model.config.vision.use_qformer)
    cache = FeatureCache(path)
    cache.check(model.vision)
    log.info("visual features from %s (%d images); the vision encoder does not run in training steps", path, len(cache))
    return cache


def project_features(model: Any, features: torch.Tensor) -> torch.Tensor:
    """Cached encoder outputs ``[N, tokens, dim]`` -> LLM-space image embeddings (the projector, which trains);
    what :meth:`MiniGPT.encode_images` does after the encoder."""
    return model.projector(features.to(device=model.projector_weight.device, dtype=model.projector_weight.dtype))


# ---------------------------------------------------------------------------------------------- writing


@dataclass
class CacheReport:
    path: str
    images: int = 0  # distinct images seen
    written: int = 0  # computed now
    reused: int = 0  # already in the cache
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (origin, reason): unreadable images

    def summary(self) -> str:
        lines = [
            f"{self.path}: {self.images} distinct images, {self.written} computed, {self.reused} already cached, "
            f"{len(self.skipped)} skipped"
        ]
        lines += [f"  skipped {origin}: {reason}" for origin, reason in self.skipped[:5]]
        if len(self.skipped) > 5:
            lines.append(f"  ... and {len(self.skipped) - 5} more")
        return "\n".join(lines)


class _Writer:
    """Appends shards and rewrites the manifest after each (atomically), so an interrupted run keeps its work."""

    def __init__(self, path: Path, manifest: dict[str, Any], dtype: torch.dtype, shard_size: int) -> None:
        self.path, self.manifest, self.dtype, self.shard_size = path, manifest, dtype, shard_size
        self.keys: list[str] = []
        self.rows: list[torch.Tensor] = []

    def add(self, keys: list[str], features: torch.Tensor) -> None:
        self.keys.extend(keys)
        self.rows.extend(features.to("cpu", self.dtype).unbind(0))
        while len(self.keys) >= self.shard_size:
            self._write(self.shard_size)

    def flush(self) -> None:
        if self.keys:
            self._write(len(self.keys))

    def _write(self, n: int) -> None:
        name = f"features-{len(self.manifest['shards']):05d}.safetensors"
        with atomic_path(self.path / name) as tmp:
            rows = torch.stack(self.rows[:n]).contiguous()
            save_safetensors({TENSOR: rows}, str(tmp), metadata={"keys": json.dumps(self.keys[:n])})
        self.keys, self.rows = self.keys[n:], self.rows[n:]
        self.manifest["shards"].append(name)
        self.manifest["count"] = self.manifest.get("count", 0) + n
        write_manifest(self.path, self.manifest)


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(path / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def _images(samples: Iterable[Sample], report: CacheReport) -> Iterator[tuple[str, Any, str]]:
    """(key, image, origin) of each distinct image of ``samples``; unreadable ones are reported and left out."""
    seen: set[str] = set()
    for n, sample in enumerate(samples):
        for j, image in enumerate(sample.images):
            origin = sample.origin or f"sample {n}"
            if len(sample.images) > 1:
                origin += f" image {j}"
            try:
                key = image_key(image, origin)
            except ValueError as err:
                report.skipped.append((origin, str(err)))
                continue
            if key not in seen:
                seen.add(key)
                yield key, image, origin


@dataclass(frozen=True)
class FeatureOptions:
    """How :func:`cache_features` computes and stores: the ``device`` the encoder runs on, the storage ``dtype``,
    ``amp`` (the autocast dtype to run the encoder in; None: its own dtype), images per encoder call
    (``batch_size``), images per shard file (``shard_size``), image-decoding threads (``workers``) and a progress
    bar."""

    device: torch.device | str = "cpu"
    dtype: str | torch.dtype = "float16"
    amp: torch.dtype | None = None
    batch_size: int = 32
    shard_size: int = 4096
    workers: int = 4
    progress: bool = False


@torch.inference_mode()
def cache_features(
    encoder: nn.Module, samples: Iterable[Sample], out: str | Path, options: FeatureOptions = FeatureOptions()
) -> CacheReport:
    """Compute ``encoder(pixels)`` for every distinct image of ``samples`` (eval transform) and store it in ``out``
    (see :class:`FeatureOptions`).

    Images already in ``out`` (same encoder) are not computed again; unreadable images are reported in the result
    and left out (training skips their samples, naming them)."""
    from ..device import autocast, parse_dtype

    out, device, store = Path(out), torch.device(options.device), parse_dtype(options.dtype)
    config = encoder.config  # type: ignore[attr-defined]
    manifest = {
        "format_version": FORMAT_VERSION,
        "vision": _vision_config_dict(config),
        "fingerprint": weight_fingerprint(encoder),
        "transform": transform_of(config),
        "dtype": str(store).removeprefix("torch."),
        "num_tokens": config.num_tokens,
        "dim": config.out_dim,
        "shards": [],
        "count": 0,
    }
    known: set[str] = set()
    if (out / MANIFEST).is_file():
        existing = FeatureCache(out)
        existing.check(encoder)
        if existing.manifest["dtype"] != manifest["dtype"]:
            raise ValueError(f"{out} holds {existing.manifest['dtype']} features; pass that dtype or another folder")
        manifest = existing.manifest
        known = set(existing.index)
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not a feature cache; choose an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob(".*.tmp"):
        leftover.unlink()
    report = CacheReport(str(out))
    writer = _Writer(out, manifest, store, options.shard_size)
    processor = ImageProcessor(config.image_size, config.mean, config.std, train=False)
    encoder = encoder.to(device).eval()
    bar = None
    if options.progress:
        from ..console import progress_bar

        bar = progress_bar(desc="features", unit="img", dynamic_ncols=True)

    def load(job: tuple[str, Any, str]) -> tuple[str, torch.Tensor | None, str, str]:
        key, image, origin = job
        try:
            return key, processor(image, origin), origin, ""
        except (OSError, ValueError) as err:  # ImageError is a ValueError
            return key, None, origin, str(err)

    def run(jobs: list[tuple[str, Any, str]], pool: ThreadPoolExecutor) -> None:
        keys, pixels = [], []
        for key, px, origin, error in pool.map(load, jobs):
            if px is None:
                report.skipped.append((origin, error))
            else:
                keys.append(key)
                pixels.append(px)
        if pixels:
            with autocast(device, options.amp):
                feats = encoder(torch.stack(pixels).to(device))
            writer.add(keys, feats.float())
            report.written += len(keys)
        if bar is not None:
            bar.update(len(jobs))

    with ThreadPoolExecutor(max(1, options.workers)) as pool:
        jobs: list[tuple[str, Any, str]] = []
        for job in _images(samples, report):
            report.images += 1
            if job[0] in known:
                report.reused += 1
                if bar is not None:
                    bar.update(1)
                continue
            jobs.append(job)
            if len(jobs) == options.batch_size:
                run(jobs, pool)
                jobs = []
        if jobs:
            run(jobs, pool)
    writer.flush()
    if not manifest["shards"]:
        write_manifest(out, manifest)  # an empty (but valid) cache
    if bar is not None:
        bar.close()
    return report


__all__ = [
    "FeatureCache",
    "CacheReport",
    "FeatureOptions",
    "cache_features",
    "open_feature_cache",
    "project_features",
    "image_key",
    "weight_fingerprint",
    "check_trainable",
]
