"""``minigpt convert merge-lora``: the merged model's outputs are the adapter-on outputs (float32, 1e-5)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from minigpt.cli import main
from minigpt.convert.lora import MergeOptions, merge_lora, read_lora_weights
from minigpt.data.conversation import Conversation, Image, Text
from minigpt.model.minigpt import MiniGPT
from minigpt.model.processor import MiniGPTProcessor
from minigpt.train.checkpoint import save_checkpoint
from minigpt.train.config import LoraSection
from minigpt.train.loop import apply_lora

TOL = 1e-5


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir, llama_tokenizer):
    """A base model directory, a "trained" LoRA model (random adapters and projector) and its adapter files."""
    from minigpt.model.minigpt import MiniGPTConfig
    from minigpt.model.vision import VisionConfig

    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    model = MiniGPT.build(
        MiniGPTConfig(llm=str(tiny_llama_dir), vision=VisionConfig.tiny(), template="vicuna0", max_txt_len=32)
    )
    model.save_pretrained(root / "base", trainable_only=True)  # projector + vision; the LLM referenced
    apply_lora(model, LoraSection(r=4, alpha=8.0, dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.2)  # lora_B starts at zero: make the adapter matter
        model.projector.weight.normal_(0.0, 0.3)
    model.eval()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in weights) and "projector.weight" in weights
    run = root / "run"
    save_checkpoint(run, 7, weights, {"step": 7})
    model.llm.save_pretrained(root / "peft")  # adapter_config.json + adapter_model.safetensors
    return root, model


def _inputs(model, image_file):
    conv = Conversation().add("user", [Image(), Text(" What colour is the square?")])
    return MiniGPTProcessor.from_config(model.config).prepare([conv], [image_file], train=False)


def _logits(model, batch):
    with torch.no_grad():
        return model.llm(inputs_embeds=model.embed(batch), attention_mask=batch.text.attention_mask).logits


def test_read_checkpoint_weights(trained):
    root, model = trained
    lora = read_lora_weights(root / "run")  # the run folder: its newest checkpoint
    assert lora.prefix == "llm" and set(lora.ranks.values()) == {4}
    assert "model.layers.0.self_attn.q_proj" in lora.a and set(lora.other) == {"projector.weight", "projector.bias"}


def test_merge_run_checkpoint(trained, tmp_path, image_file, capsys):
    root, model = trained
    batch = _inputs(model, image_file)
    want = _logits(model, batch)
    out, hf_dir = tmp_path / "merged", tmp_path / "merged-hf"
    assert (
        main(
            [
                "convert",
                "merge-lora",
                str(root / "run" / "checkpoints" / "step_00000007"),
                "--base",
                str(root / "base"),
                "--lora-alpha",
                "8",
                "--out",
                str(out),
                "--export-hf",
                str(hf_dir),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "rank 4, alpha 8 (scale 2)" in printed and "projector" in printed

    merged = MiniGPT.from_pretrained(out).eval()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    got = _logits(merged, batch)
    diff = (got - want).abs().max().item()
    print(f"merge-lora (checkpoint): max |logits diff| {diff:.2e}")
    assert diff < TOL
    data = json.loads((out / "config.json").read_text())
    assert data["freeze"]["llm"] is True and data["freeze"]["projector"] is False  # the base's, as training's final
    assert (out / "llm" / "config.json").is_file() and json.loads((out / "merged_lora.json").read_text())["rank"] == 4

    # the transformers export of the merged model gives the same logits (up to its documented ln eps ~1e-6)
    from transformers import Blip2ForConditionalGeneration

    hf = Blip2ForConditionalGeneration.from_pretrained(hf_dir).eval()
    ids = batch.text.input_ids.masked_fill(batch.text.image_mask, hf.config.image_token_index)
    with torch.no_grad():
        theirs = hf(pixel_values=batch.pixel_values, input_ids=ids, attention_mask=batch.text.attention_mask).logits
    hf_diff = (theirs[..., : want.shape[-1]] - want).abs().max().item()
    print(f"merge-lora --export-hf: max |logits diff| {hf_diff:.2e}")
    assert hf_diff < 1e-4


def test_merge_peft_folder_into_llm_and_model(trained, tmp_path, image_file, tiny_llama_dir):
    root, model = trained
    batch = _inputs(model, image_file)
    result = merge_lora(root / "peft", tmp_path / "m", base=root / "base")
    assert result.kind == "minigpt" and result.rank == 4 and result.alpha == 8.0 and result.modules == 8
    merged = MiniGPT.from_pretrained(tmp_path / "m").eval()
    # the peft folder holds the LLM adapter only: the projector is the base's, so compare the LLM on its own
    ids = batch.text.input_ids.clamp(min=0)
    with torch.no_grad():
        assert torch.allclose(merged.llm(input_ids=ids).logits, model.llm(input_ids=ids).logits, atol=TOL)

    # a plain transformers LLM folder as the base: a merged LLM folder comes out
    from transformers import AutoModelForCausalLM

    result = merge_lora(root / "peft", tmp_path / "llm", base=tiny_llama_dir)
    assert result.kind == "llm"
    llm = AutoModelForCausalLM.from_pretrained(tmp_path / "llm").eval()
    with torch.no_grad():
        assert torch.allclose(llm(input_ids=ids).logits, model.llm(input_ids=ids).logits, atol=TOL)
    assert (tmp_path / "llm" / "tokenizer_config.json").is_file()


def test_rslora_reports_the_scale_peft_applies(trained, tmp_path, tiny_llama_dir):
    """rsLoRA scales by alpha / sqrt(r): 8 / sqrt(4) = 4 (not alpha / r = 2), in the report and in the weights."""
    import shutil

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    root, _ = trained
    adapter = shutil.copytree(root / "peft", tmp_path / "rslora")
    settings = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**settings, "use_rslora": True}))
    result = merge_lora(adapter, tmp_path / "llm", base=tiny_llama_dir)
    assert result.report.notes[-1] == "merged LoRA into 8 module(s): rank 4, alpha 8 (scale 4)"
    lora = load_file(adapter / "adapter_model.safetensors")
    module = "model.layers.0.self_attn.q_proj"
    a, b = (lora[f"base_model.model.{module}.lora_{x}.weight"] for x in "AB")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).get_submodule(module).weight
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "llm").get_submodule(module).weight
    torch.testing.assert_close(merged - base, 4.0 * b @ a, rtol=0, atol=TOL)


def test_merge_from_training_config(trained, tmp_path, tiny_llama_dir, image_file):
    """No --base: the run's YAML builds the base as training did and gives alpha (found in OUTPUT/final)."""
    root, model = trained
    config = {
        "model": {
            "llm": str(tiny_llama_dir),
            "vision": "tiny",
            "max_txt_len": 32,
            "lora": {"r": 4, "alpha": 8.0, "dropout": 0.0},
        },
        "data": {"datasets": [{"format": "llava", "path": "unused.json"}]},
        "run": {"output_dir": str(root / "run")},
    }
    final = tmp_path / "run"
    (final / "final").mkdir(parents=True)
    (final / "final" / "train_config.yaml").write_text(yaml.safe_dump(config))
    ckpt = root / "run" / "checkpoints" / "step_00000007"
    import shutil

    shutil.copytree(ckpt, final / "checkpoints" / ckpt.name)
    result = merge_lora(final / "checkpoints" / ckpt.name, tmp_path / "out")
    assert any("train_config.yaml" in n for n in result.report.notes) and result.alpha == 8.0
    merged = MiniGPT.from_pretrained(tmp_path / "out").eval()
    ids = _inputs(model, image_file).text.input_ids.clamp(min=0)
    with torch.no_grad():
        assert torch.allclose(merged.llm(input_ids=ids).logits, model.llm(input_ids=ids).logits, atol=TOL)
    assert torch.equal(merged.projector.weight, model.projector.weight)


def test_errors(trained, tmp_path, capsys):
    root, _ = trained
    ckpt = root / "run" / "checkpoints" / "step_00000007"
    with pytest.raises(ValueError, match="does not record the LoRA alpha"):
        merge_lora(ckpt, tmp_path / "a", base=root / "base")
    with pytest.raises(ValueError, match="give the base model"):
        merge_lora(ckpt, tmp_path / "b", options=MergeOptions(lora_alpha=8))
    assert (
        main(
            [
                "convert",
                "merge-lora",
                str(root / "base"),
                "--base",
                str(root / "base"),
                "--lora-alpha",
                "8",
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 2
    )
    assert "not an adapter" in capsys.readouterr().err
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("")
    with pytest.raises(FileExistsError):
        merge_lora(ckpt, tmp_path / "d", base=root / "base", options=MergeOptions(lora_alpha=8))


def test_a_flag_that_contradicts_the_recorded_alpha_is_refused(trained, tmp_path, capsys):
    """The run records alpha 8 (OUTPUT/final/train_config.yaml, found by itself): --lora-alpha 16 would merge with
    twice the scale, silently; it is refused, unless forced, and merged_lora.json says what was used."""
    import shutil

    root, _ = trained
    run = tmp_path / "run"
    shutil.copytree(root / "run" / "checkpoints", run / "checkpoints")
    config = {
        "model": {"llm": "unused", "vision": "tiny", "lora": {"r": 4, "alpha": 8.0}},
        "data": {"datasets": [{"format": "llava", "path": "unused.json"}]},
        "run": {},
    }
    recorded = run / "final" / "train_config.yaml"
    recorded.parent.mkdir()
    recorded.write_text(yaml.safe_dump(config))
    args = ["convert", "merge-lora", str(run), "--base", str(root / "base"), "--lora-alpha", "16"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "--lora-alpha 16 contradicts the run's record" in err and "model.lora.alpha in" in err and "8" in err
    assert not (tmp_path / "a").exists()
    peft = root / "peft"  # records lora_alpha 8 in adapter_config.json
    with pytest.raises(ValueError, match="contradicts the run's record .*adapter_config.json: 8"):
        merge_lora(peft, tmp_path / "p", base=root / "base", options=MergeOptions(lora_alpha=16))

    assert main([*args, "--force-lora-alpha", "--out", str(tmp_path / "forced")]) == 0
    info = json.loads((tmp_path / "forced" / "merged_lora.json").read_text())
    assert (info["alpha"], info["alpha_from"], info["config"]) == (16.0, "--lora-alpha", str(recorded.resolve()))
    assert main([*args[:-2], "--out", str(tmp_path / "b")]) == 0  # no flag: the recorded alpha
    info = json.loads((tmp_path / "b" / "merged_lora.json").read_text())
    assert (info["alpha"], info["alpha_from"], info["config"]) == (8.0, "config", str(recorded.resolve()))
    forced = MiniGPT.from_pretrained(tmp_path / "forced").llm.get_submodule("model.layers.0.self_attn.q_proj")
    right = MiniGPT.from_pretrained(tmp_path / "b").llm.get_submodule("model.layers.0.self_attn.q_proj")
    assert not torch.equal(forced.weight, right.weight)
