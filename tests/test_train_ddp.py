"""DDP: two gloo processes on CPU (torchrun) give the result of one process with twice the accumulation."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from minigpt.train.config import validate_config
from minigpt.train.launch import train
from test_train_support import losses, make_shapes, read_metrics, tiny_config, torchrun


def test_two_process_ddp_matches_one_process_with_double_accumulation(tmp_path, tiny_llama_dir):
    train_json = make_shapes(tmp_path / "data", 24)
    eval_json = make_shapes(tmp_path / "data", 5, seed=1, name="eval")  # odd: the ranks get 3 and 2
    config = tiny_config(
        tiny_llama_dir,
        train_json,
        tmp_path / "single",
        model={"freeze": {"llm": False}},  # projector + LLM train (no dropout anywhere)
        data={"eval": [{"format": "captions_json", "path": str(eval_json)}]},
        run={
            "epochs": 2,
            "batch_size": 2,
            "grad_accum": 2,
            "save_every": 4,
            "eval_every": 3,
            "optimizer": {"lr": 1e-3, "weight_decay": 0.05},
            "schedule": {"name": "linear_warmup_cosine", "warmup_steps": 2, "warmup_lr": 1e-4, "min_lr": 1e-4},
        },
    )
    single = train(validate_config(config))

    done = torchrun(config, tmp_path / "ddp.yaml", f"run.output_dir={tmp_path / 'ddp'}", "run.grad_accum=1")
    assert "2 processes" in done.stderr

    records = read_metrics(tmp_path / "ddp")  # rank 0 alone writes
    ddp_losses, single_losses = losses(records), losses(single.history)
    assert len(ddp_losses) == len(single_losses) == 12
    assert ddp_losses == pytest.approx(single_losses, rel=1e-5)
    assert [r["samples"] for r in records if "loss" in r] == [4] * 12  # a step sees the global batch
    ddp_evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    single_evals = [r["eval_loss"] for r in single.history if "eval_loss" in r]
    assert len(ddp_evals) == 4 and ddp_evals == pytest.approx(single_evals, rel=1e-5)
    eval_tokens = {r["eval_tokens"] for r in records + single.history if "eval_loss" in r}
    assert len(eval_tokens) == 1 and eval_tokens.pop() > 0  # every eval record counted once over the ranks

    final = load_file(tmp_path / "ddp" / "final" / "projector.safetensors")
    for name, tensor in single.model.projector.state_dict().items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=1e-5)
    from transformers import AutoModelForCausalLM

    ddp_llm = AutoModelForCausalLM.from_pretrained(tmp_path / "ddp" / "final" / "llm")
    for (name, a), (_, b) in zip(ddp_llm.named_parameters(), single.model.llm.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)
