"""``torchrun --nproc-per-node 2 -m minigpt.cli eval``: two gloo processes on the cpu give the predictions file and the
metrics of one process, resume per rank and after the merge; the shard arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image as PILImage

from minigpt.eval.shards import Shard
from test_eval_runner import _eval_parser, write
from test_train_support import torchrun_cli

RECORDS = 7  # uneven: rank 0 gets 4, rank 1 gets 3


def _data(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "imgs"
    images.mkdir()
    for name, color in [("a.png", (200, 0, 0)), ("b.png", (0, 200, 0)), ("c.png", (0, 0, 200))]:
        PILImage.new("RGB", (24, 18), color).save(images / name)
    questions = ["What is it?", "Which colour is the thing in the middle of the picture?", "Why?", "How many?"]
    rows = [
        {
            "question_id": i,
            "image": "abc"[i % 3] + ".png",
            "question": questions[i % 4] * (1 + i % 2),
            "answers": ["red"],
        }
        for i in range(RECORDS)
    ]
    return write(tmp_path / "vqa.jsonl", rows), images


def _argv(model: Path, data: Path, images: Path, out: Path) -> list[str]:
    return [
        "eval", str(model), "--task", "vqa", "--data", str(data), "--images", str(images), "--batch-size", "2",
        "--max-new-tokens", "6", "--output", str(out), "--no-progress", "--device", "cpu", "--workers", "0",
    ]  # fmt: skip


def test_two_processes_give_the_predictions_and_metrics_of_one_and_resume(tiny_model_dir, tmp_path):
    data, images = _data(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    args = _eval_parser().parse_args(_argv(tiny_model_dir, data, images, one))
    assert args.func(args) == 0
    single = (one / "predictions.jsonl").read_text()
    ids = [json.loads(line)["id"] for line in single.splitlines()]
    assert ids == [str(i) for i in range(RECORDS)]  # in the records' order, whatever the batching
    assert any(json.loads(line)["prediction"] for line in single.splitlines())
    reference = json.loads((one / "metrics.json").read_text())

    # rank 1 of an interrupted run had answered record 1 (its first): it is resumed, not generated again
    two.mkdir()
    (two / "predictions.rank1-of-2.jsonl").write_text(single.splitlines()[1] + "\n")
    done = torchrun_cli(*_argv(tiny_model_dir, data, images, two))
    assert (two / "predictions.jsonl").read_text() == single
    assert sorted(p.name for p in two.iterdir()) == ["metrics.json", "predictions.jsonl", "scores.jsonl"]
    report = json.loads((two / "metrics.json").read_text())
    assert report["metrics"] == reference["metrics"]
    assert (two / "scores.jsonl").read_text() == (one / "scores.jsonl").read_text()
    assert report["counts"] == {**reference["counts"], "resumed": 1, "generated": RECORDS - 1}
    assert report["throughput"]["processes"] == 2 and reference["throughput"]["processes"] == 1
    assert done.stdout.count('"accuracy"') == 1  # rank 0 alone prints the metrics

    torchrun_cli(*_argv(tiny_model_dir, data, images, two))  # a rerun after the merge: nothing left to do
    again = json.loads((two / "metrics.json").read_text())
    assert again["counts"]["resumed"] == RECORDS and again["counts"]["generated"] == 0
    assert again["metrics"] == reference["metrics"] and (two / "predictions.jsonl").read_text() == single


def test_shards_split_strided_and_name_their_files():
    records = list(range(7))
    parts = [Shard(rank, 3).part(records) for rank in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert Shard().part(records) == records
    merged = Path("out/predictions.jsonl")
    assert Shard().local_path(merged) == merged
    assert Shard(1, 2).local_path(merged) == Path("out/predictions.rank1-of-2.jsonl")
    assert Shard(0, 2).all_local_paths(merged)[1] == Shard(1, 2).local_path(merged)
    assert Shard().gather("x") == ["x"] and Shard().share("x") == "x"
