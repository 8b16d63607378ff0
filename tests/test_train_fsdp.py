"""FSDP2 (``run.strategy: fsdp``) on CPU: two gloo processes (torchrun) give the result of one process with twice
the accumulation, resume exactly from their per-process shards, and write the model directory other strategies do."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from minigpt.train.config import ConfigError, validate_config
from minigpt.train.launch import train
from test_train_support import losses, make_shapes, read_metrics, tiny_config, torchrun


def _config(llm_dir, train_json, eval_json, out, **run):
    """Projector + LLM train (tiny LLaMA, no dropout), clipping on, eval every 3 steps; 6 steps of 4 samples."""
    return tiny_config(
        llm_dir,
        train_json,
        out,
        model={"freeze": {"llm": False}},
        data={"eval": [{"format": "captions_json", "path": str(eval_json)}]},
        run={
            "epochs": 1,
            "batch_size": 2,
            "grad_accum": 2,
            "save_every": 2,
            "eval_every": 3,
            "keep_last": 5,
            "max_grad_norm": 0.5,
            "optimizer": {"lr": 1e-3, "weight_decay": 0.05},
            "schedule": {"name": "linear_warmup_cosine", "warmup_steps": 2, "warmup_lr": 1e-4, "min_lr": 1e-4},
            **run,
        },
    )


def _evals(records):
    return [r["eval_loss"] for r in records if "eval_loss" in r]


def test_two_process_fsdp_matches_one_process_and_resumes_exactly(tmp_path, tiny_llama_dir):
    train_json = make_shapes(tmp_path / "data", 24)
    eval_json = make_shapes(tmp_path / "data", 5, seed=1, name="eval")  # odd: the ranks get 3 and 2 (2 and 1 batches)
    config = _config(tiny_llama_dir, train_json, eval_json, tmp_path / "single")
    single = train(validate_config(config))

    out = tmp_path / "fsdp"
    done = torchrun(config, tmp_path / "fsdp.yaml", f"run.output_dir={out}", "run.grad_accum=1", "run.strategy=fsdp")
    assert (
        "2 processes" in done.stderr and "FSDP over 2 processes: 2 decoder layers + root, vision whole" in done.stderr
    )
    records = read_metrics(out)
    assert len(losses(records)) == len(losses(single.history)) == 6
    assert losses(records) == pytest.approx(losses(single.history), rel=1e-5)
    grad_norms = [[r["grad_norm"] for r in rs if "loss" in r] for rs in (records, single.history)]
    assert grad_norms[0] == pytest.approx(grad_norms[1], rel=1e-4)  # the norm of the sharded gradients, whole
    print(f"losses to {_rel(losses(records), losses(single.history)):.1e}, norms to {_rel(*grad_norms):.1e}")
    assert len(_evals(records)) == 2 and _evals(records) == pytest.approx(_evals(single.history), rel=1e-5)

    final = load_file(out / "final" / "projector.safetensors")  # gathered on rank 0 into a whole CPU copy
    for name, tensor in single.model.projector.state_dict().items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=1e-5)
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(out / "final" / "llm")
    for (name, a), (_, b) in zip(llm.named_parameters(), single.model.llm.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)
    worst = max((a - b).abs().max().item() for a, b in zip(llm.parameters(), single.model.llm.parameters()))
    print(f"final LLM weights to {worst:.1e} absolute")

    ckpt = out / "checkpoints"
    assert sorted(p.name for p in (ckpt / "fsdp").iterdir()) == ["step_00000002", "step_00000004", "step_00000006"]
    assert sorted(p.name for p in (ckpt / "fsdp" / "step_00000004").iterdir()) == [
        "rank_00000-of-00002.pt",
        "rank_00001-of-00002.pt",
    ]
    whole = (ckpt / "step_00000004" / "trainable.safetensors").stat().st_size
    shards = [f.stat().st_size / whole for f in sorted((ckpt / "fsdp" / "step_00000004").iterdir())]
    print("shard files / trainable.safetensors:", ", ".join(f"{r:.2f}" for r in shards))
    gathered = load_file(ckpt / "step_00000006" / "trainable.safetensors")  # whole, for people and tools
    torch.testing.assert_close(gathered["projector.weight"], final["weight"], rtol=0, atol=0)

    shutil.rmtree(ckpt / "step_00000006")  # as if killed after step 4
    shutil.rmtree(out / "final")
    with pytest.raises(ValueError, match="written by 2 processes, this run has 1"):
        single_process_fsdp(config, out)
    with pytest.raises(ValueError, match="optimizer state is in FSDP's per-process shards"):
        train(validate_config({**config, "run": dict(config["run"], output_dir=str(out))}))  # run.strategy auto
    done = torchrun(config, tmp_path / "fsdp.yaml", f"run.output_dir={out}", "run.grad_accum=1", "run.strategy=fsdp")
    assert (
        "at step 4" in done.stderr and "rank_00000-of-00002.pt" in done.stderr
    )  # rank 0 logs (other ranks: warnings only)
    resumed = read_metrics(out)
    assert [r["step"] for r in resumed if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert losses(resumed) == losses(records)  # every process's shards of weights and moments: exact
    assert sorted(p.name for p in (ckpt / "fsdp").iterdir()) == ["step_00000002", "step_00000004", "step_00000006"]


def _rel(a, b):
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def single_process_fsdp(config, out, **run):
    """FSDP in this process over a one-process gloo group (``run``: changes to the run section)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        run = dict(config["run"], strategy="fsdp", output_dir=str(out), **run)
        return train(validate_config({**config, "run": run}))


def test_frozen_llm_in_the_groups_and_cpu_offload(tmp_path, tiny_llama_dir):
    """Projector-only training: the frozen LLM's layers and embeddings are sharded beside the trained projector
    (one group: the root), the frozen vision encoder stays whole; CPU offload and unsharded layers between forward
    and backward change nothing in the numbers."""
    train_json = make_shapes(tmp_path / "data", 16)
    eval_json = make_shapes(tmp_path / "data", 3, seed=1, name="eval")
    config = _config(tiny_llama_dir, train_json, eval_json, tmp_path / "single")
    config["model"]["freeze"] = {"llm": True}
    single = train(validate_config(config))
    readme = (Path(__file__).parents[1] / "README.md").read_text().split("### PyTorch FSDP\n")[1]
    example = yaml.safe_load(readme.split("```yaml\n")[1].split("```")[0])["run"]  # the README's example
    assert example == {"strategy": "fsdp", "fsdp": {"cpu_offload": True, "reshard_after_forward": False}}
    command = readme.split("```bash\n")[1].split("```")[0].split()
    assert command[:2] == ["torchrun", "--nproc_per_node"] and command[3:] == [
        "-m",
        "minigpt.cli",
        "train",
        "CONFIG",
        "run.strategy=fsdp",
    ]  # as test_train_support.torchrun runs it (the two-process test)
    fsdp = single_process_fsdp(config, tmp_path / "fsdp", fsdp=example["fsdp"])
    assert losses(fsdp.history) == pytest.approx(losses(single.history), rel=1e-6)
    print(f"projector-only, CPU offload: losses to {_rel(losses(fsdp.history), losses(single.history)):.1e}")
    assert _evals(fsdp.history) == pytest.approx(_evals(single.history), rel=1e-6)
    assert sorted(p.name for p in (tmp_path / "fsdp" / "final").iterdir()) == sorted(
        p.name for p in (tmp_path / "single" / "final").iterdir()
    )  # the projector alone (the frozen LLM is recorded by its source)
    final = load_file(tmp_path / "fsdp" / "final" / "projector.safetensors")
    for name, tensor in single.model.projector.state_dict().items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": {"lora": {"r": 4}}}, "model.lora with run.strategy fsdp is not supported"),
        ({"run": {"amp": "fp16"}}, "fsdp trains in bf16 or fp32"),
        ({"run": {"eval_task": {"task": "caption", "data": "x.json"}}}, "run.eval_task generates on the main"),
    ],
)
def test_what_fsdp_refuses(tmp_path, change, message):
    config = tiny_config(tmp_path / "llm", tmp_path / "train.json", tmp_path / "out", run={"strategy": "fsdp"})
    for section, values in change.items():
        config[section].update(values)
    with pytest.raises((ConfigError, ValueError), match=message):
        validate_config(config)


def test_planner_models_fsdp_beside_zero(tmp_path, tiny_llama_dir):
    from minigpt.train.memory.planner import job_from_config, plan_training

    config = tiny_config(tiny_llama_dir, tmp_path / "train.json", tmp_path / "out", model={"freeze": {"llm": False}})
    plans = {}
    for strategy in ("ddp", "fsdp", "deepspeed_zero"):
        run = dict(config["run"], strategy=strategy, fsdp={"cpu_offload": False}, deepspeed={"zero_stage": 3})
        job = job_from_config(validate_config({**config, "run": run}), False, 2)
        plans[strategy] = {r.part: r for r in plan_training(job).rows}
    ddp, fsdp, zero3 = plans["ddp"], plans["fsdp"], plans["deepspeed_zero"]
    assert fsdp["weights: LLM"].bytes == zero3["weights: LLM"].bytes == ddp["weights: LLM"].bytes / 2
    assert "FSDP / 2" in fsdp["weights: LLM"].note
    assert fsdp["gradients"].bytes == zero3["gradients"].bytes == ddp["gradients"].bytes / 2
    # fp32 parameters: two fp32 moments (8 bytes) per parameter, halved; ZeRO adds a master copy (12 bytes)
    assert fsdp["optimizer state"].bytes == ddp["optimizer state"].bytes / 2 == zero3["optimizer state"].bytes * 8 / 12
    assert "gathered decoder layers" in fsdp["ZeRO buffers"].note and "ZeRO buffers" not in ddp


def test_gradient_checkpointing_inside_the_sharded_layers(tmp_path, tiny_llama_dir):
    train_json = make_shapes(tmp_path / "data", 8)
    eval_json = make_shapes(tmp_path / "data", 2, seed=1, name="eval")
    config = _config(tiny_llama_dir, train_json, eval_json, tmp_path / "single", grad_checkpointing=True)
    single = train(validate_config(config))
    fsdp = single_process_fsdp(config, tmp_path / "fsdp")
    assert len(losses(single.history)) == 2
    assert losses(fsdp.history) == pytest.approx(losses(single.history), rel=1e-6)
