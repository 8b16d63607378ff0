"""QLoRA: LoRA trained on a bitsandbytes 4-bit LLM (``model.llm_quantization``), on the CPU with a tiny model.

The loss falls, trainable parts stay float32, resume is bit-exact, ``final/`` holds the adapter over the recorded
unquantized base, chat loads it quantized or not, and ``convert merge-lora`` merges onto the unquantized base.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minigpt.data.conversation import Conversation
from minigpt.model.minigpt import ADAPTER_DIR, MiniGPT
from minigpt.train.checkpoint import list_checkpoints, load_checkpoint
from minigpt.train.config import validate_config
from minigpt.train.launch import train
from test_train_support import losses, make_shapes, tiny_config

bnb = pytest.importorskip("bitsandbytes")

#: Max |logits(4-bit) - logits(float32 model holding the dequantized weights)| on the tiny LLaMA, float32 compute, as
#: training runs the layers: measured 0.0 (bitsandbytes dequantizes, then multiplies); the bound leaves room for
#: other builds. The quantization error itself (4-bit vs the original weights) is 0.135 there (logits up to 0.74).
DEQUANT_TOL = 1e-5
#: The same with bitsandbytes' bf16 inference kernel (used on CPUs with AVX512-BF16, at eval without gradients):
#: measured 3.1e-3 (3.3e-3 with double quantization) on logits up to 0.74.
PACKED_TOL = 1e-2
STEPS = 8


def _config(llm: Path, root: Path, **run) -> dict:
    eval_json = make_shapes(root / "data", 8, seed=1, name="eval")
    return tiny_config(
        llm,
        make_shapes(root / "data", 32),
        root / "out",
        model={"lora": {"r": 4, "alpha": 8, "dropout": 0.1}, "llm_quantization": "4bit"},
        data={"eval": [{"format": "captions_json", "path": str(eval_json)}]},
        run={
            "max_steps": STEPS,
            "save_every": 4,
            "eval_every": 2,
            "grad_checkpointing": True,
            "optimizer": {"lr": 1e-2, "weight_decay": 0.0},
            **run,
        },
    )


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("qlora")
    config = _config(tiny_llama_dir, root)
    return root, config, train(validate_config(config))


def test_qlora_trains_lora_on_a_4bit_llm(qlora_run, tiny_llama_dir):
    root, _, result = qlora_run
    run = losses(result.history)
    print(f"QLoRA losses: {' '.join(f'{x:.3f}' for x in run)}")
    assert len(run) == STEPS and sum(run[-2:]) / 2 < sum(run[:2]) / 2 - 0.3  # measured: 10.25 -> 9.76
    model = result.model
    layers = [m for m in model.llm.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14 and len([r for r in result.history if "eval_loss" in r]) == STEPS // 2
    assert all(p.abs().max() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # B starts at zero
    assert isinstance(
        model.llm.get_submodule("base_model.model.model.layers.0.self_attn.q_proj.base_layer"), bnb.nn.Linear4bit
    )
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".")[0] for n in trainable} == {"llm", "projector"}
    assert all("lora_" in n for n in trainable if n.startswith("llm."))
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    # the non-quantized frozen weights keep llm_dtype (no float32 upcast by us: see apply_lora)
    assert model.llm.get_input_embeddings().weight.dtype == torch.float32  # llm_dtype float32 here
    weights, _ = load_checkpoint(list_checkpoints(root / "out")[-1])
    assert set(weights) == set(trainable)

    final = root / "out" / "final"
    assert not (final / "llm").exists() and (final / ADAPTER_DIR / "adapter_config.json").is_file()
    assert json.loads((final / "config.json").read_text())["llm"] == str(tiny_llama_dir)  # the base, recorded
    adapter = json.loads((final / ADAPTER_DIR / "adapter_config.json").read_text())
    assert (adapter["base_model_name_or_path"], adapter["r"], adapter["lora_alpha"]) == (str(tiny_llama_dir), 4, 8)
    saved = {}
    for path in final.rglob("*.safetensors"):
        saved.update(load_file(path))
    assert saved and all(t.dtype == torch.float32 for t in saved.values())  # nothing quantized is written


def test_evaluations_leave_training_unchanged(qlora_run, tmp_path):
    """The run evaluates every 2 steps; without evaluations its losses are the same, bit for bit. (bitsandbytes
    repacks 4-bit weights for its CPU inference kernel at an evaluation; that kernel has no backward, so the steps
    after it got wrong gradients until training turned the repacking off: keep_4bit_layout.)"""
    root, config, reference = qlora_run
    config = {**config, "data": {**config["data"], "eval": []}}
    config["run"] = {**config["run"], "output_dir": str(tmp_path / "out"), "max_steps": 4, "eval_every": 0}
    assert losses(train(validate_config(config)).history) == losses(reference.history)[:4]


def test_qlora_resume_is_bit_exact(qlora_run, tmp_path):
    """The run interrupted after its step-4 checkpoint (the later checkpoint and final removed) continues to the
    reference's losses and final weights, bit for bit."""
    root, config, reference = qlora_run
    out = shutil.copytree(root / "out", tmp_path / "out")
    shutil.rmtree(out / "final")
    shutil.rmtree(list_checkpoints(out)[-1])
    assert list_checkpoints(out)[-1].name == "step_00000004"
    config = {**config, "run": {**config["run"], "output_dir": str(out)}}
    resumed = train(validate_config(config))
    assert losses(resumed.history) == losses(reference.history)[4:]
    for sub in ("projector.safetensors", f"{ADAPTER_DIR}/adapter_model.safetensors"):
        want, got = load_file(root / "out" / "final" / sub), load_file(out / "final" / sub)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), sub


def _loss(model, processor, image_file) -> float:
    conv = [Conversation.single("<Img><ImageHere></Img>", "a red square")]
    model.eval()
    with torch.no_grad():
        return float(model(batch=processor.prepare(conv, [image_file])).loss)


def test_final_loads_quantized_or_not(qlora_run, image_file):
    from minigpt.data.conversation import Image, Text
    from minigpt.infer.decoding import DecodingSettings
    from minigpt.infer.engine import Engine
    from minigpt.infer.generate import GenerationOptions

    root, _, result = qlora_run
    final = root / "out" / "final"
    trained = _loss(result.model, result.processor, image_file)
    question = Conversation().add("user", [Image(), Text(" What is it?")])
    options = GenerationOptions(max_new_tokens=6, min_new_tokens=6)
    answer = Engine(result.model, result.processor, DecodingSettings("plain")).generate(question, [image_file], options)
    # --load-in-4bit: the same NF4 base (the run also quantized the blocks' scales: double quantization; measured
    # 9e-7 relative) with the adapter on it: the trained model
    four = Engine.from_pretrained(final, device="cpu", quantize="4bit")
    assert any(".lora_A." in n for n, _ in four.model.llm.named_parameters())
    assert _loss(four.model, four.processor, image_file) == pytest.approx(trained, rel=1e-5)
    assert four.generate(question, [image_file], options) == answer and answer[0]
    # without: the adapter merged onto the unquantized base (a plain float32 LLM)
    plain = Engine.from_pretrained(final, device="cpu")
    assert not any("lora_" in n for n, _ in plain.model.llm.named_parameters())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in plain.model.llm.modules())
    full = _loss(plain.model, plain.processor, image_file)
    print(f"loss of a sample: 4-bit base + adapter {trained:.5f}, merged onto the float32 base {full:.5f}")
    assert full == pytest.approx(trained, rel=0.05)  # the quantization error only
    assert plain.generate(question, [image_file], options)[0]


def test_merge_lora_onto_the_unquantized_base(qlora_run, tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from minigpt.convert.lora import merge_lora

    root, _, _ = qlora_run
    result = merge_lora(root / "out", tmp_path / "merged")  # the run folder: its newest checkpoint and its config
    assert (result.rank, result.alpha) == (4, 8.0)
    merged = MiniGPT.from_pretrained(tmp_path / "merged").llm
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    weights, _ = load_checkpoint(list_checkpoints(root / "out")[-1])
    module = "model.layers.1.self_attn.v_proj"
    a, b = (weights[f"llm.base_model.model.{module}.lora_{x}.default.weight"] for x in "AB")
    delta = merged.get_submodule(module).weight - base.get_submodule(module).weight
    torch.testing.assert_close(delta, 2.0 * b @ a, rtol=0, atol=1e-6)  # scale alpha / r = 8 / 4, on float32 weights
    # the same as chat's unquantized load of final/ (the adapter merged onto the base)
    loaded = MiniGPT.from_pretrained(root / "out" / "final").llm
    for name, param in merged.named_parameters():
        torch.testing.assert_close(param, loaded.get_parameter(name), rtol=0, atol=1e-6)


@pytest.mark.parametrize("double", [False, True])
def test_4bit_logits_match_the_dequantized_model(tiny_llama_dir, double):
    """The 4-bit layers compute what a float32 model holding their dequantized weights computes: within DEQUANT_TOL
    as training runs them; within PACKED_TOL with bitsandbytes' bf16 CPU inference kernel (AVX512-BF16 CPUs)."""
    from transformers import AutoModelForCausalLM

    from minigpt.model.llm import bnb_quantization, keep_4bit_layout, load_llm

    quant = bnb_quantization("4bit", "float32", "nf4", double)
    four = load_llm(tiny_llama_dir, quantization_config=quant, device_map={"": "cpu"}).eval()
    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    dequantized = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    layers = [(n, m) for n, m in four.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    packing = all(m.support_avx512bf16_for_cpu for _, m in layers)
    with torch.no_grad():
        for name, module in layers:
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            dequantized.get_submodule(name).weight.copy_(weight)
        ids = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
        want, fp = dequantized(input_ids=ids).logits, original(input_ids=ids).logits
        packed = four(input_ids=ids).logits  # inference: repacked for the bf16 kernel where the CPU has one
        four = load_llm(tiny_llama_dir, quantization_config=quant, device_map={"": "cpu"}).eval()
        assert keep_4bit_layout(four) == len(layers) == 14
        got = four(input_ids=ids).logits
    diff, error = (got - want).abs().max().item(), (got - fp).abs().max().item()
    packed_diff = (packed - want).abs().max().item()
    print(
        f"4-bit (double quant {double}): |vs dequantized| {diff:.2e} (bf16 CPU kernel {packing}: {packed_diff:.2e}), "
        f"|vs original float32| {error:.3f}, logits up to {fp.abs().max().item():.2f}"
    )
    assert diff < DEQUANT_TOL and packed_diff < (PACKED_TOL if packing else DEQUANT_TOL)
    assert error > 100 * DEQUANT_TOL  # the comparison is not vacuous: quantization does change the weights
