"""The one place that picks the device, the AMP dtype and the distributed backend.

Nothing else in the code names a device type: other modules call these helpers.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of float32, bfloat16, float16") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _npu_available() -> bool:
    try:
        import torch_npu  # noqa: F401
    except ImportError:
        return False
    return bool(getattr(torch, "npu", None) and torch.npu.is_available())


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda, npu (Ascend via torch_npu), mps, cpu, in that order of preference."""
    name = name.lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _npu_available():
            return torch.device("npu")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "npu": _npu_available(),
        "mps": torch.backends.mps.is_available(),
    }
    kind = name.split(":")[0]
    if kind not in available:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, npu or mps")
    if not available[kind]:
        hint = " (install torch_npu for Ascend NPUs)" if kind == "npu" else ""
        raise RuntimeError(f"device {name!r} was requested but is not available on this machine{hint}")
    return torch.device(name)


def amp_dtype(device: torch.device, requested: str = "auto") -> torch.dtype | None:
    """The autocast dtype: None (no AMP) on CPU unless asked, bf16 where supported, else fp16."""
    if requested in ("no", "none", "fp32", "float32"):
        return None
    if requested != "auto":
        return parse_dtype(requested)
    if device.type == "cpu":
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def dist_backend(device: torch.device) -> str:
    return {"cuda": "nccl", "npu": "hccl"}.get(device.type, "gloo")


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated accelerator memory since the last reset, or None on CPU."""
    module = getattr(torch, device.type, None)
    if device.type == "cpu" or module is None or not hasattr(module, "max_memory_allocated"):
        return None
    return module.max_memory_allocated(device) / 2**30
