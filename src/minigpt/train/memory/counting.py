"""Live tensor bytes: a dispatch mode that counts every storage an op creates until it is freed, and the bytes per
element of each dtype and quantisation (the one table the planner and the benchmark share).

:class:`LiveBytes` sees every aten op run while it is active, on real tensors (the benchmark's measurement on CPU)
and on fake ones (the planner's trace of a step, :mod:`.trace`): the peak it reports is the most bytes of tensor
storage alive at once, not the process's resident memory. Storages made before it started count when
:meth:`LiveBytes.track` is given them (the model's parameters).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

#: Bytes per element of a tensor dtype.
DTYPE_BYTES: dict[str, float] = {
    "float64": 8,
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "int64": 8,
    "int32": 4,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}
#: bitsandbytes blocks: 4-bit weights keep one float32 absmax per 64 weights; with double quantisation an 8-bit one,
#: plus one float32 per 256 of those.
BLOCK_4BIT, BLOCK_NESTED = 64, 256


def dtype_bytes(dtype: str | torch.dtype) -> float:
    """Bytes per element of ``dtype`` (a name as in the configs: ``float32``, ``bf16``, ... or a torch dtype)."""
    name = str(dtype).removeprefix("torch.")
    name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16", "float": "float32"}.get(
        name, name
    )
    if name not in DTYPE_BYTES:
        raise ValueError(f"no byte size for dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def quantized_bytes(numel: int, rows: int, quantization: str, double_quant: bool = True) -> float:
    """Bytes of a ``rows x (numel / rows)`` linear weight held by bitsandbytes in ``quantization`` (``4bit``: NF4
    nibbles + block absmax; ``8bit``: int8 + one float32 scale per row)."""
    if quantization == "4bit":
        blocks = -(-numel // BLOCK_4BIT)
        absmax = blocks + 4 * -(-blocks // BLOCK_NESTED) if double_quant else 4 * blocks
        return (numel + 1) // 2 + absmax
    if quantization == "8bit":
        return numel + 4 * rows
    raise ValueError(f"unknown quantization {quantization!r}; use 4bit or 8bit")


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensor storage alive while active: ``current``, and ``peak`` since the last
    :meth:`reset_peak`. A storage counts once however many views share it, until it is freed."""

    def __init__(self, record: bool = False) -> None:
        super().__init__()
        self._sizes: dict[int, int] = {}
        self._serial: dict[int, int] = {}  # storage key -> the serial number of its allocation
        self._allocations = 0
        self.current = 0
        self.peak = 0
        #: With ``record``: (allocation serial, +bytes or -bytes) in order, for :meth:`peak_without`.
        self.events: list[tuple[int, int]] | None = [] if record else None

    def reset_peak(self) -> None:
        self.peak = self.current

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count storages made before this mode started (the model's weights)."""
        for tensor in tensors:
            self._add(tensor)

    def _add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._sizes:
            return
        size = storage.nbytes()
        self._sizes[key] = size
        self._serial[key] = serial = self._allocations
        self._allocations += 1
        self.current += size
        self.peak = max(self.peak, self.current)
        if self.events is not None:
            self.events.append((serial, size))
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        size = self._sizes.pop(key, 0)
        self.current -= size
        serial = self._serial.pop(key, -1)
        if self.events is not None:
            self.events.append((serial, -size))

    def serials(self, tensors: Iterable[torch.Tensor]) -> set[int]:
        """The allocation serials of live ``tensors``' storages (for :meth:`peak_without`)."""
        return {self._serial[id(t.untyped_storage())] for t in tensors if id(t.untyped_storage()) in self._serial}

    def peak_without(self, excluded: set[int]) -> int:
        """The recorded peak of the bytes not in the allocations ``excluded`` (e.g. the gradients)."""
        current = peak = 0
        for serial, size in self.events or []:
            if serial not in excluded:
                current += size
                peak = max(peak, current)
        return peak

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._add(item)
        return out


def module_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters, buffers and the tensors of bitsandbytes quantisation states (absmax, codes) of ``module``."""
    out: list[torch.Tensor] = [*module.parameters(), *module.buffers()]
    for param in module.parameters():
        state = getattr(param, "quant_state", None)
        out += _state_tensors(state)
    for sub in module.modules():  # 8-bit layers keep their row scales on the weight (SCB) or the layer's state
        scb = getattr(getattr(sub, "weight", None), "SCB", None)
        if isinstance(scb, torch.Tensor):
            out.append(scb)
    return out


def _state_tensors(state: Any, depth: int = 0) -> list[torch.Tensor]:
    if state is None or depth > 2:
        return []
    found = []
    for value in vars(state).values() if hasattr(state, "__dict__") else []:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif hasattr(value, "__dict__") and not isinstance(value, (type, torch.nn.Module)):
            found += _state_tensors(value, depth + 1)
    return found


__all__ = [
    "BLOCK_4BIT",
    "BLOCK_NESTED",
    "DTYPE_BYTES",
    "LiveBytes",
    "dtype_bytes",
    "module_tensors",
    "quantized_bytes",
]
