"""The training step for accelerators, checked on the CPU: nothing in forward + backward reads the device back, the
chunked loss equals the plain one (values and gradients), the collated indices equal the masks' and the prefetcher
hands out the loader's batches unchanged. (No timing here: speed is measured with ``minigpt bench train``.)"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from minigpt.data.tokenize import IGNORE_INDEX
from minigpt.model import loss as loss_module
from minigpt.model.loss import chunked_linear_cross_entropy, linear_cross_entropy, resolve_loss_impl
from minigpt.tools.bench.common import build_bench_model, llm_shape, vision_shape
from minigpt.tools.bench.train import synthetic_encoded
from minigpt.train.data import DevicePrefetcher, Item, TrainBatch, collate_items
from minigpt.train.loop import forward_backward
from minigpt.train.strategy import Strategy

# ---------------------------------------------------------------------------------------------- helpers


class HostSync(AssertionError):
    """An operation that, on an accelerator, makes the host wait for the device."""


_READS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"}
_DATA_DEPENDENT = ("_local_scalar_dense", "nonzero", "masked_select", "masked_scatter", "unique", "repeat_interleave")


def _bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


class _FunctionReads(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _READS or (
            name == "__getitem__"
            and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool
                for i in (args[1] if isinstance(args[1], tuple) else (args[1],))
            )
        ):
            raise HostSync(f"Tensor.{name}")
        return func(*args, **(kwargs or {}))


class _DispatchReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if any(op in name for op in _DATA_DEPENDENT) or (
            name.split("::")[-1].split(".")[0] in ("index", "index_put", "_index_put_impl_") and _bool_index(args)
        ):
            raise HostSync(name)
        return func(*args, **(kwargs or {}))


class no_host_sync:
    """Raise :class:`HostSync` at any host read or data-dependent shape inside (forward and backward ops alike)."""

    def __enter__(self) -> None:
        self.modes = [_FunctionReads(), _DispatchReads()]
        for mode in self.modes:
            mode.__enter__()

    def __exit__(self, *exc) -> None:
        for mode in reversed(self.modes):
            mode.__exit__(*exc)


def _model(attn: str = "sdpa"):
    model = build_bench_model(llm_shape("tiny"), vision_shape("tiny"), torch.device("cpu"), torch.float32, attn)
    model.train()
    return model


def _batch(model, pack_len: int | None = None, supervised=(5, 9, 3), seed: int = 0) -> TrainBatch:
    rng = random.Random(seed)
    encs = [synthetic_encoded(2, model.image_tokens, n, 1000, rng) for n in supervised]
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(encs), model.image_tokens, model.vision.out_dim, generator=gen)
    return collate_items([Item(e, [], f"sample {i}", [f]) for i, (e, f) in enumerate(zip(encs, feats))], 0, pack_len)


def _loss_and_grads(model, tb: TrainBatch) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = forward_backward(model, Strategy("cpu", "no"), [tb], tb.num_tokens, tb)
    return float(loss) / tb.num_tokens, [p.grad.clone() for p in model.projector.parameters()]


def _without_indices(tb: TrainBatch) -> TrainBatch:
    text = dataclasses.replace(tb.batch.text, right_padded=False, image_index=None, target_index=None, target_ids=None)
    return dataclasses.replace(tb, batch=dataclasses.replace(tb.batch, text=text))


# ---------------------------------------------------------------------------------------------- no host sync


@pytest.mark.parametrize("pack_len", [None, 64], ids=["padded", "packed"])
@pytest.mark.parametrize("impl", ["plain", "chunked"])
def test_training_step_never_waits_for_the_device(monkeypatch, pack_len, impl):
    monkeypatch.setattr(loss_module, "CHUNK_LOGITS", 4 * 1024)  # several chunks of 4 rows
    model = _model()
    model.loss_impl = impl
    tb = _batch(model, pack_len)
    with no_host_sync():
        forward_backward(model, Strategy("cpu", "no"), [tb], tb.num_tokens, tb)
    assert all(p.grad is not None for p in model.projector.parameters())
    # The detector is not blind: without the collated indices the model computes them from the masks, which syncs.
    with pytest.raises(HostSync), no_host_sync():
        forward_backward(model, Strategy("cpu", "no"), [_without_indices(tb)], tb.num_tokens, tb)


def test_host_sync_detector_catches_each_kind():
    x = torch.arange(6.0, requires_grad=True)
    mask = x.detach() > 2
    for read in (
        lambda: x.sum().item(),
        lambda: bool(x.sum()),
        lambda: int(x.sum()),
        lambda: x.tolist(),
        lambda: x[mask],
        lambda: x.masked_select(mask),
        lambda: mask.nonzero(),
        lambda: torch.zeros(6).masked_scatter(mask, x),
    ):
        with pytest.raises(HostSync), no_host_sync():
            read()
    y = x.detach().requires_grad_()[torch.tensor([True, False] * 3)]
    with pytest.raises(HostSync), no_host_sync():
        y.sum().backward()  # a boolean index's backward (index_put with a mask)


# ---------------------------------------------------------------------------------------------- indices and masks


@pytest.mark.parametrize("pack_len", [None, 64], ids=["padded", "packed"])
def test_collated_indices_give_the_mask_based_step(pack_len):
    model = _model()
    tb = _batch(model, pack_len)
    text = tb.batch.text
    assert text.image_index.tolist() == text.image_mask.reshape(-1).nonzero().squeeze(1).tolist()
    following = text.labels[:, 1:]
    keep = following != IGNORE_INDEX
    assert tb.num_tokens == int(keep.sum()) == text.target_index.numel()
    assert torch.equal(text.target_ids, following[keep])
    assert torch.equal(text.labels.reshape(-1)[text.target_index + 1], text.target_ids)
    assert text.right_padded == (pack_len is None)
    fast, fast_grads = _loss_and_grads(model, tb)
    slow, slow_grads = _loss_and_grads(model, _without_indices(tb))  # 2-D padding mask, indices from the masks
    assert fast == pytest.approx(slow, rel=1e-6)
    for a, b in zip(fast_grads, slow_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_embed_writes_the_visual_tokens_into_the_image_slots():
    model = _model()
    tb = _batch(model)
    text = tb.batch.text
    visual = torch.randn(3, model.image_tokens, model.llm.config.hidden_size)
    embeds = model.embed(tb.batch, visual)
    reference = model.llm.get_input_embeddings()(text.input_ids)
    reference[text.image_mask] = visual.reshape(-1, visual.shape[-1])
    assert torch.equal(embeds, reference)
    with pytest.raises(ValueError, match="24 image positions but 16 image embeddings"):
        model.embed(tb.batch, visual[:2])


# ---------------------------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("scale,softcap", [(None, None), (0.5, None), (None, 3.0), (2.0, 1.5)])
@pytest.mark.parametrize("head_trains", [False, True])
def test_chunked_loss_and_gradients_equal_plain(scale, softcap, head_trains):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    head.weight.requires_grad_(head_trains)
    rows = torch.randn(10, 16, requires_grad=True)
    targets = torch.randint(0, 50, (10,))
    results = []
    for run in (
        lambda: linear_cross_entropy(rows, head, targets, "plain", scale, softcap),
        lambda: chunked_linear_cross_entropy(rows, head.weight, targets, scale, softcap, chunk_rows=3),
    ):
        rows.grad = head.weight.grad = None
        loss = run()
        (loss * 1.7).backward()  # a non-unit upstream gradient reaches both
        weight_grad = None if head.weight.grad is None else head.weight.grad.clone()
        results.append((loss.detach(), rows.grad.clone(), weight_grad))
    (plain, plain_rows, plain_weight), (chunked, chunked_rows, chunked_weight) = results
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=0)
    torch.testing.assert_close(chunked_rows, plain_rows, rtol=1e-5, atol=1e-7)
    assert (chunked_weight is None) == (plain_weight is None) == (not head_trains)
    if head_trains:
        torch.testing.assert_close(chunked_weight, plain_weight, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # forward only: no gradients computed, the same loss
        torch.testing.assert_close(chunked_linear_cross_entropy(rows, head.weight, targets, scale, softcap, 4), plain)


def test_chunked_loss_under_bf16_autocast_is_close_to_plain():
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 64, bias=False)
    rows = torch.randn(12, 32, requires_grad=True)
    targets = torch.randint(0, 64, (12,))
    grads = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for impl in ("plain", "chunked"):
            rows.grad = None
            if impl == "plain":
                loss = linear_cross_entropy(rows, head, targets, impl)
            else:
                loss = chunked_linear_cross_entropy(rows, head.weight, targets, chunk_rows=5)
            loss.backward()
            grads.append((loss.detach(), rows.grad.clone()))
    assert grads[1][0].dtype == torch.float32
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=5e-2, atol=1e-3)


@pytest.mark.parametrize("softcap,scale", [(None, None), (4.0, 0.5)])
def test_model_loss_is_the_same_with_every_cpu_implementation(monkeypatch, softcap, scale):
    monkeypatch.setattr(loss_module, "CHUNK_LOGITS", 3 * 1024)  # 3 rows per chunk
    model = _model()
    model.llm.config.final_logit_softcapping, model.llm.config.logit_scale = softcap, scale
    tb = _batch(model, supervised=(5, 9, 30))
    results = {}
    for impl in ("plain", "chunked", "auto"):
        model.loss_impl = impl
        results[impl] = _loss_and_grads(model, tb)
    assert model.resolved_loss_impl(tb.num_tokens) == "chunked"  # auto: more than one chunk of logits
    assert model.resolved_loss_impl(3) == "plain"
    for impl in ("chunked", "auto"):
        assert results[impl][0] == pytest.approx(results["plain"][0], rel=1e-5)
        for a, b in zip(results[impl][1], results["plain"][1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", ["plain", "chunked"])
def test_a_batch_without_supervised_tokens_has_a_zero_loss_that_backpropagates(impl):
    model = _model()
    model.loss_impl = impl
    tb = _batch(model, supervised=(0, 0))
    assert tb.num_tokens == 0
    out = model(batch=tb.batch, image_embeds=model.projector(tb.features))
    assert out.num_tokens == 0 and out.loss.item() == 0.0
    out.loss.backward()
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.projector.parameters())


def test_loss_implementation_choice_and_errors():
    head = torch.nn.Linear(8, 1000, bias=False)
    cpu = torch.device("cpu")
    assert resolve_loss_impl("auto", head, 10, cpu) == "plain"
    assert resolve_loss_impl("auto", head, loss_module.CHUNK_LOGITS // 1000 + 1, cpu) == "chunked"
    assert resolve_loss_impl("chunked", head, 10, cpu) == "chunked"
    with pytest.raises(ValueError, match="liger needs the liger-kernel package and a CUDA device"):
        resolve_loss_impl("liger", head, 10, cpu)
    with pytest.raises(ValueError, match="unknown loss implementation 'fused'"):
        resolve_loss_impl("fused", head, 10, cpu)
    biased = torch.nn.Linear(8, 1000)
    assert resolve_loss_impl("auto", biased, 10**6, cpu) == "plain"
    with pytest.raises(ValueError, match="loss_impl chunked cannot be used: the LM head has a bias"):
        resolve_loss_impl("chunked", biased, 10, cpu)


# ---------------------------------------------------------------------------------------------- prefetching


def test_prefetcher_hands_out_the_same_batches_in_order():
    model = _model()
    batches = [_batch(model, seed=s) for s in range(4)]
    out = list(DevicePrefetcher(batches, torch.device("cpu")))
    assert len(out) == 4
    for a, b in zip(out, batches):
        assert a.num_tokens == b.num_tokens and torch.equal(a.batch.text.input_ids, b.batch.text.input_ids)
        assert a.features is b.features  # on the CPU nothing is copied
    assert list(DevicePrefetcher([], torch.device("cpu"))) == []


def test_train_batch_moves_every_tensor():
    model = _model()
    tb = _batch(model, pack_len=64)
    moved = tb.to(torch.device("meta"))
    text = moved.batch.text
    for tensor in (
        text.input_ids,
        text.attention_mask,
        text.labels,
        text.image_mask,
        text.position_ids,
        text.segment_ids,
        text.image_index,
        text.target_index,
        text.target_ids,
        moved.features,
    ):
        assert tensor.is_meta
    assert moved.num_tokens == tb.num_tokens and type(text).__name__ == "PackedTextBatch"
    assert tb.batch.text.input_ids.device.type == "cpu"  # the original is untouched


def test_liger_gets_the_scaled_rows_and_the_softcap(monkeypatch):
    """The liger path's plumbing, with a stand-in for Liger-Kernel's function (the package needs CUDA + Triton)."""
    import sys
    import types

    def fake(rows, weight, targets, softcap=None):
        logits = rows @ weight.t()
        return torch.nn.functional.cross_entropy(torch.tanh(logits / softcap) * softcap if softcap else logits, targets)

    functional = types.ModuleType("liger_kernel.transformers.functional")
    functional.liger_fused_linear_cross_entropy = fake
    for name, module in (
        ("liger_kernel", types.ModuleType("liger_kernel")),
        ("liger_kernel.transformers", types.ModuleType("liger_kernel.transformers")),
        ("liger_kernel.transformers.functional", functional),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(loss_module, "liger_installed", lambda: True)
    monkeypatch.setattr(loss_module, "runs_triton", lambda device: True)
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 40, bias=False)
    rows, targets = torch.randn(6, 16), torch.randint(0, 40, (6,))
    assert resolve_loss_impl("auto", head, 6, rows.device) == "liger"
    for scale, softcap in ((None, None), (0.5, 2.0)):
        torch.testing.assert_close(
            linear_cross_entropy(rows, head, targets, "liger", scale, softcap),
            linear_cross_entropy(rows, head, targets, "plain", scale, softcap),
        )
