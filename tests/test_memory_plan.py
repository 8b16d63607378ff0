"""The memory planner (minigpt plan): its prediction against the measured peak of real CPU steps, the byte table,
the layer extrapolation, the plan command's output, and train's refusal before anything loads."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace

import pytest
import torch

from minigpt.cli import main
from minigpt.tools.bench.memory import MemoryCase, case_job, measure
from minigpt.train.config import load_config
from minigpt.train.memory import planner
from minigpt.train.memory.counting import LiveBytes, dtype_bytes, quantized_bytes
from minigpt.train.memory.planner import plan_training, step_trace, with_layers
from test_train_support import make_shapes, tiny_config, write_yaml

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")


def test_live_bytes_counts_storages_until_freed():
    counter = LiveBytes()
    with counter:
        x = torch.randn(1000, requires_grad=True)  # 4000 bytes
        y = (x * 2).exp().sum()  # x*2 is freed at once; exp's output is saved for backward
        assert counter.current == 4000 + 4000 + 4
        view = x.view(10, 100)  # a view is no new storage
        assert counter.current == 8004
        y.backward()  # x.grad (4000) appears, exp's saved output goes
        assert counter.peak == 12004 + 4 and x.grad is not None
        del view
    assert counter.current == 8004


def test_byte_table():
    assert dtype_bytes("bf16") == dtype_bytes(torch.bfloat16) == 2 and dtype_bytes("float32") == 4
    with pytest.raises(ValueError, match="no byte size"):
        dtype_bytes("float8")
    n = 4096 * 4096
    assert quantized_bytes(n, 4096, "4bit", double_quant=False) == n / 2 + 4 * n / 64  # NF4 + fp32 absmax per 64
    assert quantized_bytes(n, 4096, "4bit") == n / 2 + n / 64 + 4 * n / 64 / 256  # absmax in 8 bits, per 256 fp32
    assert quantized_bytes(n, 4096, "8bit") == n + 4 * 4096


@pytest.mark.parametrize(
    "case",
    [
        MemoryCase("tiny", "lora", True, 4, 2, "float32"),
        MemoryCase("tiny", "full", False, 1, 1, "bfloat16"),
        pytest.param(MemoryCase("tiny", "qlora", False, 4, 2, "float32"), marks=needs_bnb),
    ],
    ids=lambda c: c.name,
)
def test_prediction_within_ten_percent_of_measured_peak(case):
    job = case_job(case, "tiny", accelerator=False)
    predicted = plan_training(job).allocated
    measured = measure(job, torch.device("cpu"), steps=2, seed=0)
    assert abs(predicted / measured - 1) < 0.10, (predicted, measured)


def test_deep_llm_is_traced_at_two_and_three_layers(monkeypatch):
    job = case_job(MemoryCase("tiny", "lora", False, 2, 2, "float32"), "tiny", accelerator=False)
    job = replace(job, llm=with_layers(job.llm, 6))
    monkeypatch.setattr(planner, "TRACE_LAYERS", 8)
    whole = step_trace(job)
    monkeypatch.setattr(planner, "TRACE_LAYERS", 4)
    extrapolated = step_trace(job)
    assert abs(extrapolated.peak / whole.peak - 1) < 0.01, (extrapolated, whole)


@pytest.fixture()
def tiny_yaml(tmp_path, tiny_llama_dir):
    train_json = make_shapes(tmp_path / "data", 8)
    return write_yaml(tmp_path / "train.yaml", tiny_config(tiny_llama_dir, train_json, tmp_path / "out"))


def test_plan_command_prints_the_table_and_what_fits(tiny_yaml, capsys):
    assert main(["plan", str(tiny_yaml), "run.batch_size=2", "--cpu", "--gpu", "0.1"]) == 0
    out = capsys.readouterr().out
    for part in ("weights: LLM", "weights: projector", "gradients", "optimizer state", "activations", "peak per"):
        assert part in out
    assert "training (projector): micro-batch 2" in out
    assert "\nfits 0.1 " in out and "settings that fit (projector), fastest first:" in out
    listed = [line.split() for line in out.split("fastest first:\n")[1].splitlines()]
    assert listed[0][4] == "off" and listed[0][5:7] == ["no", "ZeRO"]  # fastest: no recomputation, no ZeRO
    sizes = [float(row[-2]) for row in listed]
    assert sizes == sorted(sizes, reverse=True)  # each slower setting needs less memory
    assert main(["plan", str(tiny_yaml), "--cpu", "--gpu", "0.001"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit 0.001" in out and "no setting of projector fits" in out


def test_plan_command_serve_counts_the_engines_kv_cache(capsys, tiny_llama_dir):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_llama_dir)
    args = ["plan", str(tiny_llama_dir), "--serve", "--batch-slots", "4", "--max-context", "512", "--cpu"]
    assert main(args) == 0
    assert "KV cache                1.00 MiB  2 layers x 4 slots x 512 positions" in capsys.readouterr().out
    assert main([*args, "--json"]) == 0
    rows = {row["part"]: row["bytes"] for row in json.loads(capsys.readouterr().out)["rows"]}
    assert "gradients" not in rows
    # the engine's slot cache, allocated by a prefill, holds exactly that
    from minigpt.infer.slots import SlotDecoder
    from minigpt.model.llm import load_llm

    decoder = SlotDecoder(load_llm(tiny_llama_dir), slots=4, max_len=512, cuda_graphs=False)
    decoder.prefill([0], [torch.zeros(3, cfg.hidden_size)])
    cache = [t for layer in decoder.cache.layers for t in (layer.keys, layer.values)]
    assert rows["KV cache"] == sum(t.numel() * t.element_size() for t in cache)


def test_train_stops_before_loading_when_the_run_cannot_fit(tiny_yaml, monkeypatch):
    from minigpt.model.minigpt import MiniGPT
    from minigpt.train import launch
    from minigpt.train.memory import check

    def loaded(*args, **kwargs):
        raise AssertionError("a weight was loaded")

    monkeypatch.setattr(MiniGPT, "build", loaded)
    monkeypatch.setattr(check, "available_ram_bytes", lambda: 1000)
    config = load_config(tiny_yaml, ["run.memory_check=true"])
    with pytest.raises(check.WontFit, match="peak per device") as err:
        launch.train(config)
    assert "--no-memory-check" in str(err.value)
    # --no-memory-check: no plan at all, straight to loading
    monkeypatch.setattr(check, "plan_training", lambda *a, **k: pytest.fail("planned"))
    with pytest.raises(AssertionError, match="a weight was loaded"):
        launch.train(load_config(tiny_yaml, ["run.memory_check=false"]))
    # the default on CPU: no check
    with pytest.raises(AssertionError, match="a weight was loaded"):
        launch.train(load_config(tiny_yaml, []))


@pytest.mark.slow
def test_readme_plan_commands_run(capsys):
    """Every command of the README's "Memory: will it fit?" block (7B/13B presets: slow)."""
    import shlex
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("## Memory: will it fit?\n\n```bash\n")[1].split("```")[0]
    commands = [shlex.split(line) for line in block.splitlines() if line.strip()]
    assert commands and all(c[:2] == ["minigpt", "plan"] for c in commands)
    root = Path(__file__).parents[1]
    for command in commands:
        args = [str(root / a) if a.endswith(".yaml") else a for a in command[1:]]
        assert main(args) == 0
        assert "peak per device" in capsys.readouterr().out


def test_train_no_memory_check_flag(tiny_yaml, capsys):
    assert main(["train", str(tiny_yaml), "--no-memory-check", "--print-config"]) == 0
    assert "memory_check: false" in capsys.readouterr().out
