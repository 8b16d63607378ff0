"""LAVIS / MiniGPT-4 / transformers BLIP-2 converters against the lavis-tiny fixture (original LAVIS outputs)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Blip2Config, Blip2ForConditionalGeneration, LlamaConfig

from conftest import SHARED, shared_path
from minigpt.convert.lavis import (
    MissingKeysError,
    convert_hf_blip2,
    convert_lavis_vision,
    convert_minigpt4_projector,
    load_checkpoint,
    load_vision_source,
    save_vision,
    vision_config_from_lavis,
)
from minigpt.model.vision import Blip2VisionEncoder, VisionConfig
from minigpt.safe_load import UnsafeCheckpointError

pytestmark = pytest.mark.fidelity  # compared against tests/shared reference data

FIXTURE = SHARED / "fixtures" / "lavis-tiny"
TOL = 1e-4


@pytest.fixture(scope="module")
def fx() -> dict:
    shared_path("fixtures", "lavis-tiny")
    return {
        "eva": load_checkpoint(FIXTURE / "eva_vit.pth"),
        "blip2": load_checkpoint(FIXTURE / "blip2.pth"),
        "config": json.loads((FIXTURE / "config.json").read_text()),
        "expected": load_file(FIXTURE / "expected.safetensors"),
    }


@torch.no_grad()
def run_encoder(encoder: Blip2VisionEncoder, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """vit_features (before ln_vision = post_layernorm), image_embeds and query_output."""
    vit = encoder.vision_model(pixel_values=pixels, output_hidden_states=True)
    out = {"vit_features": vit.hidden_states[-1], "image_embeds": vit.last_hidden_state}
    return out | {"query_output": encoder(pixels)}


def encoder_from(config: VisionConfig, state: dict[str, torch.Tensor]) -> Blip2VisionEncoder:
    encoder = Blip2VisionEncoder(config)
    encoder.load_state_dict(state, strict=True)
    return encoder.eval()


def max_diffs(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: (v - expected[k]).abs().max().item() for k, v in got.items()}


@pytest.fixture(scope="module")
def converted(fx, tmp_path_factory) -> dict:
    config, state, report = convert_lavis_vision(fx["eva"], FIXTURE / "blip2.pth", heads=4, qformer_heads=4)
    encoder = load_vision_source(save_vision(tmp_path_factory.mktemp("vision"), config, state))
    return {"config": config, "state": state, "report": report, "encoder": encoder}


def test_features_match_lavis(fx, converted):
    expected = fx["expected"]
    got = run_encoder(converted["encoder"], expected["pixel_values"])
    proj, report = convert_minigpt4_projector(FIXTURE / "minigpt4_proj.pth")
    assert report.notes == ["llama_proj: in 32 -> out 96"] and report.ignored == []
    got["projected"] = torch.nn.functional.linear(got["query_output"], proj["weight"], proj["bias"])
    diffs = max_diffs(got, expected)
    print("max abs diffs vs fixture:", diffs)
    assert all(d < TOL for d in diffs.values()), diffs


def test_inferred_config_equals_fixture(fx, converted):
    vis, qf = fx["config"]["vision"], fx["config"]["qformer"]
    expected = VisionConfig(
        image_size=vis["img_size"],
        patch_size=vis["patch_size"],
        width=vis["embed_dim"],
        depth=vis["depth_used"],
        heads=vis["num_heads"],
        mlp_dim=vis["mlp_hidden_dim"],
        vit_eps=vis["norm_eps"],
        ln_vision_eps=fx["config"]["ln_vision"]["eps"],
        num_query_tokens=qf["num_query_token"],
        qformer_width=qf["hidden_size"],
        qformer_depth=qf["num_hidden_layers"],
        qformer_heads=qf["num_attention_heads"],
        qformer_mlp_dim=qf["intermediate_size"],
        qformer_eps=qf["layer_norm_eps"],
        cross_attention_freq=qf["cross_attention_freq"],
        mean=tuple(fx["config"]["image"]["mean"]),
        std=tuple(fx["config"]["image"]["std"]),
    )
    config = converted["config"]
    assert config == expected
    assert (config.depth, config.mlp_dim, config.num_query_tokens) == (3, 279, 8)
    assert [i for i in range(config.qformer_depth) if i % config.cross_attention_freq == 0] == [0, 2]
    assert vision_config_from_lavis(fx["eva"], fx["blip2"], heads=4, qformer_heads=4) == expected
    assert vision_config_from_lavis(fx["eva"], fx["blip2"], heads=4, qformer_heads=4, drop_last_block=False).depth == 4


def test_head_counts_that_do_not_fit_name_the_flag(fx):
    with pytest.raises(ValueError, match=r"Q-Former width 32 is not divisible by 12 heads: give .* --qformer-heads "):
        vision_config_from_lavis(fx["eva"], fx["blip2"], heads=4, qformer_heads=12)
    with pytest.raises(
        ValueError, match=r"ViT width \d+ is not divisible by 7 heads: give its head count with --heads"
    ):
        vision_config_from_lavis(fx["eva"], fx["blip2"], heads=7, qformer_heads=4)


def test_ignored_keys_reported(fx, converted):
    report = converted["report"]
    want = fx["config"]["vision"]["checkpoint_ignored_keys"] + fx["config"]["qformer"]["blip2_keys_ignored_by_minigpt4"]
    assert set(report.ignored) == set(want) | {"Qformer.bert.embeddings.position_ids"}
    assert "upcast torch.float16 to torch.float32" in report.notes
    assert all(v.dtype == torch.float32 for v in converted["state"].values())
    assert "blocks.3.attn.q_bias" in str(report)


def test_missing_keys_error_names_source_keys(fx):
    eva = {k: v for k, v in fx["eva"].items() if k != "blocks.1.attn.v_bias"}
    blip2 = {k: v for k, v in fx["blip2"].items() if not k.startswith("ln_vision.")}
    with pytest.raises(MissingKeysError, match=r"blocks\.1\.attn\.q_bias \+ blocks\.1\.attn\.v_bias") as err:
        convert_lavis_vision(eva, blip2, heads=4, qformer_heads=4)
    assert "ln_vision.weight" in str(err.value) and "ln_vision.bias" in str(err.value)
    with pytest.raises(MissingKeysError, match="query_tokens"):
        convert_lavis_vision(fx["eva"], {k: v for k, v in fx["blip2"].items() if k != "query_tokens"}, heads=4)


def test_visual_encoder_keys_in_blip2_file_override_eva(fx):
    weight = torch.full((64,), 3.0)
    _, state, _ = convert_lavis_vision(fx["eva"], {**fx["blip2"], "visual_encoder.blocks.0.norm1.weight": weight}, 4, 4)
    assert torch.equal(state["vision_model.encoder.layers.0.layer_norm1.weight"], weight)


def test_mutations_fail_tolerance(fx, converted):
    pixels, expected = fx["expected"]["pixel_values"], fx["expected"]["vit_features"]
    swapped = dict(fx["eva"])
    for i in range(4):
        swapped[f"blocks.{i}.attn.q_bias"], swapped[f"blocks.{i}.attn.v_bias"] = (
            fx["eva"][f"blocks.{i}.attn.v_bias"],
            fx["eva"][f"blocks.{i}.attn.q_bias"],
        )
    config, state, _ = convert_lavis_vision(swapped, fx["blip2"], heads=4, qformer_heads=4)
    diff = (run_encoder(encoder_from(config, state), pixels)["vit_features"] - expected).abs().max().item()
    assert diff > 1.0  # fixture README: 4.48
    config, state, _ = convert_lavis_vision(fx["eva"], fx["blip2"], heads=4, qformer_heads=4, drop_last_block=False)
    diff = (run_encoder(encoder_from(config, state), pixels)["vit_features"] - expected).abs().max().item()
    assert diff > 1.0  # fixture README: 4.15


def test_save_load_vision_round_trip(converted, tmp_path):
    directory = save_vision(tmp_path / "v", converted["config"], converted["state"])
    assert sorted(p.name for p in directory.iterdir()) == ["vision.safetensors", "vision_config.json"]
    encoder = load_vision_source(directory)
    assert encoder.config == converted["config"] and not encoder.training
    pixels = torch.randn(2, 3, 56, 56)
    assert torch.equal(encoder(pixels), converted["encoder"](pixels))
    partial = {k: v for k, v in converted["state"].items() if k != "query_tokens"}
    with pytest.raises(RuntimeError, match="query_tokens"):
        load_vision_source(save_vision(tmp_path / "bad", converted["config"], partial))


@pytest.fixture(scope="module")
def hf_blip2(tmp_path_factory):
    """A tiny random transformers Blip2ForConditionalGeneration (LLaMA text model) saved with save_pretrained."""
    torch.manual_seed(0)
    config = Blip2Config(
        vision_config=dict(
            hidden_size=64,
            intermediate_size=279,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=56,
            patch_size=14,
        ),
        qformer_config=dict(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=64,
            encoder_hidden_size=64,
            vocab_size=100,
            max_position_embeddings=64,
        ),
        text_config=LlamaConfig(
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=120,
        ).to_dict(),
        num_query_tokens=8,
    )
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(("vision_model.", "qformer.", "query_tokens")):
                param.normal_(0.0, 0.2)
            if name.endswith("qkv.bias"):
                param[64:128] = 0  # the k bias is zero in every BLIP-2 checkpoint
    directory = tmp_path_factory.mktemp("hf-blip2")
    model.save_pretrained(directory)
    return model, directory


def test_hf_directory_round_trip(hf_blip2, tmp_path):
    model, directory = hf_blip2
    config, state, report = convert_hf_blip2(directory)
    assert (config.width, config.depth, config.mlp_dim, config.heads, config.num_query_tokens) == (64, 3, 279, 4, 8)
    assert (config.qformer_width, config.qformer_depth, config.cross_attention_freq) == (32, 4, 2)
    assert config.ln_vision_eps == 1e-5 and any("1e-06" in note for note in report.notes)
    assert not any(k.startswith("language") for k in state) and report.ignored == []

    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        vit = model.vision_model(pixel_values=pixels, output_hidden_states=True)
        queries = model.query_tokens.expand(2, -1, -1)
        hf_query = model.qformer(query_embeds=queries, encoder_hidden_states=vit.last_hidden_state).last_hidden_state
    # With transformers' post_layernorm eps the outputs are identical ...
    same_eps = encoder_from(dataclasses.replace(config, ln_vision_eps=model.config.vision_config.layer_norm_eps), state)
    got = run_encoder(same_eps, pixels)
    assert torch.allclose(got["vit_features"], vit.hidden_states[-1], atol=1e-6)
    assert torch.allclose(got["query_output"], hf_query, atol=1e-6)
    # ... and with LAVIS' eps 1e-5 (what we keep) they stay within the fixture tolerance.
    encoder = load_vision_source(save_vision(tmp_path / "v", config, state))
    assert (encoder(pixels) - hf_query).abs().max().item() < TOL


def test_hf_other_layouts(hf_blip2, tmp_path):
    """A bare state dict (config inferred), pytorch_model.bin, and old separate q_bias/v_bias."""
    model, directory = hf_blip2
    config, state, _ = convert_hf_blip2(directory)
    hf_state = model.state_dict()
    bias = "vision_model.encoder.layers.1.self_attn."
    qkv = hf_state.pop(bias + "qkv.bias")
    hf_state[bias + "q_bias"], hf_state[bias + "v_bias"] = qkv[:64], qkv[128:]
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    for got_config, got_state, _ in (convert_hf_blip2(hf_state, heads=4, qformer_heads=4), convert_hf_blip2(tmp_path)):
        assert got_config == config and got_state.keys() == state.keys()
        assert all(torch.equal(got_state[k], state[k]) for k in state)


def _save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def test_projector_layouts(tmp_path):
    w, b = torch.randn(40, 32, dtype=torch.bfloat16), torch.randn(40, dtype=torch.bfloat16)
    qwen = _save(tmp_path / "model.pth", {"model": {"llm_proj.weight": w, "llm_proj.bias": b}, "epoch": 3})
    deepspeed = _save(
        tmp_path / "mp_rank_00_model_states.pt",
        {"module": {"llm_proj.weight": w, "llm_proj.bias": b}, "ds_version": "0.12.6", "optimizer": None},
    )
    pipe = _save(
        tmp_path / "layer_00-model_states.pt",
        {
            "visionpipe.llm_proj.weight": w,
            "visionpipe.llm_proj.bias": b,
            "visionpipe.query_tokens": torch.zeros(1, 8, 32),
            "wtepipe.word_embeddings.weight": torch.zeros(10, 40),
        },
    )
    for path, ignored in (
        (qwen, []),
        (deepspeed, []),
        (pipe, ["visionpipe.query_tokens", "wtepipe.word_embeddings.weight"]),
    ):
        proj, report = convert_minigpt4_projector(path)
        assert torch.equal(proj["weight"], w.float()) and torch.equal(proj["bias"], b.float())
        assert report.ignored == ignored and any("in 32 -> out 40" in n for n in report.notes)
    with pytest.raises(MissingKeysError, match="none"):
        convert_minigpt4_projector({"other.weight": w})
    with pytest.raises(MissingKeysError, match="exactly one"):
        convert_minigpt4_projector(
            {
                "llm_proj.weight": w,
                "llm_proj.bias": b,
                "llama_proj.weight": w,
                "llama_proj.bias": b,
            }
        )


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_refuses_arbitrary_pickles(tmp_path):
    marker = tmp_path / "executed"
    path = _save(tmp_path / "evil.pth", {"model": {"llama_proj.weight": torch.zeros(2, 2)}, "hook": _Evil(marker)})
    with pytest.raises(UnsafeCheckpointError, match="evil.pth"):
        load_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError):
        convert_minigpt4_projector(path)
    assert not marker.exists()
    with pytest.raises(ValueError, match="non-tensor"):
        load_checkpoint(_save(tmp_path / "mixed.pth", {"weight": torch.zeros(1), "step": 3}))
