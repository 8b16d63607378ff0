"""``minigpt convert ...`` end to end: each command's output checked numerically against the lavis-tiny
fixture (original LAVIS outputs) or the source model."""

from __future__ import annotations

import argparse
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import SHARED, shared_path
from minigpt.cli import build_parser, main
from minigpt.convert.lavis import load_checkpoint, load_vision_source
from minigpt.model.minigpt import MiniGPT

pytestmark = pytest.mark.fidelity  # compared against tests/shared reference data

FIXTURE = SHARED / "fixtures" / "lavis-tiny"
TOL = 1e-4


@pytest.fixture(scope="module")
def expected():
    shared_path("fixtures", "lavis-tiny")
    return load_file(FIXTURE / "expected.safetensors")


@pytest.fixture(scope="module")
def vision_dir(expected, tmp_path_factory):
    out = tmp_path_factory.mktemp("vision") / "v"
    assert (
        main(
            [
                "convert",
                "lavis",
                "--eva",
                str(FIXTURE / "eva_vit.pth"),
                "--blip2",
                str(FIXTURE / "blip2.pth"),
                "--out",
                str(out),
                "--heads",
                "4",
                "--qformer-heads",
                "4",
            ]
        )
        == 0
    )
    return out


def test_help_lists_commands(capsys):
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert {"convert", "info"} <= set(sub.choices)
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    out = capsys.readouterr().out
    for what in ("lavis", "hf-blip2", "projector", "assemble", "deepspeed", "export-hf"):
        assert what in out


def test_lavis(vision_dir, expected, capsys):
    with torch.no_grad():
        got = load_vision_source(vision_dir)(expected["pixel_values"])
    diff = (got - expected["query_output"]).abs().max().item()
    print(f"convert lavis: query_output max abs diff {diff:.3g}")
    assert diff < TOL


def test_lavis_prints_report(expected, tmp_path, capsys):
    assert (
        main(
            [
                "convert",
                "lavis",
                "--eva",
                str(FIXTURE / "eva_vit.pth"),
                "--blip2",
                str(FIXTURE / "blip2.pth"),
                "--out",
                str(tmp_path / "v"),
                "--heads",
                "4",
                "--qformer-heads",
                "4",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "ViT 3 blocks x 64" in out and "8 queries" in out
    assert "note: upcast torch.float16 to torch.float32" in out and "blocks.3.attn.q_bias" in out and "t5_proj" in out


def test_projector(expected, tmp_path, capsys):
    out = tmp_path / "proj.safetensors"
    assert main(["convert", "projector", str(FIXTURE / "minigpt4_proj.pth"), "--out", str(out)]) == 0
    assert "linear projector 32 -> 96" in capsys.readouterr().out
    proj, source = load_file(out), load_checkpoint(FIXTURE / "minigpt4_proj.pth")
    assert torch.equal(proj["weight"], source["llama_proj.weight"]) and torch.equal(
        proj["bias"], source["llama_proj.bias"]
    )
    got = F.linear(expected["query_output"], proj["weight"], proj["bias"])
    assert (got - expected["projected"]).abs().max().item() < TOL
    assert main(["convert", "projector", str(FIXTURE / "minigpt4_proj.pth"), "--out", str(tmp_path / "p.pth")]) == 2
    assert "minigpt convert: error: --out" in capsys.readouterr().err


def test_hf_blip2(tmp_path, capsys, tiny_blip2_config):
    from transformers import Blip2ForConditionalGeneration, OPTConfig

    torch.manual_seed(0)
    text = OPTConfig(
        hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=60, word_embed_proj_dim=16
    )
    model = Blip2ForConditionalGeneration(tiny_blip2_config(text.to_dict())).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("vision_model.", "qformer.", "query_tokens")):
                p.normal_(0.0, 0.2)
    model.save_pretrained(tmp_path / "blip2")
    assert main(["convert", "hf-blip2", str(tmp_path / "blip2"), "--out", str(tmp_path / "v")]) == 0
    assert "only vision_model.*, qformer.*, query_tokens read" in capsys.readouterr().out
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        feats = model.vision_model(pixel_values=pixels).last_hidden_state
        want = model.qformer(
            query_embeds=model.query_tokens.expand(2, -1, -1), encoder_hidden_states=feats
        ).last_hidden_state
        got = load_vision_source(tmp_path / "v")(pixels)
    assert (got - want).abs().max().item() < TOL  # ln_vision eps 1e-5 vs transformers' 1e-6
    assert main(["convert", "hf-blip2", str(tmp_path / "nothing"), "--out", str(tmp_path / "w")]) == 2
    assert "no such folder" in capsys.readouterr().err


def _minigpt4_projector(path: Path, out_dim: int = 64, in_dim: int = 32) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    proj = {"llama_proj.weight": torch.randn(out_dim, in_dim) * 0.1, "llama_proj.bias": torch.randn(out_dim) * 0.1}
    torch.save({"model": proj, "epoch": 4}, path)  # the MiniGPT-4 runner layout
    return proj


@pytest.mark.parametrize("full", [False, True])
def test_assemble(vision_dir, expected, tiny_llama_dir, tmp_path, capsys, full):
    """The directory (default: referencing the LLM and vision folders by relative paths) still loads after the
    whole tree moved (absolute paths were recorded before)."""
    import json
    import shutil

    tree = tmp_path / "tree"
    shutil.copytree(tiny_llama_dir, tree / "vicuna-7b")
    shutil.copytree(vision_dir, tree / "vision")
    proj = _minigpt4_projector(tree / "pretrained_minigpt4.pth")
    out = tree / "models" / "minigpt4"
    argv = [
        "convert",
        "assemble",
        "--llm",
        str(tree / "vicuna-7b"),
        "--vision",
        str(tree / "vision"),
        "--projector",
        str(tree / "pretrained_minigpt4.pth"),
        "--out",
        str(out),
    ]
    assert main(argv + (["--full"] if full else [])) == 0
    printed = capsys.readouterr().out
    assert "note: llama_proj: in 32 -> out 64" in printed
    assert "note: template vicuna0: a MiniGPT-4 (Vicuna v0) checkpoint (--template to choose another)" in printed
    files = sorted(p.name for p in out.iterdir())
    config = json.loads((out / "config.json").read_text())
    assert config["llm"] == "../../vicuna-7b"
    if full:
        assert files == ["config.json", "llm", "projector.safetensors", "tokenizer", "vision.safetensors"]
    else:
        assert (
            files == ["config.json", "projector.safetensors", "tokenizer"]
            and config["vision_weights"] == "../../vision"
        )
        assert "referenced relative to it, not copied: move them together" in printed
    shutil.move(tree, tmp_path / "moved")
    model = MiniGPT.from_pretrained(tmp_path / "moved" / "models" / "minigpt4").eval()
    assert model.config.template == "vicuna0"
    assert model.config.llm == str((tmp_path / "moved" / "vicuna-7b").resolve())
    with torch.no_grad():
        got = model.encode_images(expected["pixel_values"])
    want = F.linear(expected["query_output"], proj["llama_proj.weight"], proj["llama_proj.bias"])
    diff = (got - want).abs().max().item()
    print(f"assemble (full={full}): projected max abs diff {diff:.3g}")
    assert diff < TOL


def test_assemble_errors(vision_dir, tiny_llama_dir, tmp_path, capsys):
    argv = [
        "convert",
        "assemble",
        "--llm",
        str(tiny_llama_dir),
        "--vision",
        str(vision_dir),
        "--out",
        str(tmp_path / "m"),
    ]
    capsys.readouterr()
    # The fixture's projector is for a 96-wide LLM; the tiny LLaMA is 64 wide.
    assert main(argv + ["--projector", str(FIXTURE / "minigpt4_proj.pth")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not fit" in err and "[96, 32]" in err
    assert main(argv[:5] + [str(tmp_path)] + argv[6:] + ["--projector", str(FIXTURE / "minigpt4_proj.pth")]) == 2
    assert "not a vision encoder folder" in capsys.readouterr().err


def test_deepspeed_and_export(tiny_model_factory, tmp_path, capsys, image_file):
    src = tiny_model_factory()
    with torch.no_grad():
        src.projector.weight.normal_(0.0, 0.3)
    tag = tmp_path / "run" / "global_step3"
    tag.mkdir(parents=True)
    module = {k: v.detach().clone() for k, v in src.state_dict().items()}
    torch.save(
        {
            "module": module,
            "buffer_names": [],
            "param_shapes": [OrderedDict()],
            "ds_version": "0.19.8",
            "ds_config": {"zero_optimization": {"stage": 1}},
            "global_steps": 3,
            "minigpt_config": src.config.to_dict(),
            "args": argparse.Namespace(lr=1.0),
        },
        tag / "mp_rank_00_model_states.pt",
    )
    out = tmp_path / "model"
    capsys.readouterr()  # drop the progress bars of building the source model
    assert main(["convert", "deepspeed", str(tmp_path / "run"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argparse.Namespace" in err and "--trust-pickle" in err
    assert main(["convert", "deepspeed", str(tmp_path / "run"), "--out", str(out), "--trust-pickle"]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "ZeRO stage 1" in printed and "global_step3" in printed
    loaded = MiniGPT.from_pretrained(out)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in module.items())

    assert main(["convert", "export-hf", str(out), "--out", str(tmp_path / "hf")]) == 0
    printed = capsys.readouterr().out
    assert "Blip2ForConditionalGeneration" in printed and "<image> = 32000" in printed and "post_layernorm" in printed
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "hf").iterdir()
    }
    assert main(["convert", "export-hf", str(tmp_path / "missing"), "--out", str(tmp_path / "hf2")]) == 2
    assert "no such model directory" in capsys.readouterr().err


def test_assemble_minigpt4qwen_checkpoint_with_trained_qformer(vision_dir, tiny_qwen_dir, tmp_path, capsys):
    """A MiniGPT4Qwen checkpoint (llm_proj + a trained Q-Former) onto a Qwen LLM: ChatML chosen (not vicuna0), the
    checkpoint's query_tokens / Qformer.bert.* load over the base Q-Former, text-side keys are ignored, and the
    encoder is stored (it no longer equals its source)."""
    base = load_vision_source(vision_dir).state_dict()
    torch.manual_seed(2)
    query_key = "Qformer.bert.encoder.layer.0.attention.self.query.weight"
    trained = {
        "llm_proj.weight": torch.randn(64, 32) * 0.1,
        "llm_proj.bias": torch.zeros(64),
        "query_tokens": torch.randn(1, 8, 32),
        query_key: torch.randn(32, 32),
        "Qformer.bert.encoder.layer.0.intermediate.dense.weight": torch.randn(64, 32),  # text side: no place
    }
    torch.save({"model": trained, "epoch": 9}, tmp_path / "model.pth")
    out = tmp_path / "qwen-model"
    assert (
        main(
            [
                "convert",
                "assemble",
                "--llm",
                str(tiny_qwen_dir),
                "--vision",
                str(vision_dir),
                "--projector",
                str(tmp_path / "model.pth"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "note: template chatml: an llm_proj checkpoint (MiniGPT4Qwen / MPP-Qwen)" in printed
    assert "loaded 2 vision-stack tensor(s) of the checkpoint (qformer, query_tokens)" in printed
    assert "ignored 1 key(s): Qformer.bert.encoder.layer.0.intermediate.dense.weight" in printed
    assert "vision.safetensors" in {p.name for p in out.iterdir()}
    model = MiniGPT.from_pretrained(out)
    state = model.vision.state_dict()
    assert model.config.template == "chatml" and model.config.vision_weights is None
    assert torch.equal(state["query_tokens"], trained["query_tokens"])
    assert torch.equal(state["qformer.encoder.layer.0.attention.attention.query.weight"], trained[query_key])
    changed = ("query_tokens", "qformer.encoder.layer.0.attention.attention.query.weight")
    assert all(torch.equal(state[k], base[k]) for k in base if k not in changed)
    # An explicit template is kept, with a note; a Qwen LLM alone also suggests ChatML.
    llama_proj = {"llama_proj.weight": trained["llm_proj.weight"], "llama_proj.bias": trained["llm_proj.bias"]}
    torch.save({"model": llama_proj}, tmp_path / "llama.pth")
    assert (
        main(
            [
                "convert",
                "assemble",
                "--llm",
                str(tiny_qwen_dir),
                "--vision",
                str(vision_dir),
                "--projector",
                str(tmp_path / "llama.pth"),
                "--out",
                str(tmp_path / "m2"),
                "--template",
                "vicuna0",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "template vicuna0 as asked, though a qwen2 LLM (MiniGPT4Qwen style) suggests chatml" in printed
