"""``minigpt bench``: the JSON of a tiny CPU run (no timing assertions), our step's loss equals the reference-style
step's, the useful-FLOP formula matches counted FLOPs, and the lean loss's compute grows with answer tokens only."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from minigpt.cli import build_parser, main
from minigpt.data.packing import collate_packed
from minigpt.data.tokenize import ModelBatch
from minigpt.tools.bench.common import FlopModel, build_bench_model, llm_shape, vision_shape
from minigpt.tools.bench.train import synthetic_encoded

CASE_KEYS = {
    "name",
    "step",
    "batching",
    "vision_in_step",
    "precision",
    "attention",
    "compile",
    "grad_checkpointing",
    "step_time_s",
    "samples_per_s",
    "tokens_per_s",
    "pad_fraction",
    "useful_tflop_per_sample",
    "achieved_tflops",
    "peak_tflops",
    "mfu",
    "peak_mem_gib",
    "loss",
    "loss_impl",
}


def test_bench_train_json(tmp_path, capsys):
    out = tmp_path / "train.json"
    assert (
        main(
            [
                "bench",
                "train",
                "--device",
                "cpu",
                "--stage",
                "2",
                "--batch-size",
                "3",
                "--steps",
                "2",
                "--warmup",
                "1",
                "--lengths",
                "cc_sbu_align",
                "--batching",
                "pad,group,pack",
                "--pack-len",
                "256",
                "--feature-dtype",
                "float32",
                "--reference-style",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert report["benchmark"] == "train" and {"device", "torch", "transformers", "threads"} <= set(report["machine"])
    names = [c["name"] for c in report["cases"]]
    assert names == ["ours-pad", "ours-group", "ours-pack", "reference-style"]
    for case in report["cases"]:
        assert set(case) == CASE_KEYS
        assert case["samples_per_s"] > 0 and case["tokens_per_s"] > 0 and case["step_time_s"] > 0
        assert case["useful_tflop_per_sample"] > 0 and 0 < case["mfu"] and case["peak_tflops"] > 0
        assert case["peak_mem_gib"] is None  # CPU: process_peak_rss_gib instead
        assert 0 <= case["pad_fraction"] < 1
    ours, grouped, packed, ref = report["cases"]
    assert ref["vision_in_step"] and not ours["vision_in_step"] and ref["attention"] == "eager"
    assert ours["loss_impl"] == "plain" and ref["loss_impl"] == "full-sequence"  # auto, few answer tokens on a CPU
    # Same weights, same samples: the lean loss on cached (float32) features is the full-sequence loss of the original.
    assert ours["loss"] == pytest.approx(ref["loss"], abs=1e-5)
    assert packed["loss"] == pytest.approx(ours["loss"], abs=1e-5)
    assert packed["pad_fraction"] < ours["pad_fraction"] and grouped["pad_fraction"] < ours["pad_fraction"]
    assert set(report["speedup_vs_reference"]) == {"ours-pad", "ours-group", "ours-pack"}
    assert report["process_peak_rss_gib"] > 0


def test_bench_generate_json_and_null_mfu(capsys):
    args = build_parser().parse_args(
        [
            "bench",
            "generate",
            "--device",
            "cpu",
            "--new-tokens",
            "4",
            "--repeats",
            "1",
            "--prompt-tokens",
            "10",
            "--reference-style",
            "--concurrent",
            "3",
        ]
    )
    report = args.bench(args)
    names = [c["name"] for c in report["cases"]]
    assert names == ["ours-static", "ours-static-concurrent", "ours-plain", "reference-style"]
    single = [c for c in report["cases"] if "requests" not in c]
    for case in single:
        assert case["time_to_first_token_ms"] > 0 and case["decode_tokens_per_s"] > 0
        assert case["total_tokens_per_s"] > 0 and case["cuda_graphs"] is False  # CPU: no graphs
    assert [c["engine"] for c in single] == ["slot decoder", "transformers generate", "transformers generate"]
    assert report["cases"][0]["greedy_tokens_equal_to_plain"] == "4/4"
    concurrent = report["cases"][1]
    assert concurrent["requests"] == 3 and concurrent["aggregate_tokens_per_s"] > 0
    assert 0 < concurrent["mean_time_to_first_token_ms"] < concurrent["wall_s"] * 1000
    args = build_parser().parse_args(
        ["bench", "train", "--device", "cpu", "--steps", "1", "--warmup", "0", "--peak-tflops", "0"]
    )
    case = args.bench(args)["cases"][0]
    assert case["mfu"] is None and case["peak_tflops"] is None


def _model(attn="eager"):
    return build_bench_model(llm_shape("tiny"), vision_shape("tiny"), torch.device("cpu"), torch.float32, attn)


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_useful_flops_formula_matches_counted_flops():
    import random

    model = _model()
    flops = FlopModel.of(model)
    rng = random.Random(0)
    encs = [synthetic_encoded(2, model.image_tokens, n, 1024, rng) for n in (5, 17, 40)]
    text, _ = collate_packed(encs, 0, capacity=10_000)  # one row, three samples
    feats = torch.randn(3, model.image_tokens, model.vision.out_dim)
    batch = ModelBatch(text, None)
    body = model.llm.get_decoder()
    with torch.no_grad():
        embeds = model.embed(batch, model.projector(feats))
    counted = _counted(lambda: body(inputs_embeds=embeds, attention_mask=text.attention_mask.float(), use_cache=False))
    row = sum(len(e) for e in encs)
    # eager attention computes the whole row; the useful part is each sample's own square
    whole_row = 2 * flops.params * row + 4 * flops.layers * flops.attn_width * row * row
    assert counted == whole_row
    useful = flops.step([len(e) for e in encs], answers=0, images=0, vision=False) / 2
    assert useful == sum(2 * flops.params * len(e) + 4 * flops.layers * flops.attn_width * len(e) ** 2 for e in encs)


def test_lean_loss_compute_grows_with_answer_tokens_only():
    import random

    model = _model(attn="sdpa")
    model.eval()
    flops = FlopModel.of(model)
    rng = random.Random(1)
    feats = torch.randn(2, model.image_tokens, model.vision.out_dim)

    def forward_flops(answers: int) -> int:
        enc = [synthetic_encoded(1, model.image_tokens, 40, 1024, rng) for _ in range(2)]
        for e in enc:  # the same 2 x 73 positions; only the first ``answers`` caption tokens are supervised
            e.labels = e.labels[: len(e) - 40 + answers] + [-100] * (40 - answers)
        from minigpt.data.tokenize import collate

        batch = ModelBatch(collate(enc, 0), None)
        return _counted(lambda: model(batch=batch, image_embeds=model.projector(feats)))

    base = forward_flops(1)
    for answers in (5, 20, 40):
        # one extra LM-head row (2 d V) per supervised token, nothing else changes
        assert forward_flops(answers) - base == 2 * 2 * flops.hidden * flops.vocab * (answers - 1)
