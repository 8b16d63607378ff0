"""The device layer (minigpt.device), on a CPU machine: availability is faked (cuda/mps flags, a stand-in
``torch_npu`` module registering ``torch.npu`` as the real one does) to check the selection order, the backends,
the AMP dtype, the messages and that every command takes ``--device``."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import types

import pytest
import torch

from minigpt import device as dev
from minigpt.cli import build_parser


@pytest.fixture()
def nothing(monkeypatch):
    """A machine with the cpu only (whatever this one has)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import torch_npu -> ImportError
    monkeypatch.delattr(torch, "npu", raising=False)


#: Renaming torch's privateuse1 backend to "npu" (what importing torch_npu does) is process-wide and
#: permanent, and later tests would then look for ``torch.npu``: the fake-NPU tests run in a child pytest.
IN_NPU_PROCESS = os.environ.get("MINIGPT_FAKE_NPU_PROCESS") == "1"


def test_fake_npu_tests_in_their_own_process():
    if IN_NPU_PROCESS:
        pytest.skip("this is the child process")
    env = {**os.environ, "MINIGPT_FAKE_NPU_PROCESS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", __file__, "-k", "npu"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Only this test itself is skipped in the child: the fake-NPU tests ran.
    assert re.search(r"\b[2-9] passed, 1 skipped", result.stdout), result.stdout[-500:]


@pytest.fixture()
def fake_npu(nothing, monkeypatch):
    """A stand-in torch_npu: ``torch.npu`` with 2 Ascend devices without bf16 (910A-like)."""
    if not IN_NPU_PROCESS:
        pytest.skip("runs in its own process (test_fake_npu_tests_in_their_own_process)")
    if torch._C._get_privateuse1_backend_name() == "privateuseone":
        torch.utils.rename_privateuse1_backend("npu")
    calls: list[tuple] = []
    npu = types.SimpleNamespace(
        is_available=lambda: True,
        device_count=lambda: 2,
        is_bf16_supported=lambda: False,
        get_device_name=lambda i=0: "Ascend910A",
        set_device=lambda d: calls.append(("set_device", str(d))),
        synchronize=lambda: calls.append(("synchronize",)),
        empty_cache=lambda: calls.append(("empty_cache",)),
        max_memory_allocated=lambda d=None: 3 * 2**30,
        memory_allocated=lambda d=None: 2**30,
        memory_reserved=lambda d=None: 2 * 2**30,
        reset_peak_memory_stats=lambda d=None: calls.append(("reset",)),
        get_rng_state=lambda: torch.tensor([7], dtype=torch.uint8),
        set_rng_state=lambda s: calls.append(("rng",)),
    )
    module = types.ModuleType("torch_npu")
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    return calls


def test_auto_order(nothing, monkeypatch):
    assert dev.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert dev.resolve_device("auto").type == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dev.resolve_device("auto").type == "cuda"  # cuda before mps


def test_auto_prefers_cuda_then_npu(fake_npu, monkeypatch):
    assert dev.resolve_device("auto").type == "npu"
    assert dev.resolve_device("npu:1") == torch.device("npu", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dev.resolve_device("AUTO").type == "cuda"


def test_unavailable_and_unknown_devices(nothing, monkeypatch):
    with pytest.raises(RuntimeError, match="'cuda' was requested but is not available .*cpu only"):
        dev.resolve_device("cuda")
    with pytest.raises(RuntimeError, match="torch_npu.*pip install torch-npu"):
        dev.resolve_device("npu")
    with pytest.raises(RuntimeError, match="'mps' was requested"):
        dev.resolve_device("mps")
    for bad in ("tpu", "cuda:x", "gpu", "cpu:1"):
        with pytest.raises(ValueError):
            dev.resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RuntimeError, match="has 1 cuda device"):
        dev.resolve_device("cuda:3")
    assert dev.resolve_device("cuda:0") == torch.device("cuda", 0)


def test_npu_installed_but_no_device(nothing, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(is_available=lambda: False), raising=False)
    with pytest.raises(RuntimeError) as err:
        dev.resolve_device("npu")
    assert "not available" in str(err.value) and "pip install" not in str(err.value)


def test_dist_backend():
    assert dev.dist_backend(torch.device("cuda", 0)) == "nccl"
    assert dev.dist_backend(torch.device("cpu")) == "gloo"
    assert dev.dist_backend(torch.device("mps")) == "gloo"


def test_npu_backend_amp_and_memory(fake_npu):
    npu = dev.resolve_device("npu:1")
    assert dev.dist_backend(npu) == "hccl"
    assert dev.amp_dtype(npu) == torch.float16  # no bf16 on this (910A-like) device
    torch.npu.is_bf16_supported = lambda: True
    assert dev.amp_dtype(npu) == torch.bfloat16
    assert dev.device_count("npu") == 2 and dev.describe_device(npu) == "npu:1 (Ascend910A)"
    assert dev.peak_memory_gib(npu) == 3.0
    assert dev.memory_stats(npu) == {"allocated_gib": 1.0, "reserved_gib": 2.0, "peak_gib": 3.0}
    dev.set_device(npu)
    dev.synchronize(npu)
    dev.empty_cache(npu)
    dev.reset_peak_memory(npu)
    assert dev.get_rng_state(npu).tolist() == [7]
    dev.set_rng_state(npu, torch.tensor([7], dtype=torch.uint8))
    assert fake_npu == [("set_device", "npu:1"), ("synchronize",), ("empty_cache",), ("reset",), ("rng",)]


def test_amp_dtype(nothing, monkeypatch):
    cpu = torch.device("cpu")
    assert dev.amp_dtype(cpu) is None and dev.amp_dtype(cpu, "bf16") == torch.bfloat16
    assert dev.amp_dtype(cpu, "no") is None
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert dev.amp_dtype(cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert dev.amp_dtype(cuda) == torch.float16 and dev.amp_dtype(cuda, "float16") == torch.float16
    assert dev.amp_dtype(torch.device("mps")) == torch.float16


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "native"), [(False, False, False), (True, False, True), (False, True, True)]
)
def test_computes_bf16_on_the_cpu_only_where_it_is_native(monkeypatch, avx512_bf16, amx, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert dev.computes_bf16(torch.device("cpu")) is native


def test_cpu_helpers_are_no_ops():
    cpu = torch.device("cpu")
    dev.set_device(cpu)
    dev.synchronize(cpu)
    dev.empty_cache(cpu)
    assert dev.get_rng_state(cpu) is None and dev.peak_memory_gib(cpu) is None
    if sys.platform.startswith("linux"):
        assert dev.peak_memory_gib(cpu, cpu_rss=True) > 0 and dev.memory_stats(cpu)["peak_gib"] > 0
    assert dev.device_count("cpu") == 1 and not dev.is_accelerator(cpu)


# ---------------------------------------------------------------------------------------------- the commands

COMMANDS = {
    "train": ["train", "config.yaml"],
    "chat": ["chat", "model/"],
    "web": ["web", "model/"],
    "serve": ["serve", "model/"],
    "eval": ["eval", "model/", "--task", "caption", "--data", "x.json"],
    "quickstart": ["quickstart"],
    "bench train": ["bench", "train"],
    "bench generate": ["bench", "generate"],
    "bench memory": ["bench", "memory"],
}


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_takes_device(name, capsys):
    if name.split()[0] not in _subcommands():
        pytest.skip(f"no '{name}' command registered (yet)")
    parser = build_parser()
    args = parser.parse_args(COMMANDS[name] + ["--device", "npu:1"])
    assert args.device == "npu:1"
    with pytest.raises(SystemExit):
        parser.parse_args(COMMANDS[name] + ["--device", "tpu"])
    assert "unknown device 'tpu'" in capsys.readouterr().err


def test_train_device_flag_sets_run_device(tmp_path, capsys):
    from minigpt.cli import main

    config, data = tmp_path / "c.yaml", tmp_path / "d.json"
    data.write_text("[]")
    config.write_text(
        f"model: {{llm: x}}\ndata: {{datasets: [{{format: llava, path: {data}}}]}}\nrun: {{device: cuda}}\n"
    )
    assert main(["train", str(config), "--print-config"]) == 0
    assert "device: cuda" in capsys.readouterr().out
    assert main(["train", str(config), "--print-config", "--device", "cpu"]) == 0
    assert "device: cpu" in capsys.readouterr().out
    assert main(["train", str(config), "run.device=tpu", "--print-config"]) == 2
    assert "run.device: unknown device 'tpu'" in capsys.readouterr().err


def test_no_other_module_names_a_device_type():
    """Device kinds and their torch modules appear in minigpt.device only (help texts excepted)."""
    import pathlib
    import re

    root = pathlib.Path(dev.__file__).parent
    pattern = re.compile(
        r"torch\.(cuda|npu|mps|backends\.mps)\b|\.cuda\(|torch_npu|\"(nccl|hccl)\"|getattr\(torch, (device|dev|kind)"
    )
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "device.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(root)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
