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

Pixel limit: an image with more than ``max_pixels`` pixels is refused (:class:`ImageTooLargeError`) from the
width and height in its header, before any pixel is decoded (PIL opens files lazily). Decoding costs about
3 bytes per pixel for the RGB image plus as much again for the conversion (up to ~15 bytes per pixel for images with
alpha), so the default :data:`DEFAULT_MAX_PIXELS` (4096 x 4096 = 16.8 MP: 12 MP phone photos and 4K screenshots
pass) bounds one decode at ~100-250 MB. Pillow's own limit (~179 MP) lets a 530 KB PNG take 1.75 GB. While a
limit of ours applies, Pillow's ``DecompressionBombWarning`` is silenced (our refusal, or our larger limit, decides).
"""

from __future__ import annotations

import io
import math
import random
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


#: Largest image (width x height) decoded by default: see the module doc for the memory it bounds.
DEFAULT_MAX_PIXELS = 4096 * 4096

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, PILImage.DecompressionBombError)


class ImageError(ValueError):
    """An image that cannot be found or decoded; the message names the file (and the sample's origin)."""


class ImageTooLargeError(ImageError):
    """An image with more pixels than allowed, refused before decoding."""


def _where(origin: str | None) -> str:
    return f" (in {origin})" if origin else ""


def check_pixels(size: tuple[int, int], max_pixels: int | None, name: str, origin: str | None = None) -> None:
    """:class:`ImageTooLargeError` naming the pixel count and the limit when ``size`` (width, height) exceeds it."""
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"image {name}{_where(origin)} has {width}x{height} = {width * height:,} pixels, more than the limit of "
            f"{max_pixels:,}"
        )


def load_image(source: Any, origin: str | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> PILImage.Image:
    """Load a path, PIL image, numpy array (HW or HWC) or encoded bytes as a fully decoded RGB PIL image.

    Encoded images (files, bytes, lazily opened PIL images) over ``max_pixels`` (None: no limit) are refused before
    they are decoded; images already in memory (decoded PIL images, arrays) are not checked again."""
    if isinstance(source, PILImage.Image):
        name = getattr(source, "filename", "") or "<PIL image>"
        if getattr(source, "tile", None):  # opened, not decoded yet
            check_pixels(source.size, max_pixels, name, origin)
        try:
            source.load()
        except _DECODE_ERRORS as e:
            raise ImageError(f"cannot read image {name}{_where(origin)}: {e}") from e
        return _to_rgb(source)
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, origin)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return _open(io.BytesIO(data), f"of {len(data):,} bytes", origin, max_pixels)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            what = "is not a file" if path.exists() else "not found"
            raise ImageError(f"image file {what}: {path}{_where(origin)}")
        return _open(path, str(path), origin, max_pixels)
    raise ImageError(f"cannot load an image from {type(source).__name__}{_where(origin)}")


def _open(fp: Any, name: str, origin: str | None, max_pixels: int | None) -> PILImage.Image:
    try:
        with warnings.catch_warnings():
            if max_pixels is not None:  # checked below: Pillow's own warning would only repeat (or contradict) it
                warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
            with PILImage.open(fp) as img:  # reads the header only
                check_pixels(img.size, max_pixels, name, origin)
                img.load()  # full decode, so truncated files fail here and not later in a worker
                return _to_rgb(img)
    except PILImage.DecompressionBombError as e:  # over Pillow's own limit (twice ~89 MP), found at open
        raise ImageTooLargeError(f"image {name}{_where(origin)}: {e}") from e
    except ImageTooLargeError:
        raise
    except _DECODE_ERRORS as e:  # Pillow names an in-memory file by its repr (<_io.BytesIO object at 0x...>)
        detail = str(e).replace(f" {fp!r}", "")
        raise ImageError(f"cannot read image {name}{_where(origin)}: {detail}") from e


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
    A torch tensor is taken as already processed pixels (as MiniGPT-4's Chat does) and only checked. Images over
    ``max_pixels`` are refused before decoding (:func:`load_image`).
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
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
        self.size, self.train, self.min_scale, self.hflip = size, train, min_scale, hflip
        self.max_pixels = max_pixels
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
        img = load_image(image, origin, self.max_pixels)
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
