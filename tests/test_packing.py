"""Less padding: packed rows give the loss (and gradient) of the padded batch; the length-grouped order is a
deterministic permutation that keeps a step's samples whatever the split; training with packing matches padding."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from minigpt.data.conversation import Conversation
from minigpt.data.packing import collate_packed, length_grouped_order, pack_rows, padding_stats
from minigpt.train.config import validate_config
from minigpt.train.data import BatchPlan, Item, collate_items
from minigpt.train.launch import train
from test_train_support import losses, make_shapes, tiny_config

WORDS = "a red circle on the left of a big blue square near some green triangle under yellow light".split()


def test_pack_rows_fewest_balanced_rows():
    lengths = [5, 9, 3, 7, 2, 12]
    rows = pack_rows(lengths, capacity=10)
    assert sorted(i for row in rows for i in row) == list(range(6))
    assert rows == [[5], [1], [3, 4], [0, 2]]  # 12 alone (over capacity), 9, 7+2, 5+3
    assert pack_rows([4, 4], 8) == [[0, 1]]
    assert pack_rows([6, 5, 4, 3, 2], 10) == [[0], [1, 4], [2, 3]]  # two rows would be 9 + 11 (> 10): three
    assert pack_rows([], 8) == []
    with pytest.raises(ValueError):
        pack_rows([1], 0)


def _items(processor, n: int, seed: int = 0) -> list[Item]:
    rng = random.Random(seed)
    items = []
    for i in range(n):
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 6)))
        conv = Conversation.single("<Img><ImageHere></Img> " + question, answer)
        colour = tuple(rng.randrange(256) for _ in range(3))
        pixels = processor.image_processor(Image.new("RGB", (40, 30), colour))
        items.append(Item(processor.encode(conv), [pixels], f"sample {i}"))
    return items


def _loss_and_grad(model, tb):
    model.zero_grad(set_to_none=True)
    out = model(batch=tb.batch)
    out.loss.backward()
    return float(out.loss.detach()), model.projector.weight.grad.clone(), out.num_tokens


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked(tiny_pair_factory, attn):
    model, processor = tiny_pair_factory()
    model.llm.set_attn_implementation(attn)
    model.train()
    items = _items(processor, 7)
    pad_id = processor.tokenizer.pad_token_id
    padded = collate_items(items, pad_id)
    loss, grad, count = _loss_and_grad(model, padded)
    longest = max(len(x.encoded) for x in items)
    for capacity in (longest, 2 * longest, 10_000):  # several rows, fewer rows, one row
        packed = collate_items(items, pad_id, pack_len=capacity)
        assert packed.num_input_tokens == padded.num_input_tokens and packed.num_tokens == padded.num_tokens
        p_loss, p_grad, p_count = _loss_and_grad(model, packed)
        assert p_count == count
        assert p_loss == pytest.approx(loss, abs=1e-5)
        torch.testing.assert_close(p_grad, grad, atol=1e-5, rtol=1e-4)


def test_packed_batch_layout(tiny_pair_factory):
    _, processor = tiny_pair_factory()
    encs = [x.encoded for x in _items(processor, 3, seed=1)]
    batch, order = collate_packed(encs, 0, capacity=10_000)
    assert batch.input_ids.shape[0] == 1 and sorted(order) == [0, 1, 2]
    starts = [0]
    for i in order[:-1]:
        starts.append(starts[-1] + len(encs[i]))
    for k, (i, start) in enumerate(zip(order, starts), start=1):
        n = len(encs[i])
        assert batch.position_ids[0, start : start + n].tolist() == list(range(n))
        assert batch.labels[0, start] == -100  # never predicted from the previous sample
        assert (batch.segment_ids[0, start : start + n] == k).all()
        mask = batch.attention_mask[0, 0]
        assert not mask[start:, :start].any()  # no sample sees an earlier one
        assert mask[start + n - 1, start : start + n].all()


def test_length_grouped_order_is_a_deterministic_grouping():
    rng = random.Random(0)
    lengths = [rng.randint(10, 200) for _ in range(96)]
    order = length_grouped_order(lengths, step_size=8, window_steps=4, seed=3, epoch=0)
    assert sorted(order) == list(range(96))
    assert order == length_grouped_order(lengths, 8, 4, seed=3, epoch=0)
    assert order != length_grouped_order(lengths, 8, 4, seed=4, epoch=0)
    assert order != length_grouped_order(lengths, 8, 4, seed=3, epoch=1)
    steps = [order[i : i + 8] for i in range(0, 96, 8)]
    for j in range(0, 96, 32):  # a window keeps its own positions
        assert sorted(i for s in steps[j // 8 : j // 8 + 4] for i in s) == list(range(j, j + 32))
    grouped = padding_stats(lengths, steps)
    plain = padding_stats(lengths, [list(range(i, i + 8)) for i in range(0, 96, 8)])
    packed = padding_stats(lengths, [list(range(i, i + 8)) for i in range(0, 96, 8)], capacity=400)
    assert grouped["tokens"] == plain["tokens"] == packed["tokens"] == sum(lengths)
    assert grouped["pad_fraction"] < plain["pad_fraction"] / 2
    assert packed["pad_fraction"] < plain["pad_fraction"]


def test_grouped_plan_keeps_steps_whatever_the_split_and_resumes():
    lengths = [random.Random(i).randint(1, 99) for i in range(48)]
    order = lambda epoch: length_grouped_order(lengths, 8, 2, seed=1, epoch=epoch)  # noqa: E731

    def step_sets(batch_size, accum, world, start=0, stop=12):
        keys = {}
        for rank in range(world):
            plan = BatchPlan(batch_size, 6 * accum, start * accum, stop * accum, rank, world, order=order)
            for m, batch in enumerate(plan, start=start * accum):
                keys.setdefault(m // accum, set()).update((k.epoch, k.index) for k in batch)
        return keys

    whole = step_sets(8, 1, 1)
    assert step_sets(2, 2, 2) == whole
    assert step_sets(4, 2, 1) == whole
    resumed = step_sets(4, 2, 1, start=5)
    assert resumed == {s: whole[s] for s in range(5, 12)}
    assert {i for s in range(6) for _, i in whole[s]} == set(range(48))  # an epoch covers every position once
    assert whole[6] != whole[0]  # the next epoch has another order


def test_training_with_packing_and_grouping_matches_padding(tmp_path, tiny_llama_dir):
    train_json = make_shapes(tmp_path / "data", 24)
    base = dict(
        model={"template": "vicuna0", "max_txt_len": 16},
        data={"augment": False},
        run={"max_steps": 3, "batch_size": 4, "grad_accum": 2},
    )
    runs = {}
    for name, extra in {"pad": {}, "pack": {"packing": True, "pack_len": 64}}.items():
        config = tiny_config(tiny_llama_dir, train_json, tmp_path / name, **base)
        config["data"].update(extra)
        runs[name] = losses(train(validate_config(config)).history)
    assert runs["pack"] == pytest.approx(runs["pad"], abs=1e-5)
    config = tiny_config(tiny_llama_dir, train_json, tmp_path / "group", **base)
    config["data"].update(group_by_length=True, group_window=2, packing=True, pack_len=64)
    grouped = losses(train(validate_config(config)).history)
    assert len(grouped) == 3 and all(x == x for x in grouped)


def test_config_refuses_grouping_a_stream(tmp_path, tiny_llama_dir):
    from minigpt.train.config import ConfigError

    config = tiny_config(tiny_llama_dir, tmp_path / "x.json", tmp_path / "out")
    config["data"]["datasets"] = [{"format": "webdataset", "path": str(tmp_path)}]
    config["data"]["group_by_length"] = True
    with pytest.raises(ConfigError, match="group_by_length needs map-style"):
        validate_config(config)
    config["data"]["group_by_length"] = False
    config["data"]["packing"] = True
    config["run"]["attn_implementation"] = "flash_attention_2"
    with pytest.raises(ConfigError, match="packing needs"):
        validate_config(config)
