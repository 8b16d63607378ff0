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
    from minigpt.tools.info import format_info, model_info

    assert "(LoRA r=4, alpha=8, adapter in llm_adapter/)" in format_info(model_info(final))
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
    # --load-in-4bit: the same NF4 base (the run also quantized the blocks' scales: double quantization; and chat runs
    # bitsandbytes' bf16 CPU kernel where the CPU has one) with the adapter on it: the trained model
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
    final = root / "out" / "final"
    with pytest.raises(ValueError, match="holds a LoRA adapter .*merge its run folder"):
        merge_lora(final / ADAPTER_DIR, tmp_path / "twice", base=final)  # would merge the adapter twice
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


def _bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def test_what_kbit_preparation_would_cost(tmp_path):
    """peft's ``prepare_model_for_kbit_training`` upcasts every non-quantized weight (embeddings, LM head, norms) to
    float32; training leaves them in ``llm_dtype`` (they are frozen). Measured on the bench's ``small`` LLaMA shape in
    bfloat16 (README, QLoRA)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForCausalLM

    from minigpt.model.llm import bnb_quantization, keep_4bit_layout, load_llm
    from minigpt.tools.bench.common import LLM_SHAPES

    torch.manual_seed(0)
    config = AutoConfig.for_model(**LLM_SHAPES["small"])
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp_path / "small")
    figures = {}
    for name in ("bf16", "4bit", "4bit+prepare"):
        extra = {} if name == "bf16" else {"quantization_config": bnb_quantization("4bit", "bfloat16", "nf4", True)}
        llm = load_llm(tmp_path / "small", "bfloat16", device_map={"": "cpu"}, **extra)
        keep_4bit_layout(llm)
        if name.endswith("prepare"):
            llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=False)
        weights = _bytes(llm)
        model = get_peft_model(llm, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
        figures[name] = weights
    print(", ".join(f"{k}: LLM weights {w / 2**20:.1f} MiB" for k, w in figures.items()))
    ours, prepared = figures["4bit"], figures["4bit+prepare"]
    kept = 2 * 32000 * 512 + 9 * 512  # embeddings, LM head and 9 norms: 2 bytes more per weight in float32
    assert prepared - ours == 2 * kept and ours < figures["bf16"] < prepared  # prepared: more than unquantized

    # the same count for the seeds' LLMs, on the meta device: what the upcast would add there
    for shape in ("llama-7b", "qwen-14b"):
        with torch.device("meta"):
            llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**LLM_SHAPES[shape]))
        linear = sum(
            m.weight.numel() for n, m in llm.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
        )
        other = sum(p.numel() for p in llm.parameters()) - linear
        print(f"{shape}: {other / 1e9:.2f} G non-quantized weights: +{2 * other / 2**30:.2f} GiB upcast to float32")


def test_8bit_trains_and_saves_the_adapter(tmp_path, tiny_llama_dir):
    config = _config(tiny_llama_dir, tmp_path, max_steps=2, eval_every=0, grad_checkpointing=False)
    config["model"]["llm_quantization"] = "8bit"
    result = train(validate_config(config))
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in result.model.llm.modules())
    assert len(losses(result.history)) == 2 and all(x == x for x in losses(result.history))
    assert (tmp_path / "out" / "final" / ADAPTER_DIR / "adapter_model.safetensors").is_file()


def test_qlora_refuses_to_stack_on_a_saved_adapter(qlora_run, tmp_path):
    from minigpt.train.loop import build_model

    root, config, _ = qlora_run
    section = validate_config({**config, "model": {**config["model"], "init_from": str(root / "out" / "final")}})
    with pytest.raises(ValueError, match="holds a LoRA adapter .*merge it first"):
        build_model(section.model)


def test_shipped_qlora_config():
    from minigpt.train.config import load_config

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "qlora_stage2.yaml")
    model = config.model
    assert (model.llm_quantization, model.llm_quant_type, model.llm_quant_double) == ("4bit", "nf4", True)
    assert model.lora is not None and model.lora.alpha == 32 and config.run.grad_checkpointing
    assert "llm_quantization" not in model.minigpt_config().to_dict()
