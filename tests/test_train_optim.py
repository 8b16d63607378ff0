"""Optimisation: the LR schedules, weight decay groups, gradient accumulation, clipping and AMP."""

from __future__ import annotations

import math

import pytest
import torch

from minigpt.train.config import OptimizerSection, ScheduleSection, validate_config
from minigpt.train.launch import train
from minigpt.train.loop import Schedule, build_optimizer
from minigpt.train.strategy import Strategy
from test_train_support import losses, make_shapes, tiny_config


def test_linear_warmup_cosine_values_at_key_steps():
    # MiniGPT-4 stage 1 shape, scaled down: lr 1e-4 -> 8e-5, warmup from 1e-6 over 10 of 40 steps.
    s = Schedule(ScheduleSection(name="linear_warmup_cosine", warmup_steps=10, warmup_lr=1e-6, min_lr=8e-5), 1e-4, 40)
    expected = {
        0: 1e-6,  # warmup starts at warmup_lr
        5: 1e-6 + 99e-6 * 5 / 10,  # 5.05e-5
        9: 1e-6 + 99e-6 * 9 / 10,  # 9.01e-5
        10: 8e-5 + 1e-5 * (1 + math.sqrt(0.5)),  # the cosine counts the warmup steps: cos(pi * 10/40)
        20: 9e-5,  # half way: the mean of lr and min_lr
        39: 8e-5 + 1e-5 * (1 + math.cos(math.pi * 39 / 40)),
        40: 8e-5,
    }
    for step, lr in expected.items():
        assert s(step) == pytest.approx(lr, rel=1e-12, abs=1e-15), step
    assert s(10) == pytest.approx(9.707106781e-5, rel=1e-9)


def test_constant_schedule_with_and_without_warmup():
    s = Schedule(ScheduleSection(name="constant", warmup_steps=4, warmup_lr=0.0), 2e-3, 100)
    assert [s(t) for t in (0, 1, 2, 4, 50, 99)] == pytest.approx([0.0, 5e-4, 1e-3, 2e-3, 2e-3, 2e-3])
    flat = Schedule(ScheduleSection(name="constant"), 1e-3, 10)
    assert {flat(t) for t in range(10)} == {1e-3}


def test_no_weight_decay_on_one_dimensional_parameters(tiny_model_factory):
    model = tiny_model_factory(freeze={"qformer": False, "projector": False})
    opt = build_optimizer(model, OptimizerSection(lr=0.1, weight_decay=0.5))
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    by_group = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert set(by_group) == {0.5, 0.0}
    assert by_group[0.5] | by_group[0.0] == set(trainable) and not by_group[0.5] & by_group[0.0]
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert (id(p) in by_group[0.0]) == (p.ndim < 2), n
    # Behaviour: with zero gradients AdamW only decays, so 1-D parameters must not move at all.
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        if p.requires_grad:
            factor = 1.0 if p.ndim < 2 else 1 - 0.1 * 0.5
            torch.testing.assert_close(p.detach(), before[n] * factor, rtol=1e-6, atol=0), n
    assert any(p.ndim < 2 for p in model.parameters() if p.requires_grad)


def test_nothing_to_train_is_an_error(tiny_model_factory):
    model = tiny_model_factory(freeze={"projector": True})
    with pytest.raises(ValueError, match="nothing to train"):
        build_optimizer(model, OptimizerSection())


def test_gradient_clipping_returns_the_norm_and_clips():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    opt = torch.optim.SGD([p], lr=1.0)
    assert Strategy("cpu", "no").step(opt, [p], max_norm=1.0) == pytest.approx(5.0)
    torch.testing.assert_close(p.detach(), torch.tensor([-0.6, -0.8]), rtol=1e-5, atol=1e-6)


def _run(tmp_path, llm_dir, name, train_json, **run):
    sections = {
        "model": {"freeze": {"llm": False}},  # the LLM has no dropout: results depend on the batching only
        "run": {
            "max_steps": 3,
            "optimizer": {"lr": 1e-3, "weight_decay": 0.05},
            "schedule": {"name": "linear_warmup_cosine", "warmup_steps": 1, "warmup_lr": 1e-4},
            **run,
        },
    }
    return train(validate_config(tiny_config(llm_dir, train_json, tmp_path / name, **sections)))


def test_accumulation_equals_a_bigger_batch(tmp_path, tiny_llama_dir):
    train_json = make_shapes(tmp_path / "data", 24)
    big = _run(tmp_path, tiny_llama_dir, "big", train_json, batch_size=4, grad_accum=1)
    accum = _run(tmp_path, tiny_llama_dir, "accum", train_json, batch_size=2, grad_accum=2)
    assert len(losses(big.history)) == 3
    assert losses(accum.history) == pytest.approx(losses(big.history), rel=1e-6)
    assert [r["lr"] for r in big.history] == pytest.approx([1e-4, 1e-3 * 0.75, 1e-3 * 0.25])
    b = dict(big.model.trainable_parameters())
    a = dict(accum.model.trainable_parameters())
    assert b.keys() == a.keys() and len(b) > 10
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    one = _run(tmp_path, tiny_llama_dir, "one", train_json, batch_size=4, max_steps=1)
    after_one = dict(one.model.trainable_parameters())
    assert one.step == 1 and any((after_one[n] - b[n]).abs().max() > 1e-4 for n in b)  # the steps did move weights


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_steps(tmp_path, tiny_llama_dir, amp):
    train_json = make_shapes(tmp_path / "data", 8)
    result = _run(tmp_path, tiny_llama_dir, amp, train_json, batch_size=4, max_steps=2, amp=amp, save_every=1)
    values = losses(result.history)
    assert len(values) == 2 and all(math.isfinite(v) and 5 < v < 15 for v in values)
    from minigpt.train.checkpoint import latest_checkpoint, load_checkpoint

    _, state = load_checkpoint(latest_checkpoint(tmp_path / amp))
    assert (state["strategy"]["scaler"] is not None) == (amp == "fp16")  # loss scaling with fp16 only
