"""The one place that picks the device, the AMP dtype, the distributed backend and reports memory.

Nothing else in the code names a device type: other modules call these helpers.

Devices: ``--device auto|cpu|cuda|npu|mps`` (with an index where it applies: ``cuda:1``, ``npu:3``).
``auto`` prefers cuda, then npu, then mps, then cpu.

- cuda: NVIDIA (and ROCm builds of torch); distributed backend ``nccl``.
- npu: Huawei Ascend through the optional ``torch_npu`` package (the target of the MiniGPT-4 Ascend port),
  imported here when asked for; distributed backend ``hccl``. Install the CANN toolkit of your driver, then
  ``pip install torch-npu==<the version matching your torch>`` (torch_npu's release table pairs each torch
  release with one torch_npu and CANN release) and ``source /usr/local/Ascend/ascend-toolkit/set_env.sh``.
- mps: Apple silicon; distributed backend ``gloo``.
- cpu: always available; distributed backend ``gloo``.

AMP (``amp_dtype``): none on CPU unless asked; bf16 where the device supports it, else fp16 (with loss
scaling in training); fp16 on mps.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import re
import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

#: Device kinds, in the order ``auto`` tries the accelerators (cpu last).
DEVICE_KINDS = ("cuda", "npu", "mps", "cpu")
DEVICE_CHOICES = ("auto",) + DEVICE_KINDS
DEVICE_HELP = "auto (cuda, npu, mps, then cpu), cpu, cuda, cuda:N, npu, npu:N or mps (default: %(default)s)"
DIST_BACKENDS = {"cuda": "nccl", "npu": "hccl"}  # everything else: gloo
NPU_INSTALL_HINT = (
    "Ascend NPUs need the optional torch_npu package: install the CANN toolkit, then "
    "'pip install torch-npu' in the version matching your torch (see the README)"
)
_NAME = re.compile(r"^(?P<kind>[a-z]+)(?::(?P<index>\d+))?$")


# ---------------------------------------------------------------------------------------------- dtypes


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of float32, bfloat16, float16") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------- names and arguments


def check_device_name(name: str) -> str:
    """``name`` lower-cased if it is ``auto`` or ``KIND[:N]`` of a known kind (availability is not checked)."""
    text = str(name).strip().lower()
    if text == "auto":
        return text
    m = _NAME.match(text)
    if m is None or m["kind"] not in DEVICE_KINDS:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N, npu, npu:N or mps")
    if m["index"] is not None and m["kind"] in ("cpu", "mps"):
        raise ValueError(f"device {name!r}: {m['kind']} takes no index")
    return text


def _device_arg(value: str) -> str:
    try:
        return check_device_name(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_device_argument(parser: Any, default: str | None = "auto", help: str | None = None) -> None:
    """The ``--device`` option every command shares (``parser`` may be an argument group).

    Only the name is checked here; whether the device exists is checked when the command resolves it."""
    parser.add_argument("--device", type=_device_arg, default=default, metavar="DEVICE", help=help or DEVICE_HELP)


# ---------------------------------------------------------------------------------------------- backends


def _npu_module() -> ModuleType | None:
    """``torch.npu`` after importing the optional ``torch_npu`` (which registers it), or None."""
    try:
        importlib.import_module("torch_npu")
    except ImportError:
        return None
    return getattr(torch, "npu", None)


def _npu_available() -> bool:
    module = _npu_module()
    try:
        return bool(module is not None and module.is_available())
    except RuntimeError:  # driver / CANN problems surface here
        return False


def backend_module(kind: str | torch.device) -> ModuleType | None:
    """``torch.cuda`` / ``torch.npu`` / ``torch.mps`` for a device (or kind); None for cpu and unknown ones."""
    kind = kind.type if isinstance(kind, torch.device) else kind
    if kind == "npu":
        return _npu_module()
    if kind in ("cuda", "mps"):
        return getattr(torch, kind, None)
    return None


def is_available(kind: str) -> bool:
    if kind == "cpu":
        return True
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "npu":
        return _npu_available()
    if kind == "mps":
        return torch.backends.mps.is_available()
    return False


def device_count(kind: str | torch.device) -> int:
    """Devices of this kind on the machine (0 when unavailable; cpu and mps count as one)."""
    kind = kind.type if isinstance(kind, torch.device) else kind
    if not is_available(kind):
        return 0
    if kind in ("cpu", "mps"):
        return 1
    module = backend_module(kind)
    return int(module.device_count()) if module is not None and hasattr(module, "device_count") else 1


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda, npu (Ascend via torch_npu), mps, cpu, in that order of preference; else the named
    device, with an error saying why when it is not available here."""
    name = check_device_name(name)
    if name == "auto":
        for kind in DEVICE_KINDS:
            if is_available(kind):
                return torch.device(kind)
        return torch.device("cpu")  # pragma: no cover - cpu is always available
    m = _NAME.match(name)
    kind, index = m["kind"], m["index"]
    if not is_available(kind):
        hint = f"; {NPU_INSTALL_HINT}" if kind == "npu" and _npu_module() is None else ""
        found = [k for k in DEVICE_KINDS[:-1] if is_available(k)]
        here = f"this machine has {', '.join(found)} and cpu" if found else "this machine has the cpu only"
        raise RuntimeError(f"device {name!r} was requested but is not available ({here}){hint}")
    if index is not None:
        count = device_count(kind)
        if int(index) >= count:
            raise RuntimeError(
                f"device {name!r} was requested but this machine has {count} {kind} device(s) "
                f"({kind}:0 to {kind}:{count - 1})"
            )
    return torch.device(name)


def is_accelerator(device: torch.device) -> bool:
    return device.type != "cpu"


def pins_memory(device: torch.device) -> bool:
    """Whether host->``device`` copies benefit from pinned (page-locked) host memory: cuda and npu."""
    return device.type in ("cuda", "npu")


def runs_triton(device: torch.device) -> bool:
    """Whether Triton kernels (e.g. Liger-Kernel's) run on ``device``: cuda (NVIDIA and ROCm builds)."""
    return device.type == "cuda"


def describe_device(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H200)``-style text for logs and reports."""
    module = backend_module(device)
    if module is not None and hasattr(module, "get_device_name"):
        try:
            return f"{device} ({module.get_device_name(device.index or 0)})"
        except (RuntimeError, AssertionError, TypeError):
            pass
    return str(device)


def set_device(device: torch.device) -> None:
    """Make ``device`` the current one of its kind (one process per device in distributed runs)."""
    module = backend_module(device)
    if module is not None and device.index is not None and hasattr(module, "set_device"):
        module.set_device(device)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings); a no-op on cpu."""
    module = backend_module(device)
    if module is not None and hasattr(module, "synchronize"):
        module.synchronize()


def empty_cache(device: torch.device) -> None:
    """Give the caching allocator's unused memory back; a no-op on cpu."""
    module = backend_module(device)
    if module is not None and hasattr(module, "empty_cache"):
        module.empty_cache()


def supports_graph_capture(device: torch.device) -> bool:
    """Whether :func:`capture_graph` can record work on ``device`` (CUDA graphs: cuda only)."""
    return device.type == "cuda"


def capture_graph(fn: Callable[[], Any], device: torch.device, warmup: int = 2) -> tuple[Callable[[], None], Any]:
    """Run ``fn`` ``warmup`` times on a side stream (lazy allocations, autotuning), then record one call as a
    CUDA graph. Returns ``(replay, out)``: ``replay()`` re-runs the recorded kernels on the same memory, and ``out``
    (what the recorded call returned) holds the results of each replay. ``fn`` must read and write only tensors
    that stay allocated (static buffers) and must not synchronise with the host."""
    if not supports_graph_capture(device):
        raise RuntimeError(f"graph capture needs a cuda device, not {device}")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def get_rng_state(device: torch.device) -> torch.Tensor | None:
    """The accelerator's generator state (None on cpu: torch's own state covers it)."""
    module = backend_module(device)
    if is_accelerator(device) and module is not None and hasattr(module, "get_rng_state"):
        return module.get_rng_state()
    return None


def set_rng_state(device: torch.device, state: torch.Tensor | None) -> None:
    module = backend_module(device)
    if state is not None and module is not None and hasattr(module, "set_rng_state"):
        module.set_rng_state(state)


# ---------------------------------------------------------------------------------------------- precision


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    if device.type == "mps":
        return False  # needs macOS 14+; fp16 works everywhere
    module = backend_module(device)
    check = getattr(module, "is_bf16_supported", None)
    if check is None:
        return True
    try:
        return bool(check())
    except (RuntimeError, AssertionError):
        return False


def computes_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively, so bf16 is faster than float32 there: CPUs with AVX512-BF16 or
    AMX (elsewhere the CPU emulates bf16, slower than float32), accelerators that support it."""
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return bf16_supported(device)


def amp_dtype(device: torch.device, requested: str = "auto") -> torch.dtype | None:
    """The autocast dtype: None (no AMP) on CPU unless asked, bf16 where supported, else fp16."""
    if requested in ("no", "none", "fp32", "float32"):
        return None
    if requested != "auto":
        return parse_dtype(requested)
    if device.type == "cpu":
        return None
    return torch.bfloat16 if bf16_supported(device) else torch.float16


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


# ---------------------------------------------------------------------------------------------- distributed


def dist_backend(device: torch.device) -> str:
    """``torch.distributed`` backend: nccl (cuda), hccl (Ascend npu), gloo (cpu, mps)."""
    return DIST_BACKENDS.get(device.type, "gloo")


def launched_world_size() -> int:
    """The processes a launcher (torchrun) started for this run (``WORLD_SIZE``; 1 without one)."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def start_process_group(name: str = "auto") -> torch.device:
    """Join the process group a launcher (torchrun, env:// rendezvous) set up and return this process's device: the
    accelerator of its ``LOCAL_RANK`` (made current) where ``name`` gives no index, else the named device or the cpu;
    the backend is :func:`dist_backend`'s."""
    import os

    import torch.distributed as dist

    device = resolve_device(name)
    if device.type != "cpu" and device.index is None and device.type != "mps":
        device = torch.device(device.type, int(os.environ.get("LOCAL_RANK", "0")))
        set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=dist_backend(device))
    return device


# ---------------------------------------------------------------------------------------------- device maps

#: Where a device map may put a module besides an accelerator index: run on the cpu, or offloaded to disk.
HOST_PLACEMENTS = ("cpu", "disk")


def parse_max_memory(text: str | dict[Any, Any]) -> dict[int | str, int | str]:
    """``--max-memory``: ``0=20GiB,cpu=30GiB`` or accelerate's dict form (``{"0": "20GiB", "cpu": "30GiB"}``, as
    JSON or a dict) -> accelerate's ``max_memory`` (accelerator indices as ints; ``cuda:1`` / ``npu:1`` -> 1; cpu,
    mps, disk as named; sizes as given, checked)."""
    import json

    from accelerate.utils import convert_file_size_to_int

    if isinstance(text, str):
        text = text.strip()
        if text.startswith("{"):
            try:
                items = list(json.loads(text).items())
            except (ValueError, AttributeError) as err:
                raise ValueError(f"--max-memory {text!r}: not a JSON object ({err})") from None
        else:
            pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
            if not pairs or any(len(pair) != 2 for pair in pairs):
                raise ValueError(f"--max-memory {text!r}: use DEVICE=SIZE pairs, e.g. 0=20GiB,cpu=30GiB")
            items = [(key.strip(), value.strip()) for key, value in pairs]
    else:
        items = list(text.items())
    out: dict[int | str, int | str] = {}
    for key, size in items:
        name = str(key).strip().lower()
        m = _NAME.match(name)
        if name.isdigit():
            place: int | str = int(name)
        elif name in (*HOST_PLACEMENTS, "mps"):
            place = name
        elif m is not None and m["kind"] in DEVICE_KINDS and m["index"] is not None:
            place = int(m["index"])
        else:
            raise ValueError(f"--max-memory: unknown device {key!r}; use an accelerator index (0, 1...), cpu or disk")
        size = int(size) if isinstance(size, str) and size.strip().isdigit() else size
        try:
            convert_file_size_to_int(size)
        except ValueError:
            raise ValueError(f"--max-memory: {key}={size!r} is not a size (use e.g. 20GiB, 512MB or bytes)") from None
        out[place] = size
    return out


def mapped_device(placement: int | str, kind: str) -> torch.device:
    """The torch device of a device-map entry (an index of accelerator ``kind``, ``cpu``, ``cuda:1``...; ``disk``: the
    cpu, where offloaded weights are brought to when the host runs them)."""
    if isinstance(placement, int) or str(placement).isdigit():
        return torch.device(kind, int(placement))
    return torch.device("cpu" if placement in HOST_PLACEMENTS else str(placement))


def first_mapped_device(placements: Any, kind: str) -> torch.device:
    """The first accelerator a device map uses (where the other parts of a model go), else the cpu."""
    for placement in placements:
        if placement not in HOST_PLACEMENTS:
            return mapped_device(placement, kind)
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------- memory


def _cpu_peak_rss_gib() -> float | None:
    if not sys.platform.startswith(("linux", "darwin")):
        return None
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def peak_memory_gib(device: torch.device, cpu_rss: bool = False) -> float | None:
    """Peak allocated accelerator memory since the last reset; on cpu None, or with ``cpu_rss`` the process's
    peak resident memory."""
    if device.type == "cpu":
        return _cpu_peak_rss_gib() if cpu_rss else None
    module = backend_module(device)
    if module is None or not hasattr(module, "max_memory_allocated"):
        return None
    return module.max_memory_allocated(device) / 2**30


def reset_peak_memory(device: torch.device) -> None:
    module = backend_module(device)
    if module is not None and hasattr(module, "reset_peak_memory_stats"):
        module.reset_peak_memory_stats(device)


def free_memory_bytes(device: torch.device) -> int | None:
    """Bytes the device can still allocate (free device memory plus the allocator's unused reserve); None where it
    is unknown (cpu, mps)."""
    module = backend_module(device)
    if device.type == "cpu" or module is None or not hasattr(module, "mem_get_info"):
        return None
    free, _ = module.mem_get_info(device)
    reserved = getattr(module, "memory_reserved", lambda d: 0)(device)
    allocated = getattr(module, "memory_allocated", lambda d: 0)(device)
    return int(free + reserved - allocated)


def memory_stats(device: torch.device) -> dict[str, float | None]:
    """GiB in use now, reserved by the allocator and at peak (accelerators); peak resident memory (cpu)."""
    if device.type == "cpu":
        return {"allocated_gib": None, "reserved_gib": None, "peak_gib": _cpu_peak_rss_gib()}
    module = backend_module(device)

    def read(name: str) -> float | None:
        fn = getattr(module, name, None)
        if fn is None:
            return None
        try:
            return round(fn(device) / 2**30, 3)
        except (RuntimeError, TypeError):
            return round(fn() / 2**30, 3)  # mps takes no device argument

    if device.type == "mps":
        return {
            "allocated_gib": read("current_allocated_memory"),
            "reserved_gib": read("driver_allocated_memory"),
            "peak_gib": None,
        }
    return {
        "allocated_gib": read("memory_allocated"),
        "reserved_gib": read("memory_reserved"),
        "peak_gib": read("max_memory_allocated"),
    }


__all__ = [
    "DTYPES",
    "DEVICE_KINDS",
    "DEVICE_CHOICES",
    "parse_dtype",
    "dtype_name",
    "check_device_name",
    "add_device_argument",
    "backend_module",
    "is_available",
    "device_count",
    "resolve_device",
    "is_accelerator",
    "pins_memory",
    "runs_triton",
    "free_memory_bytes",
    "supports_graph_capture",
    "capture_graph",
    "describe_device",
    "set_device",
    "synchronize",
    "empty_cache",
    "get_rng_state",
    "set_rng_state",
    "bf16_supported",
    "amp_dtype",
    "autocast",
    "dist_backend",
    "launched_world_size",
    "start_process_group",
    "HOST_PLACEMENTS",
    "parse_max_memory",
    "mapped_device",
    "first_mapped_device",
    "peak_memory_gib",
    "reset_peak_memory",
    "memory_stats",
]
