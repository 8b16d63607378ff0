"""DeepSpeed ZeRO (stage 0-3) and MPP-style pipeline checkpoints -> model directories, checked numerically.

Checkpoints are written with torch.save in DeepSpeed's layouts from tiny models; one slow test makes a real
2-process CPU ZeRO-2 checkpoint with deepspeed.initialize.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import socket
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import SHARED, shared_path
from minigpt.convert.deepspeed import (
    PIPELINE_LLM_NAMES,
    DeepSpeedConversion,
    UnsafeCheckpointError,
    convert_deepspeed,
    map_pipeline_llm,
    pipeline_llm_names,
    resolve_tag_dir,
    zero_state_dict,
)
from minigpt.convert.lavis import load_checkpoint, save_vision
from minigpt.data.conversation import Conversation
from minigpt.model.minigpt import MiniGPT
from minigpt.model.processor import MiniGPTProcessor

FIXTURE = SHARED / "fixtures" / "lavis-tiny"
MODEL_STATES = "mp_rank_00_model_states.pt"
TAG = "global_step10"


def _conv():
    return Conversation.single("<Img><ImageHere></Img> What colour is it?", "It is red.")


def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def _loss(model: MiniGPT, image_file: Path) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(batch=MiniGPTProcessor.from_config(model.config).prepare([_conv()], [image_file])).loss


def _assert_same_weights(loaded: MiniGPT, expected: dict[str, torch.Tensor]) -> None:
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    bad = [k for k in expected if not torch.equal(got[k], expected[k].to(got[k].dtype))]
    assert not bad, bad[:5]


def _model_states(model: MiniGPT, module: dict[str, torch.Tensor], stage: int = 2, **extra) -> dict:
    """A ``mp_rank_00_model_states.pt`` as DeepSpeed's engine.save_checkpoint writes it (+ client state)."""
    trainable = OrderedDict((n, p.shape) for n, p in model.named_parameters() if p.requires_grad)
    frozen = OrderedDict((n, p.shape) for n, p in model.named_parameters() if not p.requires_grad)
    return {
        "module": module,
        "buffer_names": [],
        "optimizer": None,
        "param_shapes": [trainable],
        "frozen_param_shapes": frozen,
        "shared_params": {},
        "frozen_param_fragments": OrderedDict(),
        "lr_scheduler": None,
        "data_sampler": None,
        "random_ltd": None,
        "skipped_steps": 0,
        "global_steps": 10,
        "global_samples": 40,
        "dp_world_size": 2,
        "mp_world_size": 1,
        "ds_config": {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage}},
        "ds_version": "0.19.8",
        **extra,
    }


def _save_dir(root: Path, files: dict[str, object]) -> Path:
    (root / TAG).mkdir(parents=True)
    (root / "latest").write_text(TAG)
    for name, obj in files.items():
        torch.save(obj, root / TAG / name)
    return root


# ---------------------------------------------------------------------------------------------- ZeRO 0-2
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero2_module_to_model_dir(tiny_model_factory, image_file, tmp_path, dtype):
    src = tiny_model_factory(freeze={"llm": False})
    _perturb(src.llm, 1)
    _perturb(src.projector, 2)
    module = {k: v.detach().to(dtype).clone() for k, v in src.state_dict().items()}
    ckpt = _save_dir(
        tmp_path / "run",
        {
            "mp_rank_00_model_states.pt": _model_states(src, module, minigpt_config=src.config.to_dict()),
        },
    )
    written, report = convert_deepspeed(ckpt, tmp_path / "out")
    # vision: frozen but no recorded source, so it is written; llm: trained.
    assert written == ["vision", "projector", "llm"]
    assert any("ZeRO stage 2" in n and "step 10" in n for n in report.notes)
    loaded = MiniGPT.from_pretrained(tmp_path / "out")
    assert loaded.config.freeze == src.config.freeze and loaded.config.template == "vicuna0"
    _assert_same_weights(loaded, module)
    # Outputs: the source model with the checkpoint's (rounded) weights.
    src.load_state_dict({k: v.float() for k, v in module.items()})
    assert torch.equal(_loss(loaded, image_file), _loss(src, image_file))


def test_zero_partial_module_takes_frozen_parts_from_sources(tiny_model_factory, image_file, tmp_path):
    """exclude_frozen_parameters=True: only the projector is saved; vision and LLM come from their sources."""
    src = tiny_model_factory()
    _perturb(src.projector, 3)
    module = {k: v.detach().clone() for k, v in src.state_dict().items() if k.startswith("projector.")}
    ckpt = _save_dir(tmp_path / "run", {"mp_rank_00_model_states.pt": _model_states(src, module)})
    with pytest.raises(ValueError, match="records no minigpt_config.*--config"):
        convert_deepspeed(ckpt, tmp_path / "out")
    src.save_pretrained(tmp_path / "cfg", trainable_only=True)  # a config with vision_weights=None
    with pytest.raises(ValueError, match="vision encoder is neither in the checkpoint nor recorded"):
        convert_deepspeed(ckpt, tmp_path / "out", DeepSpeedConversion(config=tmp_path / "cfg"))
    vision_dir = save_vision(tmp_path / "vision", src.config.vision, src.vision.state_dict())
    written, report = convert_deepspeed(
        ckpt, tmp_path / "out", DeepSpeedConversion(config=tmp_path / "cfg" / "config.json", vision=str(vision_dir))
    )
    assert written == ["projector"]
    assert "vision: from" in str(report) and "llm: from" in str(report)
    loaded = MiniGPT.from_pretrained(tmp_path / "out")
    assert loaded.config.vision_weights == str(vision_dir.resolve())
    _assert_same_weights(loaded, src.state_dict())
    assert torch.equal(_loss(loaded, image_file), _loss(src, image_file))


def test_frozen_vision_in_the_checkpoint_is_referenced_only_when_equal_to_its_source(tiny_model_factory, tmp_path):
    """A ZeRO-2 'module' holds the frozen vision encoder too. Equal to the recorded source: the folder refers to the
    source and the report says so (it used to say "all N tensors from the checkpoint"); different: written."""
    src = tiny_model_factory()
    vision_dir = save_vision(tmp_path / "vision", src.config.vision, src.vision.state_dict())
    src.config.vision_weights = str(vision_dir.resolve())
    n = len(src.vision.state_dict())
    module = {k: v.detach().to(torch.bfloat16) for k, v in src.state_dict().items() if not k.startswith("llm.")}
    ckpt = _save_dir(
        tmp_path / "run",
        {
            "mp_rank_00_model_states.pt": _model_states(src, module, minigpt_config=src.config.to_dict()),
        },
    )
    written, report = convert_deepspeed(ckpt, tmp_path / "out")
    assert written == ["projector"]
    assert (
        f"vision: the checkpoint's {n} tensors equal {vision_dir.resolve()}, which the folder refers to "
        "(not copied)" in report.notes
    )
    assert MiniGPT.from_pretrained(tmp_path / "out").config.vision_weights == str(vision_dir.resolve())

    module["vision.query_tokens"] = module["vision.query_tokens"] + 1
    torch.save(_model_states(src, module, minigpt_config=src.config.to_dict()), ckpt / TAG / MODEL_STATES)
    written, report = convert_deepspeed(ckpt, tmp_path / "out2")
    assert written == ["vision", "projector"]
    assert f"vision: all {n} tensors from the checkpoint; they differ from {vision_dir.resolve()}" in report.notes
    loaded = MiniGPT.from_pretrained(tmp_path / "out2")
    assert loaded.config.vision_weights is None
    assert torch.equal(loaded.vision.query_tokens, module["vision.query_tokens"].float())


def test_a_random_vision_encoder_comes_from_the_runs_final_folder(tiny_model_factory, image_file, tmp_path):
    """A run whose vision encoder was random (no vision_weights) and frozen: its DeepSpeed files lack the encoder,
    which only the run's final/ holds; --vision accepts that model directory and copies its encoder."""
    src = tiny_model_factory()
    _perturb(src.projector, 12)
    step_dir = _our_pipeline_run(src, tmp_path / "run")
    final = tmp_path / "run" / "final"
    assert src.save_pretrained(final, trainable_only=True) == ["vision", "projector"]
    with pytest.raises(ValueError, match="neither in the checkpoint nor recorded.*such as the run's final/"):
        convert_deepspeed(step_dir, tmp_path / "out")
    written, report = convert_deepspeed(step_dir, tmp_path / "out", DeepSpeedConversion(vision=str(final)))
    assert written == ["vision", "projector"]
    assert f"vision: from {final / 'vision.safetensors'}" in report.notes
    loaded = MiniGPT.from_pretrained(tmp_path / "out")
    _assert_same_weights(loaded, src.state_dict())
    assert torch.equal(_loss(loaded, image_file), _loss(src, image_file))
    with pytest.raises(FileNotFoundError, match="neither a vision folder .* nor a minigpt model directory"):
        convert_deepspeed(step_dir, tmp_path / "out3", DeepSpeedConversion(vision=str(tmp_path)))


def test_zero_bad_inputs(tiny_model_factory, tmp_path):
    src = tiny_model_factory()
    state = src.state_dict()
    with pytest.raises(FileNotFoundError, match="no DeepSpeed checkpoint"):
        resolve_tag_dir(tmp_path)
    lora = {**state, "llm.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64)}
    ckpt = _save_dir(
        tmp_path / "a", {"mp_rank_00_model_states.pt": _model_states(src, lora, minigpt_config=src.config.to_dict())}
    )
    with pytest.raises(ValueError, match="llm: 1 unexpected tensor.*lora_A"):
        convert_deepspeed(ckpt, tmp_path / "out")
    stage3_like = {k: torch.empty(0) if k.startswith("llm.") else v for k, v in state.items()}
    ckpt = _save_dir(tmp_path / "b", {"mp_rank_00_model_states.pt": _model_states(src, stage3_like)})
    with pytest.raises(ValueError, match="empty tensor"):
        zero_state_dict(ckpt / TAG)
    with pytest.raises(FileNotFoundError, match="no \\*_optim_states.pt"):
        zero_state_dict(ckpt / TAG, fp32=True)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_non_allow_listed_objects_need_trust_pickle(tiny_model_factory, tmp_path):
    src = tiny_model_factory()
    files = {
        "mp_rank_00_model_states.pt": _model_states(
            src, src.state_dict(), minigpt_config=src.config.to_dict(), args=argparse.Namespace(lr=1e-4)
        )
    }
    ckpt = _save_dir(tmp_path / "run", files)
    with pytest.raises(UnsafeCheckpointError, match=r"argparse\.Namespace.*--trust-pickle"):
        convert_deepspeed(ckpt, tmp_path / "out")
    written, _ = convert_deepspeed(ckpt, tmp_path / "out", DeepSpeedConversion(trust_pickle=True))
    assert written == ["vision", "projector"]
    marker = tmp_path / "executed"
    torch.save(
        {"visionpipe.llm_proj.weight": torch.zeros(64, 32), "hook": _Evil(marker)},
        tmp_path / "run" / TAG / "layer_00-model_states.pt",
    )
    (tmp_path / "run" / TAG / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(UnsafeCheckpointError, match="--trust-pickle"):
        convert_deepspeed(ckpt, tmp_path / "out2", DeepSpeedConversion(llm=src.config.llm))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- ZeRO 3
def _partition(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    flat = t.detach().reshape(-1).float()
    per = -(-flat.numel() // world)
    flat = torch.cat([flat, flat.new_zeros(per * world - flat.numel())])
    return list(flat.split(per))


def test_zero3_fp32_masters_via_zero_to_fp32(tiny_model_factory, image_file, tmp_path):
    """Stage 3 (2 ranks): partitions padded per parameter, frozen parameters as fragments, a LossScaler
    (allow-listed DeepSpeed class) in the optimizer files; rebuilt by DeepSpeed's own zero_to_fp32."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    world = 2
    src = tiny_model_factory(freeze={"llm": False})
    _perturb(src.llm, 4)
    _perturb(src.projector, 5)
    named = dict(src.named_parameters())
    trainable = OrderedDict((n, p.shape) for n, p in named.items() if p.requires_grad)
    frozen = OrderedDict((n, p.shape) for n, p in named.items() if not p.requires_grad)
    files = {}
    for rank in range(world):
        files[f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"] = {
            **_model_states(src, {n: torch.empty(0) for n in named}, stage=3, minigpt_config=src.config.to_dict()),
            "param_shapes": [trainable],
            "frozen_param_shapes": frozen,
            "frozen_param_fragments": {n: _partition(named[n], world)[rank] for n in frozen},
        }
        flat = torch.cat([_partition(named[n], world)[rank] for n in trainable])
        files[f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"] = {
            "optimizer_state_dict": {
                "zero_stage": 3,
                "partition_count": world,
                "fp32_flat_groups": [flat],
                "loss_scaler": LossScaler(1.0),
                "dynamic_loss_scale": False,
            },
            "ds_config": {"zero_optimization": {"stage": 3}},
            "ds_version": "0.19.8",
        }
    ckpt = _save_dir(tmp_path / "run", files)
    written, report = convert_deepspeed(ckpt, tmp_path / "out")
    assert written == ["vision", "projector", "llm"] and "zero_to_fp32" in str(report)
    loaded = MiniGPT.from_pretrained(tmp_path / "out")
    _assert_same_weights(loaded, src.state_dict())
    assert torch.equal(_loss(loaded, image_file), _loss(src, image_file))


# ---------------------------------------------------------------------------------------------- pipeline
def test_pipeline_llm_name_table():
    assert pipeline_llm_names({"model.embed_tokens.weight": 0, "model.layers.0.mlp.up_proj.weight": 0})[0] == "llama"
    qwen_base = {
        "transformer.wte.weight": (10, 4),
        "transformer.h.0.ln_1.weight": (4,),
        "transformer.h.0.attn.c_attn.weight": (12, 4),
        "transformer.h.1.ln_1.weight": (4,),
        "transformer.h.1.attn.c_attn.weight": (12, 4),
        "transformer.ln_f.weight": (4,),
        "lm_head.weight": (10, 4),
    }
    block = {"layer.ln_1.weight": torch.ones(4), "layer.attn.c_attn.weight": torch.ones(12, 4)}
    layers = {
        0: {"wtepipe.word_embeddings.weight": torch.ones(10, 4), "visionpipe.llm_proj.weight": torch.ones(4, 2)},
        1: {},
        2: {},
        3: {},
        4: {},
        5: block,
        6: block,
        7: {"final_layernorm.weight": torch.ones(4)},
        8: {"lm_head.weight": torch.ones(10, 4)},
        9: {},
        10: {"occupy.weight": torch.zeros(3, 3)},
    }
    state, ignored, notes = map_pipeline_llm(layers, qwen_base, tied=False)
    assert sorted(state) == sorted(qwen_base) and ignored == ["layer_10:occupy.weight"]
    assert "qwen names" in notes[0] and "layers 5..6" in notes[0]
    assert PIPELINE_LLM_NAMES["qwen"][1].format(j=1) == "transformer.h.1."
    # A tied head may be absent; anything else missing, surplus, misshaped or non-contiguous is an error.
    no_head = {k: v for k, v in layers.items() if k != 8}
    assert "lm_head.weight" not in map_pipeline_llm(no_head, qwen_base, tied=True)[0]
    with pytest.raises(ValueError, match="1 missing.*lm_head.weight"):
        map_pipeline_llm(no_head, qwen_base, tied=False)
    with pytest.raises(ValueError, match="shape mismatch"):
        map_pipeline_llm({**layers, 7: {"final_layernorm.weight": torch.ones(5)}}, qwen_base, tied=False)
    with pytest.raises(ValueError, match="not contiguous"):
        map_pipeline_llm({**layers, 6: {}, 9: block}, qwen_base, tied=False)
    with pytest.raises(ValueError, match="unsupported LLM architecture.*Qwen2"):
        pipeline_llm_names({"gpt_neox.embed_in.weight": 0})


@pytest.fixture()
def pipeline_ckpt(tmp_path, tiny_llama_dir):
    """MPP layout: layer_00 = LAVIS-named vision + llm_proj + word embeddings, 1-4 identity, 5-6 LLaMA blocks,
    7 final norm, 8 lm_head, 9 loss, 10 the frozen-LLM dummy; the LLM trained (perturbed)."""
    from transformers import AutoModelForCausalLM

    shared_path("fixtures", "lavis-tiny")
    eva, blip2 = load_checkpoint(FIXTURE / "eva_vit.pth"), load_checkpoint(FIXTURE / "blip2.pth")
    llm = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    _perturb(llm, 6)
    proj = torch.nn.Linear(32, 64)
    layer0 = {f"visionpipe.visual_encoder.{k}": v for k, v in eva.items() if not k.startswith("blocks.3.")}
    layer0.update(
        {f"visionpipe.{k}": v for k, v in blip2.items() if k.startswith(("ln_vision.", "Qformer.", "query_tokens"))}
    )
    layer0.update(
        {
            "visionpipe.llm_proj.weight": proj.weight.detach().clone(),
            "visionpipe.llm_proj.bias": proj.bias.detach().clone(),
            "wtepipe.word_embeddings.weight": llm.model.embed_tokens.weight.detach().clone(),
        }
    )
    layers = {
        0: layer0,
        1: {},
        2: {},
        3: {},
        4: {},
        9: {},
        10: {"occupy.weight": torch.zeros(10, 10)},
        7: {"final_layernorm.weight": llm.model.norm.weight.detach().clone()},
        8: {"lm_head.weight": llm.lm_head.weight.detach().clone()},
    }
    for j, block in enumerate(llm.model.layers):
        layers[5 + j] = {f"layer.{k}": v.detach().clone() for k, v in block.state_dict().items()}
    ckpt = _save_dir(tmp_path / "pp", {f"layer_{i:02d}-model_states.pt": sd for i, sd in layers.items()})
    return ckpt, llm.eval(), proj


@pytest.mark.fidelity
def test_pipeline_to_model_dir(pipeline_ckpt, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    ckpt, llm, proj = pipeline_ckpt
    expected = load_file(FIXTURE / "expected.safetensors")
    written, report = convert_deepspeed(
        ckpt, tmp_path / "out", DeepSpeedConversion(llm=str(tiny_llama_dir), with_llm=True, heads=4, qformer_heads=4)
    )
    assert written == ["vision", "projector", "llm"]
    assert (
        "layer_10:occupy.weight" in report.ignored
        and "layer_00:visionpipe.Qformer.cls.predictions.bias" in report.ignored
    )
    loaded = MiniGPT.from_pretrained(tmp_path / "out").eval()
    assert loaded.config.template == "chatml" and loaded.config.freeze["llm"] is False
    with torch.no_grad():
        pixels = expected["pixel_values"]
        diffs = {
            "query_output": (loaded.vision(pixels) - expected["query_output"]).abs().max().item(),
            "projected": (loaded.encode_images(pixels) - F.linear(expected["query_output"], proj.weight, proj.bias))
            .abs()
            .max()
            .item(),
        }
        ids = torch.tensor([[1, 450, 4996, 17354, 1701]])
        diffs["llm_logits"] = (loaded.llm(input_ids=ids).logits - llm(input_ids=ids).logits).abs().max().item()
    print("pipeline max abs diffs:", diffs)
    assert diffs["query_output"] < 1e-4 and diffs["projected"] < 1e-4 and diffs["llm_logits"] == 0.0

    # Without --with-llm the block files are not read and the base LLM is referenced.
    written, report = convert_deepspeed(
        ckpt, tmp_path / "out2", DeepSpeedConversion(llm=str(tiny_llama_dir), heads=4, qformer_heads=4)
    )
    assert written == ["vision", "projector"] and "pass --with-llm" in str(report)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    again = MiniGPT.from_pretrained(tmp_path / "out2")
    assert all(torch.equal(again.llm.state_dict()[k], v) for k, v in base.state_dict().items())
    with pytest.raises(ValueError, match="needs the base LLM"):
        convert_deepspeed(ckpt, tmp_path / "out3")


# ---------------------------------------------------------------------------------------------- real DeepSpeed
def _ds_worker(rank: int, world: int, port: int, llm_dir: str, image: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
    )
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # no C++ JIT build of the shm comm op
    from minigpt.model.minigpt import MiniGPTConfig
    from minigpt.model.vision import VisionConfig

    torch.manual_seed(0)
    model = MiniGPT.build(MiniGPTConfig(llm=llm_dir, vision=VisionConfig.tiny(), template="vicuna0", max_txt_len=32))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**6,
    }
    deepspeed.init_distributed(dist_backend="gloo")
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    batch = MiniGPTProcessor.from_config(model.config).prepare([_conv()], [image])
    for _ in range(2):
        loss = engine(batch=batch).loss
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(out, tag="global_step2", client_state={"minigpt_config": model.config.to_dict()})
    if rank == 0:
        from safetensors.torch import save_file

        save_file(
            {k: v.detach().contiguous() for k, v in model.state_dict().items()},
            os.path.join(out, "reference.safetensors"),
        )


@pytest.mark.slow
def test_real_zero2_checkpoint(tiny_llama_dir, image_file, tmp_path):
    """2 CPU processes (gloo), ZeRO-2 with a torch AdamW, engine.save_checkpoint; ~25 s."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ds"
    mp.spawn(_ds_worker, args=(2, port, str(tiny_llama_dir), str(image_file), str(out)), nprocs=2)
    reference = load_file(out / "reference.safetensors")
    assert (out / "latest").read_text().strip() == "global_step2"
    for fp32 in (False, True):
        written, report = convert_deepspeed(out, tmp_path / f"model-{fp32}", DeepSpeedConversion(fp32=fp32))
        assert written == ["vision", "projector"], report
        loaded = MiniGPT.from_pretrained(tmp_path / f"model-{fp32}")
        _assert_same_weights(loaded, reference)
    assert json.loads((tmp_path / "model-True" / "config.json").read_text())["template"] == "vicuna0"


# ---------------------------------------------------------------------------------------------- our pipeline strategy
def _our_pipeline_run(model: MiniGPT, out: Path, step: int = 4, client_config: bool = True) -> Path:
    """What ``run.strategy: deepspeed_pipeline`` leaves in a training ``OUTPUT``: DeepSpeed's layer files
    (``PipelineModule.save_state_dict(exclude_frozen_params=True)`` of our real pipeline layers), its
    ``mp_rank_00_model_states.pt`` (module None + client state) and our ``checkpoints/step_N/state.pt``."""
    from minigpt.train.deepspeed.pipeline import pipeline_layers

    tag = f"global_step{step}"
    ds = out / "checkpoints" / "deepspeed"
    (ds / tag).mkdir(parents=True)
    (ds / "latest").write_text(tag)
    layers = [x for x in pipeline_layers(model, identity_layers=1)]
    for i, layer in enumerate(layers):
        if not isinstance(layer, torch.nn.Module):
            continue
        sd = layer.state_dict()
        for name, p in layer.named_parameters():
            if not p.requires_grad:
                del sd[name]
        torch.save({k: v.detach().clone() for k, v in sd.items()}, ds / tag / f"layer_{i:02d}-model_states.pt")
    extra = {"minigpt_config": model.config.to_dict()} if client_config else {}
    torch.save({**_model_states(model, None, stage=1), **extra}, ds / tag / "mp_rank_00_model_states.pt")
    step_dir = out / "checkpoints" / f"step_{step:08d}"
    step_dir.mkdir(parents=True)
    torch.save(
        {
            "step": step,
            "strategy": {
                "name": "deepspeed_pipeline",
                "deepspeed": {
                    "dir": "deepspeed",
                    "tag": tag,
                    "layout": {"mode": "deepspeed_pipeline", "processes": 1, "stages": 1},
                },
            },
        },
        step_dir / "state.pt",
    )
    return step_dir


def test_our_pipeline_trained_vision_and_mlp_projector(tiny_model_factory, image_file, tmp_path):
    """Layer 0 holds our own ``vision.*`` names (a trained ViT + Q-Former) and an mlp2x_gelu projector
    (``visionpipe.llm_proj.{0,2}.*``); the LLM trains too. The recorded minigpt_config is enough: no options."""
    src = tiny_model_factory(projector="mlp2x_gelu", freeze={"vision": False, "qformer": False, "llm": False})
    _perturb(src.vision, 7)
    _perturb(src.projector, 8)
    _perturb(src.llm, 9)
    step_dir = _our_pipeline_run(src, tmp_path / "run")
    layer0 = torch.load(step_dir.parent / "deepspeed" / "global_step4" / "layer_00-model_states.pt")
    assert {"visionpipe.llm_proj.0.weight", "visionpipe.llm_proj.2.bias"} <= set(layer0)
    assert any(k.startswith("vision.qformer.") for k in layer0)
    written, report = convert_deepspeed(tmp_path / "run" / "checkpoints" / "deepspeed", tmp_path / "out")
    assert "mlp2x_gelu projector" in str(report) and "trained tensor(s) from layer_00" in str(report)
    assert "as --with-llm" in str(report)
    loaded = MiniGPT.from_pretrained(tmp_path / "out")
    assert loaded.config.projector == "mlp2x_gelu" and loaded.config.template == "vicuna0"
    assert loaded.config.freeze == src.config.freeze
    _assert_same_weights(loaded, src.state_dict())
    assert torch.equal(_loss(loaded, image_file), _loss(src, image_file))
    # A projector of an unknown layout is refused.
    path = step_dir.parent / "deepspeed" / "global_step4" / "layer_00-model_states.pt"
    torch.save({**layer0, "visionpipe.llm_proj.4.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match="no projector of a known type"):
        convert_deepspeed(tmp_path / "run" / "checkpoints" / "deepspeed", tmp_path / "out2")


def test_our_pipeline_reads_the_recorded_config(tiny_model_factory, image_file, tmp_path):
    """Frozen vision and LLM (only projector files): the client state's minigpt_config gives llm, template and
    vision; without it --llm is needed, as for MPP's files."""
    src = tiny_model_factory()
    _perturb(src.projector, 10)
    vision_dir = save_vision(tmp_path / "vision", src.config.vision, src.vision.state_dict())
    src.config.vision_weights = str(vision_dir.resolve())
    _our_pipeline_run(src, tmp_path / "run")
    written, report = convert_deepspeed(tmp_path / "run" / "checkpoints" / "deepspeed", tmp_path / "out")
    assert written == ["projector"] and "linear projector" in str(report)
    loaded = MiniGPT.from_pretrained(tmp_path / "out")
    assert loaded.config.template == "vicuna0" and loaded.config.vision_weights == str(vision_dir.resolve())
    _assert_same_weights(loaded, src.state_dict())
    assert torch.equal(_loss(loaded, image_file), _loss(src, image_file))

    _our_pipeline_run(src, tmp_path / "bare", client_config=False)
    with pytest.raises(ValueError, match="needs the base LLM"):
        convert_deepspeed(tmp_path / "bare" / "checkpoints" / "deepspeed", tmp_path / "out2")
    written, _ = convert_deepspeed(
        tmp_path / "bare" / "checkpoints" / "deepspeed",
        tmp_path / "out2",
        DeepSpeedConversion(llm=src.config.llm, vision=str(vision_dir)),
    )
    assert MiniGPT.from_pretrained(tmp_path / "out2").config.template == "chatml"  # the MPP default


def test_training_output_and_step_folders_find_the_deepspeed_tag(tiny_model_factory, tmp_path):
    src = tiny_model_factory()
    _perturb(src.projector, 11)
    src.config.vision_weights = str(save_vision(tmp_path / "vision", src.config.vision, src.vision.state_dict()))
    step_dir = _our_pipeline_run(src, tmp_path / "run", step=4)
    ds = tmp_path / "run" / "checkpoints" / "deepspeed"
    # A newer DeepSpeed tag without its step folder (not committed) is not picked from OUTPUT or a step folder.
    (ds / "global_step6").mkdir()
    assert resolve_tag_dir(ds) == ds / "global_step4"  # 'latest'
    assert resolve_tag_dir(tmp_path / "run") == ds / "global_step4"
    assert resolve_tag_dir(step_dir) == ds / "global_step4"
    assert resolve_tag_dir(tmp_path / "run", tag="global_step6") == ds / "global_step6"
    written, _ = convert_deepspeed(tmp_path / "run", tmp_path / "out")
    assert written == ["projector"]
    _assert_same_weights(MiniGPT.from_pretrained(tmp_path / "out"), src.state_dict())
    written, _ = convert_deepspeed(step_dir, tmp_path / "out2")
    assert written == ["projector"]
    # A step folder of another strategy has no DeepSpeed files; a missing tag folder is reported.
    torch.save({"step": 2, "strategy": {"name": "single"}}, tmp_path / "state.pt")
    with pytest.raises(ValueError, match="not written by a DeepSpeed strategy"):
        resolve_tag_dir(tmp_path)
    shutil.rmtree(ds / "global_step4")
    with pytest.raises(FileNotFoundError, match="DeepSpeed files .* are missing"):
        resolve_tag_dir(step_dir)
