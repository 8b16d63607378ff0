"""Loading images of any common kind as RGB, and the BLIP-2 pixel transforms (eval and train).

Conversion policy (convert, never reject):

- alpha (RGBA, LA, PA, P with a transparent colour) is composited on white (the originals' ``.convert("RGB")``
  drops alpha, which shows whatever colour hides under transparent pixels, often black);
- 16-bit integer data (``I;16*`` modes, uint16 arrays) is scaled ``round(x / 257)``, so 65535 -> 255, never clipped;
- 32-bit integer data (mode ``I``, other integer arrays) is taken as 8-bit when it lies in [0, 255], as 16-bit when it
  lies in [0, 65535], else rescaled from its min..max;
- float data (mode ``F``, float arrays) is taken as [0, 1] when it lies there (x * 255), else rescaled from its
  min..max; NaN becomes 0;
- EXIF orientation is not applied (as in LAVIS / MiniGPT-4); a multi-frame file gives its first frame.
"""

from __future__ import annotations

import io
import math
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image as PILImage

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


_DECODE_ERRORS = (OSError, SyntaxError, ValueError, PILImage.DecompressionBombError)


class ImageError(ValueError):
    """An image that cannot be found or decoded; the message names the file (and the sample's origin)."""


def _where(origin: str | None) -> str:
    return f" (in {origin})" if origin else ""


def load_image(source: Any, origin: str | None = None) -> PILImage.Image:
    """Load a path, PIL image, numpy array (HW or HWC) or encoded bytes as a fully decoded RGB PIL image."""
    if isinstance(source, PILImage.Image):
        try:
            source.load()
        except _DECODE_ERRORS as e:
            name = getattr(source, "filename", "") or "<PIL image>"
            raise ImageError(f"cannot read image {name}{_where(origin)}: {e}") from e
        return _to_rgb(source)
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, origin)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _open(io.BytesIO(bytes(source)), "<bytes>", origin)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            what = "is not a file" if path.exists() else "not found"
            raise ImageError(f"image file {what}: {path}{_where(origin)}")
        return _open(path, str(path), origin)
    raise ImageError(f"cannot load an image from {type(source).__name__}{_where(origin)}")


def _open(fp: Any, name: str, origin: str | None) -> PILImage.Image:
    try:
        with PILImage.open(fp) as img:
            img.load()  # full decode, so truncated files fail here and not later in a worker
            return _to_rgb(img)
    except _DECODE_ERRORS as e:
        raise ImageError(f"cannot read image {name}{_where(origin)}: {e}") from e


def _to_rgb(img: PILImage.Image) -> PILImage.Image:
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode.startswith("I") or mode == "F":
        return PILImage.fromarray(_to_uint8(np.asarray(img)), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PILImage.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _array_to_rgb(a: np.ndarray, origin: str | None) -> PILImage.Image:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (2, 3, 4)) or a.size == 0:
        raise ImageError(f"expected an HW or HWC (C = 1..4) image array, got shape {a.shape}{_where(origin)}")
    a = np.ascontiguousarray(_to_uint8(a))
    mode = "L" if a.ndim == 2 else {2: "LA", 3: "RGB", 4: "RGBA"}[a.shape[2]]
    return _to_rgb(PILImage.fromarray(a, mode))


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Scale integer or float pixel data to uint8 following the module's policy."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype.kind in "ui":
        lo, hi = int(a.min()), int(a.max())
        if (a.dtype.kind == "u" and a.dtype.itemsize == 2) or (lo >= 0 and 255 < hi <= 65535):
            return np.round(a.astype(np.float64) / 257).astype(np.uint8)
        if lo >= 0 and hi <= 255:
            return a.astype(np.uint8)
        return _rescale(a.astype(np.float64), lo, hi)
    if a.dtype.kind == "f":
        x = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(x.min()), float(x.max())
        if lo >= 0.0 and hi <= 1.0:
            return np.round(x * 255).astype(np.uint8)
        return _rescale(x, lo, hi)
    raise ImageError(f"unsupported image data type {a.dtype}")


def _rescale(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.round((x - lo) * (255.0 / ((hi - lo) or 1.0))).astype(np.uint8)


class ImageProcessor:
    """Image -> normalised ``[3, S, S]`` float tensor, as the BLIP-2 processors of the originals.

    Eval (MiniGPT-4 ``blip2_image_eval``): bicubic resize to SxS, /255, ``(x - mean) / std``.
    Train (MiniGPT-4 M1 ``blip2_image_train``): torchvision's RandomResizedCrop algorithm with ``scale=(min_scale, 1)``,
    ratio (3/4, 4/3), bicubic; no flip unless ``hflip`` (LAVIS flips). Randomness comes from ``self.rng``, a
    ``random.Random(seed)``; reseed it per DataLoader worker (``processor.rng.seed(seed + worker_id)``).
    A torch tensor is taken as already processed pixels (as MiniGPT-4's Chat does) and only checked.
    """

    def __init__(
        self,
        size: int = 224,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        train: bool = False,
        min_scale: float = 0.5,
        hflip: bool = False,
        seed: int | None = None,
    ) -> None:
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
        self.size, self.train, self.min_scale, self.hflip = size, train, min_scale, hflip
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.rng = random.Random(seed)

    def __call__(self, image: Any, origin: str | None = None) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            if tuple(image.shape) != (3, self.size, self.size):
                raise ImageError(
                    f"a tensor image must be processed pixels of shape (3, {self.size}, {self.size}), "
                    f"got {tuple(image.shape)}{_where(origin)}"
                )
            return image.float()
        img = load_image(image, origin)
        if self.train:
            img = self._random_resized_crop(img)
            if self.hflip and self.rng.random() < 0.5:
                img = img.transpose(PILImage.Transpose.FLIP_LEFT_RIGHT)
        else:
            img = img.resize((self.size, self.size), PILImage.Resampling.BICUBIC)
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
        return (x - self.mean) / self.std

    def batch(self, images: Sequence[Any], origins: Sequence[str | None] | None = None) -> torch.Tensor:
        """Process several images into ``[N, 3, S, S]``."""
        origins = origins if origins is not None else [None] * len(images)
        if not images:
            return torch.empty(0, 3, self.size, self.size)
        return torch.stack([self(img, origin) for img, origin in zip(images, origins, strict=True)])

    def _random_resized_crop(self, img: PILImage.Image) -> PILImage.Image:
        """torchvision ``RandomResizedCrop.get_params`` (10 tries, then a centre crop) + bicubic resize."""
        width, height = img.size
        area = width * height
        lo_ratio, hi_ratio = math.log(3 / 4), math.log(4 / 3)
        for _ in range(10):
            target = area * self.rng.uniform(self.min_scale, 1.0)
            aspect = math.exp(self.rng.uniform(lo_ratio, hi_ratio))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = self.rng.randint(0, height - h)
                left = self.rng.randint(0, width - w)
                break
        else:
            in_ratio = width / height
            if in_ratio < 3 / 4:
                w, h = width, round(width / (3 / 4))
            elif in_ratio > 4 / 3:
                w, h = round(height * (4 / 3)), height
            else:
                w, h = width, height
            top, left = (height - h) // 2, (width - w) // 2
        crop = img.crop((left, top, left + w, top + h))
        return crop.resize((self.size, self.size), PILImage.Resampling.BICUBIC)
