"""DeepSpeed strategies on CPU (gloo): ZeRO-2/3 and the MPP-style pipeline give the single-process results.

In-process runs use one process (DeepSpeed over a one-process gloo group); the two-process runs go through torchrun.
No DeepSpeed C++ op is compiled: our AdamW is passed to deepspeed.initialize and the shm all-reduce op is skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("deepspeed")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from minigpt.train.config import ConfigError, validate_config  # noqa: E402
from minigpt.train.launch import train  # noqa: E402
from minigpt.train.loop import build_optimizer  # noqa: E402
from test_train_support import losses, make_shapes, read_metrics, tiny_config, torchrun  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _cpu_accelerator():
    """These tests train on the CPU even where DeepSpeed picked a GPU accelerator (a model loaded earlier in the
    session imports deepspeed through accelerate)."""
    from deepspeed.accelerator import get_accelerator, set_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    before = get_accelerator()
    if before.device_name() != "cpu":
        set_accelerator(CPU_Accelerator())
    yield
    if before.device_name() != "cpu":
        set_accelerator(before)


def _config(llm_dir: Path, data: Path, out: Path, strategy: str = "single", **run) -> dict:
    """Projector + LLM train (tiny LLaMA, no dropout), clipping on, eval every 2 steps; 4 steps of 4 samples."""
    eval_json = data.parent / "eval.json"
    return tiny_config(
        llm_dir,
        data,
        out,
        model={"freeze": {"llm": False}},
        data={"eval": [{"format": "captions_json", "path": str(eval_json)}]},
        run={
            "epochs": 1,
            "batch_size": 2,
            "grad_accum": 2,
            "save_every": 2,
            "eval_every": 2,
            "max_grad_norm": 0.5,
            "optimizer": {"lr": 1e-3, "weight_decay": 0.05},
            "strategy": strategy,
            **run,
        },
    )


def _with(config: dict, **run) -> dict:
    out = {k: dict(v) for k, v in config.items()}
    out["run"].update(run)
    return out


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, 5, seed=1, name="eval")  # odd: two data-parallel ranks get 3 and 2
    return make_shapes(root, 16)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shapes, tiny_llama_dir):
    """One process, no DeepSpeed: the losses and weights every strategy must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "single"
    return train(validate_config(_config(tiny_llama_dir, shapes, out))), out


def _evals(records: list[dict]) -> list[float]:
    return [r["eval_loss"] for r in records if "eval_loss" in r]


def _final(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted((out / "final").rglob("*.safetensors")):
        tensors.update({f"{path.parent.name}/{path.stem}.{k}": v for k, v in load_file(path).items()})
    return tensors


def _assert_same_final(a: Path, b: Path, atol: float = 1e-5) -> None:
    x, y = _final(a), _final(b)
    assert x.keys() == y.keys() and x
    for name in x:
        torch.testing.assert_close(x[name].float(), y[name].float(), rtol=0, atol=atol, msg=name)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------- config


def test_deepspeed_config_follows_the_run(tmp_path, tiny_llama_dir, shapes):
    from minigpt.train.deepspeed.config import deepspeed_config

    run = validate_config(_config(tiny_llama_dir, shapes, tmp_path, "deepspeed_zero")).run
    cfg = deepspeed_config(run, 4, torch.bfloat16)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == (
        2,
        2,
        16,
    )
    assert cfg["gradient_clipping"] == 0.5 and cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert cfg["zero_optimization"]["stage"] == 2
    assert deepspeed_config(run, 1, None, pipeline=True)["zero_optimization"]["stage"] == 1

    json_file = tmp_path / "ds.json"
    json_file.write_text(
        '{"train_batch_size": "auto", "zero_optimization": {"stage": 3, "overlap_comm": true},'
        ' "bf16": {"enabled": "auto"}}'
    )
    run = validate_config(
        _with(_config(tiny_llama_dir, shapes, tmp_path, "deepspeed_zero"), deepspeed={"config": str(json_file)})
    ).run
    cfg = deepspeed_config(run, 2, torch.float16)
    assert cfg["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert cfg["fp16"]["enabled"] and not cfg["bf16"]["enabled"] and cfg["train_batch_size"] == 8
    with pytest.raises(ValueError, match="pipelines allow ZeRO stage 0 or 1"):
        deepspeed_config(run, 2, None, pipeline=True)
    for text, match in (
        ('{"gradient_accumulation_steps": 4}', "gradient_accumulation_steps is 4.*gives 2"),
        ('{"optimizer": {"type": "AdamW"}}', "remove 'optimizer'"),
        ('{"bf16": {"enabled": true}}', "bf16.enabled is True.*gives fp32"),
    ):
        json_file.write_text(text)
        with pytest.raises(ValueError, match=match):
            deepspeed_config(run, 2, None)
    with pytest.raises(ConfigError, match="partition_method"):
        validate_config(_with(_config(tiny_llama_dir, shapes, tmp_path), deepspeed={"partition_method": "layers"}))


def test_weight_decay_groups_use_the_zero3_shape():
    layer = torch.nn.Linear(3, 2)
    layer.weight.data = torch.empty(0)  # as ZeRO-3 leaves a partitioned parameter
    layer.weight.ds_shape = torch.Size([2, 3])
    decay, no_decay = build_optimizer(
        layer,
        validate_config(
            {
                "model": {"llm": "x", "vision": "tiny"},
                "data": {"datasets": [{"format": "llava", "path": "x"}]},
                "run": {},
            }
        ).run.optimizer,
    ).param_groups
    assert decay["params"] == [layer.weight] and no_decay["params"] == [layer.bias]


# ---------------------------------------------------------------------------------------------- pipeline layers


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_pipeline_layers_compute_minigpt_forward(arch, tiny_pair_factory, tiny_qwen_dir, image_file):
    """Head, identities, one layer per LLM block and the tail, run one after the other, give MiniGPT.forward's
    loss and gradients (fp32, one process, no DeepSpeed); the layers' state-dict keys are the ones the DeepSpeed
    converter reads (MPP-Qwen14B's names)."""
    from PIL import Image

    from minigpt.data.conversation import Conversation
    from minigpt.train.deepspeed.pipeline import AnswerLoss, PipeBlock, PipeHead, PipeTail, pipe_batch, pipeline_layers

    extra = {"llm": str(tiny_qwen_dir), "template": "chatml"} if arch == "qwen2" else {}
    model, processor = tiny_pair_factory(freeze={"llm": False}, **extra)
    model.train()
    convs = [
        Conversation.single("<Img><ImageHere></Img> What colour is it?", "It is red."),
        Conversation.single("Say hello.", "Hello there, friend."),  # text only
        Conversation.single("<Img><ImageHere></Img> And this one?", "Green."),
    ]
    batch = processor.prepare(convs, [image_file, Image.new("RGB", (30, 30), (20, 200, 20))])
    tokens = int((batch.text.labels[:, 1:] != -100).sum())

    ref = model(batch=batch).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    layers = pipeline_layers(model, identity_layers=2)
    assert [type(x).__name__ for x in layers] == ["PipeHead", "function", "function"] + ["PipeBlock"] * 2 + ["PipeTail"]
    inputs, labels = pipe_batch(batch, 1.0 / tokens, model.config.vision.image_size)
    x = inputs
    for layer in layers:
        x = layer(x)
    loss = AnswerLoss(model)(x, labels)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-5, atol=1e-6, msg=name)

    head, block, tail = layers[0], layers[3], layers[-1]
    assert isinstance(head, PipeHead) and isinstance(block, PipeBlock) and isinstance(tail, PipeTail)
    assert {k for k in head.state_dict() if not k.startswith("vision.")} == {
        "visionpipe.llm_proj.weight",
        "visionpipe.llm_proj.bias",
        "wtepipe.word_embeddings.weight",
    }
    assert all(k.startswith("layer.") for k in block.state_dict())
    assert set(tail.state_dict()) == {"final_layernorm.weight", "lm_head.weight"}
    model.apply_freeze({"vision": True, "qformer": True})
    head.train()
    assert (
        not model.vision.vision_model.training and not model.vision.qformer.training
    )  # frozen parts stay in eval mode whatever DeepSpeed calls train() on


# ---------------------------------------------------------------------------------------------- one process


def test_one_process_zero_and_pipeline_reproduce_single(tmp_path, reference, shapes, tiny_llama_dir):
    ref, ref_out = reference
    for strategy, extra in (("deepspeed_zero", {}), ("deepspeed_pipeline", {"deepspeed": {"identity_layers": 1}})):
        out = tmp_path / strategy
        result = train(validate_config(_config(tiny_llama_dir, shapes, out, strategy, **extra)))
        assert losses(result.history) == pytest.approx(losses(ref.history), rel=1e-6)
        assert _evals(result.history) == pytest.approx(_evals(ref.history), rel=1e-6)
        _assert_same_final(out, ref_out)
        ckpt = out / "checkpoints"
        assert _files(ckpt) == ["deepspeed", "step_00000002", "step_00000004"]
        assert (ckpt / "deepspeed" / "latest").read_text().strip() == "global_step4"
        tag = ckpt / "deepspeed" / "global_step4"
        if strategy == "deepspeed_zero":
            assert _files(tag) == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
            grad_norms = [r["grad_norm"] for r in result.history if "loss" in r]
            assert grad_norms == pytest.approx([r["grad_norm"] for r in ref.history if "loss" in r], rel=1e-4)
        else:  # layer 1 is an identity: no file
            assert _files(tag) == [
                "layer_00-model_states.pt",
                "layer_02-model_states.pt",
                "layer_03-model_states.pt",
                "layer_04-model_states.pt",
                "mp_rank_00_model_states.pt",
                "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            ]
        weights = load_file(ckpt / "step_00000004" / "trainable.safetensors")
        assert set(weights) == {n for n, p in result.model.named_parameters() if p.requires_grad}
        state = torch.load(ckpt / "step_00000004" / "state.pt", weights_only=True)
        assert state["strategy"]["deepspeed"]["tag"] == "global_step4" and state["optimizer"] == {}
        client = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)
        assert client["minigpt_config"]["llm"] == str(tiny_llama_dir)


def test_converter_reads_what_the_strategies_write(tmp_path, reference, shapes, tiny_llama_dir):
    """``minigpt convert deepspeed`` on the DeepSpeed files of a ZeRO-2 and of a pipeline run gives the final
    weights (the random tiny vision encoder has no source: it is given with --vision)."""
    from minigpt.convert.deepspeed import DeepSpeedConversion, convert_deepspeed
    from minigpt.convert.lavis import save_vision
    from minigpt.model.minigpt import MiniGPT

    ref, ref_out = reference
    vision = save_vision(tmp_path / "vision", ref.model.config.vision, ref.model.vision.state_dict())
    for strategy, kwargs in (
        ("deepspeed_zero", {}),
        ("deepspeed_pipeline", {"with_llm": True, "config": ref_out / "final"}),
    ):
        out = tmp_path / strategy
        train(validate_config(_with(_config(tiny_llama_dir, shapes, out, strategy), eval_every=0, save_every=4)))
        written, _ = convert_deepspeed(
            out / "checkpoints" / "deepspeed",
            tmp_path / f"{strategy}-model",
            DeepSpeedConversion(vision=str(vision), **kwargs),
        )
        assert written == ["projector", "llm"]
        converted = MiniGPT.from_pretrained(tmp_path / f"{strategy}-model")
        final = MiniGPT.from_pretrained(out / "final")
        for (name, a), (_, b) in zip(converted.named_parameters(), final.named_parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("strategy", ["deepspeed_zero", "deepspeed_pipeline"])
def test_resume_is_exact_and_old_deepspeed_tags_go(strategy, tmp_path, shapes, tiny_llama_dir):
    config = _with(
        _config(tiny_llama_dir, shapes, tmp_path / "full", strategy),
        amp="bf16",
        keep_last=1,
        save_every=1,
        eval_every=0,
    )
    full = train(validate_config(config))
    ckpt = tmp_path / "full" / "checkpoints"
    assert _files(ckpt) == ["deepspeed", "step_00000004"]
    assert sorted(p.name for p in (ckpt / "deepspeed").glob("global_step*")) == ["global_step4"]

    config = _with(config, keep_last=4, output_dir=str(tmp_path / "cut"))
    cut = tmp_path / "cut"
    train(validate_config(config))
    for step in (3, 4):  # as if killed after step 2
        shutil.rmtree(cut / "checkpoints" / f"step_{step:08d}")
        shutil.rmtree(cut / "checkpoints" / "deepspeed" / f"global_step{step}")
    shutil.rmtree(cut / "final")
    with pytest.raises(ValueError, match="optimizer state is in DeepSpeed's files"):
        train(validate_config(_with(config, strategy="single")))
    resumed = train(validate_config(config))
    assert [r["step"] for r in resumed.history if "loss" in r] == [3, 4]
    assert losses(resumed.history) == losses(full.history)[2:]  # bf16, fp32 masters and moments restored: exact
    _assert_same_final(cut, tmp_path / "full", atol=0)


def test_zero3_with_zero_init_reproduces_single(tmp_path, reference, shapes, tiny_llama_dir):
    ref, ref_out = reference
    out = tmp_path / "zero3"
    result = train(
        validate_config(
            _config(tiny_llama_dir, shapes, out, "deepspeed_zero", deepspeed={"zero_stage": 3, "zero_init": True})
        )
    )
    assert losses(result.history) == pytest.approx(losses(ref.history), rel=1e-6)
    assert _evals(result.history) == pytest.approx(_evals(ref.history), rel=1e-6)
    _assert_same_final(out, ref_out)  # gathered from the partitions into a CPU copy
    assert _files(out / "checkpoints" / "deepspeed" / "global_step4") == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    ]


def _bf16_zero3(llm_dir: Path, data: Path, out: Path, zero_init: bool, **run) -> dict:
    """ZeRO-3 in bf16 as configs/mpp_sft_zero2.yaml's header suggests (LLM and vision encoder stored in bf16)."""
    config = _config(
        llm_dir, data, out, "deepspeed_zero", amp="bf16", deepspeed={"zero_stage": 3, "zero_init": zero_init}, **run
    )
    config["model"].update(llm_dtype="bfloat16", vision_dtype="bfloat16")
    return config


@pytest.fixture(scope="module")
def bf16_zero3(tmp_path_factory, shapes, tiny_llama_dir):
    """One process, ZeRO-3 in bf16 without zero_init (DeepSpeed casts the whole model itself)."""
    out = tmp_path_factory.mktemp("bf16") / "zero3"
    return train(validate_config(_bf16_zero3(tiny_llama_dir, shapes, out, zero_init=False))), out


def test_zero3_zero_init_in_bf16_equals_zero3_without(tmp_path, bf16_zero3, shapes, tiny_llama_dir):
    """zero_init under bf16 stopped in DeepSpeed's ZeRO-3 optimizer on a bare AssertionError (the float32 projector
    next to the bf16 LLM built by zero.Init); now it trains exactly as ZeRO-3 without zero_init."""
    plain, plain_out = bf16_zero3
    out = tmp_path / "zero3-init"
    result = train(validate_config(_bf16_zero3(tiny_llama_dir, shapes, out, zero_init=True)))
    assert losses(result.history) == losses(plain.history) and len(losses(plain.history)) == 4
    assert _evals(result.history) == _evals(plain.history)
    _assert_same_final(out, plain_out, atol=0)


# ---------------------------------------------------------------------------------------------- two processes


def _torchrun(config: dict, path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return torchrun(config, path, *overrides, DS_ACCELERATOR="cpu")


def test_two_process_zero2_matches_single(tmp_path, reference, shapes, tiny_llama_dir):
    """Two data-parallel ZeRO-2 processes with half the accumulation see the single process's global batch."""
    ref, ref_out = reference
    out = tmp_path / "zero2"
    _torchrun(_config(tiny_llama_dir, shapes, out, "deepspeed_zero", grad_accum=1), tmp_path / "zero2.yaml")
    records = read_metrics(out)
    assert losses(records) == pytest.approx(losses(ref.history), rel=1e-5)
    assert _evals(records) == pytest.approx(_evals(ref.history), rel=1e-5)
    assert [r["samples"] for r in records if "loss" in r] == [4] * 4
    _assert_same_final(out, ref_out)
    assert _files(out / "checkpoints" / "deepspeed" / "global_step4") == [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]


@pytest.mark.slow  # ~55 s
def test_two_process_zero3_zero_init_in_bf16(tmp_path, bf16_zero3, shapes, tiny_llama_dir):
    """The combination the mpp_sft_zero2.yaml header suggests, as it runs: two processes, ZeRO-3, zero_init, bf16.
    Two data-parallel processes with half the accumulation reproduce the one-process bf16 run (to bf16 rounding:
    the gradients are summed in another order)."""
    plain, plain_out = bf16_zero3
    out = tmp_path / "zero3"
    _torchrun(_bf16_zero3(tiny_llama_dir, shapes, out, zero_init=True, grad_accum=1), tmp_path / "zero3.yaml")
    records = read_metrics(out)
    assert losses(records) == pytest.approx(losses(plain.history), rel=2e-2)
    assert _evals(records) == pytest.approx(_evals(plain.history), rel=2e-2)
    _assert_same_final(out, plain_out, atol=2e-2)


def test_two_stage_pipeline_matches_single(tmp_path, reference, shapes, tiny_llama_dir):
    """Two pipeline stages (gloo): the LLM's two blocks split over two processes; same losses, eval losses, grad
    norms (clipping over both stages) and final weights as one process."""
    ref, ref_out = reference
    out = tmp_path / "pipe"
    _torchrun(
        _config(tiny_llama_dir, shapes, out, "deepspeed_pipeline", deepspeed={"pipeline_stages": 2}),
        tmp_path / "pipe.yaml",
    )
    records = read_metrics(out)
    assert losses(records) == pytest.approx(losses(ref.history), rel=1e-5)
    assert _evals(records) == pytest.approx(_evals(ref.history), rel=1e-5)
    assert [r["grad_norm"] for r in records if "loss" in r] == pytest.approx(
        [r["grad_norm"] for r in ref.history if "loss" in r], rel=1e-4
    )
    _assert_same_final(out, ref_out)
    assert _files(out / "checkpoints" / "deepspeed" / "global_step4") == [
        "layer_00-model_states.pt",
        "layer_01-model_states.pt",
        "layer_02-model_states.pt",
        "layer_03-model_states.pt",
        "mp_rank_00_model_states.pt",
        "mp_rank_01_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_0_mp_rank_01_optim_states.pt",
    ]


def test_two_stage_pipeline_with_a_frozen_llm_matches_single(tmp_path, shapes, tiny_llama_dir):
    """MPP-Qwen14B's first stage: only the projector trains, so stage 1 holds no trained parameter (it gets an
    ``occupy`` layer that stays 0); identity layers as in MPP; only trained parameters reach the layer files."""
    config = _with(_config(tiny_llama_dir, shapes, tmp_path / "single"), eval_every=0, max_grad_norm=None)
    config["model"]["freeze"] = {"llm": True}
    single = train(validate_config(config))
    out = tmp_path / "pipe"
    config = _with(
        config,
        strategy="deepspeed_pipeline",
        output_dir=str(out),
        deepspeed={"pipeline_stages": 2, "identity_layers": 4, "partition_method": "uniform"},
    )
    _torchrun(config, tmp_path / "pipe.yaml")
    assert losses(read_metrics(out)) == pytest.approx(losses(single.history), rel=1e-5)
    _assert_same_final(out, tmp_path / "single")
    tag = out / "checkpoints" / "deepspeed" / "global_step4"
    layer0 = torch.load(tag / "layer_00-model_states.pt", weights_only=True)
    assert set(layer0) == {"visionpipe.llm_proj.weight", "visionpipe.llm_proj.bias"}
    assert torch.load(tag / "layer_05-model_states.pt", weights_only=True) == {}  # a frozen block
    occupy = torch.load(tag / "layer_07-model_states.pt", weights_only=True)  # stage 1's tail
    assert set(occupy) == {"occupy.weight", "occupy.bias"} and not any(v.any() for v in occupy.values())


# ---------------------------------------------------------------------------------------------- modules


def _train_imports() -> dict[str, set[str]]:
    """minigpt.train's modules -> the minigpt.train modules they import (anywhere in the file, lazily too)."""
    import ast

    root = REPO / "src"
    files = {
        ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (root / "minigpt" / "train").rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if node.level else ""
                module = ".".join(x for x in (base, node.module or "") if x)
                targets |= {f"{module}.{a.name}" if f"{module}.{a.name}" in files else module for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def test_no_import_cycle_in_train():
    """The strategy does not choose the trainer (train/launch.py does): strategy, the DeepSpeed modules and the
    loop import one another one way only, lazy imports included."""
    graph = _train_imports()
    assert "minigpt.train.loop" in graph["minigpt.train.deepspeed.trainer"]
    assert "minigpt.train.deepspeed.trainer" in graph["minigpt.train.launch"]
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != "open", " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


# ---------------------------------------------------------------------------------------------- recipes


def test_shipped_deepspeed_recipes(monkeypatch):
    """configs/mpp_sft_zero2.yaml and configs/mpp_pipeline.yaml validate and give REFERENCE 8's values; the JSONs
    they name (paths relative to the repository) map onto DeepSpeed configs."""
    from minigpt.train.config import load_config
    from minigpt.train.deepspeed.config import deepspeed_config

    monkeypatch.chdir(REPO)
    zero = load_config("configs/mpp_sft_zero2.yaml").run
    cfg = deepspeed_config(zero, 8, torch.bfloat16)
    assert zero.strategy == "deepspeed_zero" and cfg["zero_optimization"]["stage"] == 2 and cfg["bf16"]["enabled"]
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["train_batch_size"], zero.optimizer.lr) == (1, 128, 2e-5)
    zero3 = validate_config(
        _with(
            load_config("configs/mpp_sft_zero2.yaml").to_dict(),
            deepspeed={"config": "configs/ds_zero3.json", "zero_init": True},
        )
    ).run
    assert deepspeed_config(zero3, 8, torch.bfloat16)["zero_optimization"]["stage"] == 3

    config = load_config("configs/mpp_pipeline.yaml")
    run = config.run
    section = run.deepspeed
    assert (run.strategy, section.pipeline_stages, section.partition_method, section.identity_layers) == (
        "deepspeed_pipeline",
        6,
        "uniform",
        4,
    )
    assert (run.batch_size, run.optimizer.lr, run.amp, config.model.max_txt_len) == (1, 2e-5, "bf16", 512)
    cfg = deepspeed_config(run, 1, torch.bfloat16, pipeline=True)
    assert cfg["zero_optimization"] == {"stage": 1, "offload_optimizer": {"device": "cpu", "pin_memory": True}}
    assert cfg["pipeline"] == {"activation_checkpoint_interval": 1, "use_reentrant": False}


@pytest.mark.slow
def test_pipeline_with_cpu_offload_and_activation_checkpointing(tmp_path, reference, shapes, tiny_llama_dir):
    """configs/ds_pipeline_offload.json (ZeRO-1, optimizer on the CPU: DeepSpeed's CPU Adam, whose C++ op compiles
    on first use, ~40-70 s) with activation checkpointing gives the single-process losses."""
    ref, ref_out = reference
    out = tmp_path / "offload"
    result = train(
        validate_config(
            _config(
                tiny_llama_dir,
                shapes,
                out,
                "deepspeed_pipeline",
                grad_checkpointing=True,
                deepspeed={"config": str(REPO / "configs" / "ds_pipeline_offload.json")},
            )
        )
    )
    assert losses(result.history) == pytest.approx(losses(ref.history), rel=1e-6)
    _assert_same_final(out, ref_out)
