"""``minigpt convert apply-delta``: Vicuna-style base + delta -> working weights, shard by shard.

A tiny LLaMA plays LLaMA; a "Vicuna" is that model changed everywhere plus one added ``[PAD]`` token (Vicuna v0's
32001 vs 32000 rows); the delta is published the way FastChat's make_delta writes it (target - base, full-size
tensors, the added row as is) in ``.bin`` shards with an index, or in safetensors.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minigpt.cli import main
from minigpt.convert import delta as delta_mod
from minigpt.convert.delta import ShardedWeights, apply_delta, parse_size
from minigpt.tools.tiny_llm import tiny_llm_dir

WORDS = "a red green blue square circle triangle picture of the is there what colour shape".split()


def _save_shards(state: dict[str, torch.Tensor], directory: Path, parts: int, fmt: str) -> None:
    """``state`` in ``parts`` files with a transformers index (``.bin`` like the published Vicuna deltas)."""
    names = list(state)
    size = -(-len(names) // parts)
    weight_map = {}
    for i in range(parts):
        ext = "safetensors" if fmt == "safetensors" else "bin"
        stem = "model" if fmt == "safetensors" else "pytorch_model"
        file = f"{stem}-{i + 1:05d}-of-{parts:05d}.{ext}"
        chunk = {n: state[n].contiguous() for n in names[i * size : (i + 1) * size]}
        if fmt == "safetensors":
            save_file(chunk, directory / file, metadata={"format": "pt"})
        else:
            torch.save(chunk, directory / file)
        weight_map.update(dict.fromkeys(chunk, file))
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (directory / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(base dir, delta dir (.bin shards), target model, base vocab)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("delta")
    base_dir = tiny_llm_dir(WORDS, root / "llama", seed=0)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    # the base in 3 safetensors shards, as LLaMA conversions ship it (plus an old-style rotary buffer)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    for f in base_dir.glob("model*.safetensors"):
        f.unlink()
    _save_shards(state, base_dir, 3, "safetensors")
    vocab = base.config.vocab_size

    torch.manual_seed(1)
    target = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.add_special_tokens({"pad_token": "[PAD]"})
    target.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    target.config.vocab_size = len(tok)
    delta_dir = root / "vicuna-delta"
    delta_dir.mkdir()
    delta = {}
    for name, value in target.state_dict().items():
        d = value.clone()
        b = state[name]
        d[: b.shape[0]] -= b  # FastChat make_delta; the added row stays the target's own
        delta[name] = d
    delta["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)  # what 2023 checkpoints carried
    _save_shards(delta, delta_dir, 2, "bin")
    target.config.save_pretrained(delta_dir)
    tok.save_pretrained(delta_dir)
    return base_dir, delta_dir, target.eval(), vocab


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("300KB") == 300_000 and parse_size("1GiB") == 2**30
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="use e.g."):
        parse_size("two gigs")


def test_apply_delta_gives_the_target(models, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, delta_dir, target, vocab = models
    out = tmp_path / "vicuna"
    assert (
        main(
            [
                "convert",
                "apply-delta",
                "--base",
                str(base_dir),
                "--delta",
                str(delta_dir),
                "--target",
                str(out),
                "--max-shard-size",
                "300KB",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    # the vocabulary mismatch is spelled out: sizes, the added token, where its rows come from
    assert f"the base has {vocab} tokens, the delta {vocab + 1}" in printed and "[PAD]" in printed
    assert "lm_head.weight" in printed and "model.embed_tokens.weight" in printed and "delta's own" in printed
    assert "inv_freq" in printed

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).stat().st_size <= 300_000 + 100_000 for s in shards)
    written = {}
    for s in shards:
        written.update(load_file(out / s))
    expected = target.state_dict()
    assert set(written) == set(expected)
    for name, value in expected.items():
        assert torch.allclose(written[name], value, atol=1e-6), name
    assert torch.equal(written["lm_head.weight"][vocab], expected["lm_head.weight"][vocab])  # delta alone

    assert json.loads((out / "config.json").read_text())["vocab_size"] == vocab + 1
    assert AutoTokenizer.from_pretrained(out).pad_token == "[PAD]"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 12, vocab]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, target(ids).logits, atol=1e-5)


def test_holds_one_shard_at_a_time(models, tmp_path, monkeypatch):
    """Instrumented reader and writer: no tensor read lives past its sum, no written shard lives past its write,
    so memory is one output shard plus one base/delta pair."""
    base_dir, delta_dir, _, _ = models
    live_read: dict[int, int] = {}
    live_written: dict[int, int] = {}
    events = {"reads": 0, "max_read_live": 0, "written_alive_at_read": 0, "shard_bytes": []}
    real_get, real_save = ShardedWeights.get, delta_mod._save_shard

    def track(registry: dict[int, int], tensor: torch.Tensor) -> None:
        key = id(tensor)
        registry[key] = tensor.numel() * tensor.element_size()
        weakref.finalize(tensor, registry.pop, key, None)

    def get(self, name):
        events["reads"] += 1
        events["written_alive_at_read"] = max(events["written_alive_at_read"], len(live_written))
        tensor = real_get(self, name)
        track(live_read, tensor)
        events["max_read_live"] = max(events["max_read_live"], len(live_read))
        return tensor

    def save(tensors, path):
        events["shard_bytes"].append(sum(t.numel() * t.element_size() for t in tensors.values()))
        for t in tensors.values():
            track(live_written, t)
        real_save(tensors, path)

    monkeypatch.setattr(ShardedWeights, "get", get)
    monkeypatch.setattr(delta_mod, "_save_shard", save)
    result = apply_delta(base_dir, delta_dir, tmp_path / "out", max_shard_size="200KB")
    assert events["reads"] == 2 * result.tensors
    assert events["max_read_live"] <= 2  # the base and delta tensor of the current name, nothing older
    assert events["written_alive_at_read"] == 0  # every shard released once written
    biggest = max(info.nbytes for info in ShardedWeights(delta_dir).tensors.values())
    assert max(events["shard_bytes"]) <= max(200_000, biggest) and len(events["shard_bytes"]) == len(result.shards)


def test_peak_rss_loosely(tmp_path):
    """Peak resident memory while converting a ~20 MB model in 2 MB shards stays well under the model size
    (printed; a loose bound, as RSS also counts allocator slack and libraries)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    status = Path("/proc/self/status")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
    except OSError:
        pytest.skip("cannot reset the peak RSS here")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    model = LlamaForCausalLM(config)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    del model
    total = sum(v.numel() * 4 for v in state.values())
    for name, scale in (("base", 1.0), ("delta", 0.01)):
        d = tmp_path / name
        d.mkdir()
        _save_shards({k: v * scale for k, v in state.items()}, d, 2, "safetensors")
        config.save_pretrained(d)
    del state

    def hwm() -> int:
        line = next(x for x in status.read_text().splitlines() if x.startswith("VmHWM"))
        return int(line.split()[1]) * 1024

    Path("/proc/self/clear_refs").write_text("5")
    before = hwm()
    apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "out", max_shard_size="2MB")
    grew = hwm() - before
    print(f"apply-delta: model {total / 1e6:.1f} MB, peak RSS grew {grew / 1e6:.1f} MB (2 MB shards)")
    assert grew < total


def _as_one_safetensors(shards: Path, out: Path) -> Path:
    """The ``.bin`` shards of ``shards`` as one ``model.safetensors`` in ``out`` (old rotary buffers dropped)."""
    out.mkdir()
    state = {}
    for f in sorted(shards.glob("*.bin")):
        state.update(torch.load(f, weights_only=True))
    save_file(
        {k: v for k, v in state.items() if "inv_freq" not in k}, out / "model.safetensors", metadata={"format": "pt"}
    )
    return out


def test_safetensors_delta_and_dtype(models, tmp_path, capsys):
    base_dir, delta_dir, target, vocab = models
    single = _as_one_safetensors(delta_dir, tmp_path / "delta-st")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (single / name).write_bytes((delta_dir / name).read_bytes())
    out = tmp_path / "out"
    result = apply_delta(base_dir, single, out, dtype="bfloat16")
    assert result.shards == ["model.safetensors"] and not (out / "model.safetensors.index.json").exists()
    assert result.vocab == (vocab, vocab + 1) and result.added_tokens == ["[PAD]"]
    got = load_file(out / "model.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in got.values())
    ref = target.state_dict()["model.layers.1.mlp.up_proj.weight"].to(torch.bfloat16)
    assert torch.equal(got["model.layers.1.mlp.up_proj.weight"], ref)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_mismatches_are_clear_errors(models, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    base_dir, delta_dir, _, vocab = models
    # a base of another size: every layer differs
    other = tmp_path / "other"
    other_base = AutoModelForCausalLM.from_pretrained(base_dir)
    wide = type(other_base.config)(**{**other_base.config.to_dict(), "hidden_size": 64, "intermediate_size": 96})
    type(other_base)(wide).save_pretrained(other)
    with pytest.raises(ValueError, match="differ in shape") as err:
        apply_delta(other, delta_dir, tmp_path / "x")
    assert "same size" in str(err.value) and not (tmp_path / "x").exists()
    # the delta of a model with fewer tokens than the base
    with pytest.raises(ValueError, match=f"the delta has fewer rows \\({vocab}\\) than the base \\({vocab + 1}\\)"):
        apply_delta(_as_one_safetensors(delta_dir, tmp_path / "grown"), base_dir, tmp_path / "y")
    # a tensor missing from the delta
    partial = tmp_path / "partial"
    partial.mkdir()
    st = load_file(next(base_dir.glob("model-00001-*.safetensors")))
    save_file(st, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="tensor\\(s\\) of the base are not in the delta"):
        apply_delta(base_dir, partial, tmp_path / "z")
    # through the CLI: one line, exit code 2; an existing non-empty target is refused
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert (
        main(
            [
                "convert",
                "apply-delta",
                "--base",
                str(base_dir),
                "--delta",
                str(delta_dir),
                "--target",
                str(tmp_path / "full"),
            ]
        )
        == 2
    )
    assert "exists and is not empty" in capsys.readouterr().err
    assert (
        main(
            [
                "convert",
                "apply-delta",
                "--base",
                str(tmp_path / "nope"),
                "--delta",
                str(delta_dir),
                "--target",
                str(tmp_path / "t"),
            ]
        )
        == 2
    )
    assert "no such folder" in capsys.readouterr().err
