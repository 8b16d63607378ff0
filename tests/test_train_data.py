"""Training data: every format through the training path, mixing by ratio, the batch plan (sharding, resuming),
webdataset streams, and bad data (skipped, named, counted; an all-bad dataset is an error)."""

from __future__ import annotations

import io
import json
import random
import shutil
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import logged
from minigpt.data.tokenize import IGNORE_INDEX
from minigpt.tools.shapes import draw_shape
from minigpt.train.config import DatasetSpec, validate_config
from minigpt.train.data import BatchPlan, Item, LoaderSettings, SampleEncoder, Skipped, TrainData, collate_items
from minigpt.train.launch import train
from test_train_support import losses, make_shapes, read_metrics, tiny_config


def _png(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 24), colour).save(path)
    return path


def _jpeg_bytes(colour=(30, 30, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), colour).save(buf, format="JPEG")
    return buf.getvalue()


def write_all_formats(root: Path) -> dict[str, DatasetSpec]:
    """One small file of each format the readers know (3 records each, 4 shards for webdataset)."""
    specs = {}
    llava = [
        {
            "id": f"l{i}",
            "image": f"l{i}.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}],
        }
        for i in range(3)
    ]
    for i in range(3):
        _png(root / "llava" / f"l{i}.png")
    (root / "llava" / "data.json").write_text(json.dumps(llava))
    specs["llava"] = DatasetSpec(format="llava", path=str(root / "llava" / "data.json"))

    ann = [{"image_id": str(i), "caption": f"A blue thing number {i}."} for i in range(3)]
    for i in range(3):
        _png(root / "cc_sbu_align" / "image" / f"{i}.jpg", (30, 30, 200))
    (root / "cc_sbu_align" / "filter_cap.json").write_text(json.dumps({"annotations": ann}))
    specs["cc_sbu_align"] = DatasetSpec(format="cc_sbu_align", path=str(root / "cc_sbu_align"))

    qwen = [
        {"image": f"q{i}.png", "instruction": "<Img><ImageHere></Img> Describe it.", "output": "Green."}
        for i in range(3)
    ]
    for i in range(3):
        _png(root / "qwen" / "img" / f"q{i}.png", (30, 200, 30))
    (root / "qwen" / "data.json").write_text(json.dumps(qwen))
    specs["minigpt4qwen"] = DatasetSpec(
        format="minigpt4qwen", path=str(root / "qwen" / "data.json"), image_root=str(root / "qwen" / "img")
    )
    write_shards(root / "shards", [(f"{i:06d}", _jpeg_bytes(), f"a blue square {i}") for i in range(8)], per_shard=2)
    specs["webdataset"] = DatasetSpec(format="webdataset", path=str(root / "shards"))
    return specs


def write_shards(directory: Path, records: list[tuple[str, bytes, str]], per_shard: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(0, len(records), per_shard):
        path = directory / f"{n // per_shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for key, image, caption in records[n : n + per_shard]:
                for name, data in ((f"{key}.jpg", image), (f"{key}.json", json.dumps({"caption": caption}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


@pytest.fixture()
def encoder(tiny_pair_factory):
    _, processor = tiny_pair_factory()
    return SampleEncoder.for_processor(processor, train=True, seed=1)


def test_every_format_encodes_for_training(tmp_path, encoder):
    from minigpt.data.formats import read_dataset

    specs = write_all_formats(tmp_path)
    for name, spec in specs.items():
        sample = next(iter(read_dataset(spec.reader_spec())))
        item = encoder(sample, (0, 0))
        assert isinstance(item, Item), (name, item)
        assert sum(item.encoded.image_mask) == encoder.image_tokens and len(item.pixels) == 1
        assert item.pixels[0].shape == (3, 56, 56)
        assert any(label != IGNORE_INDEX for label in item.encoded.labels), name
    # Same position -> same random crop; another position -> another crop.
    sample = next(iter(read_dataset(specs["llava"].reader_spec())))
    sample.images = [draw_shape("red", "circle", 48, random.Random(0))]
    a, b, c = encoder(sample, (0, 5)), encoder(sample, (0, 5)), encoder(sample, (0, 6))
    assert torch.equal(a.pixels[0], b.pixels[0]) and not torch.equal(a.pixels[0], c.pixels[0])


def test_map_style_formats_mix_by_ratio(tmp_path, encoder):
    specs = write_all_formats(tmp_path)
    specs["llava"].ratio, specs["cc_sbu_align"].ratio, specs["minigpt4qwen"].ratio = 2, 1, 1
    data = TrainData(
        [specs["llava"], specs["cc_sbu_align"], specs["minigpt4qwen"]],
        encoder,
        seed=0,
        global_batch=4,
        iters_per_epoch=10,
    )
    assert data.steps_per_epoch == 10 and len(data.source) == 40
    for epoch in (0, 1):
        data.source.set_epoch(epoch)
        origins = Counter(Path(data.source[i].origin.rsplit(":", 1)[0]).parent.name for i in range(40))
        assert origins == {"llava": 20, "cc_sbu_align": 10, "qwen": 10}
    items = [data.dataset[key] for key in next(iter(BatchPlan(4, 10, 0, 1)))]
    batch = collate_items(items, pad_id=0)
    assert batch.num_samples == 4 and batch.batch.pixel_values.shape == (4, 3, 56, 56)
    assert batch.num_tokens == int((batch.batch.text.labels[:, 1:] != IGNORE_INDEX).sum()) > 0


def test_batch_plan_is_independent_of_processes_accumulation_and_resuming():
    def step_keys(batch, accum, world, steps=6, per_epoch=3):
        plans = [list(BatchPlan(batch, per_epoch * accum, 0, steps * accum, r, world)) for r in range(world)]
        return [
            sorted({(k.epoch, k.index) for p in plans for b in p[s * accum : (s + 1) * accum] for k in b})
            for s in range(steps)
        ]

    one = step_keys(4, 1, 1)
    assert step_keys(2, 2, 1) == one and step_keys(2, 1, 2) == one and step_keys(1, 2, 2) == one
    assert [k for k, _ in one[2]] == [0] * 4 and [k for k, _ in one[3]] == [1] * 4  # epoch 1 starts at step 3
    full = [[(k.epoch, k.index) for k in b] for b in BatchPlan(2, 6, 0, 12, rank=1, world_size=2)]
    tail = [[(k.epoch, k.index) for k in b] for b in BatchPlan(2, 6, 5, 12, rank=1, world_size=2)]
    assert tail == full[5:]
    stream = [f"s{i}" for i in range(100)]
    streamed = [[k.sample for k in b] for b in BatchPlan(2, 6, 0, 4, rank=1, world_size=2, stream=stream)]
    assert streamed == [["s2", "s3"], ["s6", "s7"], ["s10", "s11"], ["s14", "s15"]]
    resumed = [[k.sample for k in b] for b in BatchPlan(2, 6, 2, 4, rank=1, world_size=2, stream=stream)]
    assert resumed == streamed[2:]


def test_webdataset_mixed_with_json_trains_and_resumes_exactly(tmp_path, tiny_llama_dir):
    specs = write_all_formats(tmp_path / "data")
    shapes = make_shapes(tmp_path / "data", 6)
    datasets = [specs["webdataset"].model_dump(), {"format": "captions_json", "path": str(shapes), "ratio": 0.5}]
    config = tiny_config(
        tiny_llama_dir,
        shapes,
        tmp_path / "full",
        data={"datasets": datasets},
        run={"epochs": 2, "iters_per_epoch": 3, "batch_size": 3, "save_every": 2, "keep_last": 5},
    )
    full = train(validate_config(config))
    assert len(losses(full.history)) == 6
    # Continue from the step-2 checkpoint in a fresh folder: the stream is replayed to the same position.
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_00000002", resumed_dir / "step_00000002")
    config["run"]["output_dir"] = str(tmp_path / "resumed")
    again = train(validate_config(config))
    assert losses(again.history) == losses(full.history)[2:]
    for (n, a), (_, b) in zip(full.model.trainable_parameters(), again.model.trainable_parameters()):
        assert torch.equal(a, b), n


def test_streamed_data_needs_iters_per_epoch(tmp_path, encoder):
    specs = write_all_formats(tmp_path)
    with pytest.raises(ValueError, match="iters_per_epoch is required"):
        TrainData([specs["webdataset"]], encoder, seed=0, global_batch=2)


def _bad_set(root: Path) -> Path:
    """12 good shapes, a truncated PNG, a missing file and a record without caption."""
    path = make_shapes(root, 12)
    records = json.loads(path.read_text())
    good = (root / records[0]["image"]).read_bytes()
    (root / "images" / "truncated.png").write_bytes(good[: len(good) // 2])
    records += [
        {"image": "images/truncated.png", "caption": "a broken picture"},
        {"image": "images/not_there.png", "caption": "a lost picture"},
        {"image": records[0]["image"], "caption_typo": "no caption key"},
    ]
    path.write_text(json.dumps(records))
    return path


def test_bad_samples_are_skipped_named_and_counted(tmp_path, tiny_llama_dir):
    path = _bad_set(tmp_path / "data")
    # 14 readable records, batch 7: each epoch sees every record, so both bad images once per epoch.
    config = tiny_config(tiny_llama_dir, path, tmp_path / "out", run={"epochs": 2, "batch_size": 7})
    with logged() as caught:
        result = train(validate_config(config))
    messages = [w.message for w in caught]
    assert sum("truncated.png" in m for m in messages) == 1  # logged once, not again in the second epoch
    assert any("not_there.png" in m and "not found" in m for m in messages)
    assert any(f"{path}:14" in m and "caption" in m for m in messages)  # the malformed record, by file:index
    records = read_metrics(tmp_path / "out")
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 4 and all(r["loss"] is not None for r in steps)
    assert steps[-1]["skipped"] == 4 and steps[-1]["skipped_records"] == 1
    assert sum(r["samples"] for r in steps) == 24  # 28 drawn, 4 skipped
    assert (tmp_path / "out" / "final" / "projector.safetensors").is_file()
    assert result.step == 4


def test_a_micro_batch_of_only_bad_samples_does_not_change_the_step(tmp_path, tiny_llama_dir):
    from minigpt.train.loop import Trainer
    from minigpt.train.strategy import Strategy

    empty = collate_items([Skipped("a.png", "missing"), Skipped("b.png", "corrupt")], pad_id=0)
    assert empty.empty and empty.num_tokens == 0 and [s.origin for s in empty.skipped] == ["a.png", "b.png"]
    path = make_shapes(tmp_path / "data", 4)
    config = validate_config(tiny_config(tiny_llama_dir, path, tmp_path / "out", run={"batch_size": 2}))
    trainers = [Trainer(config, Strategy("cpu", "no")) for _ in range(2)]
    good = next(iter(trainers[0].data.loader(LoaderSettings(2, 1, trainers[0].pad_id), range(0, 1))))
    with logged("skipped a.png: missing"):
        with_empty = trainers[0].train_step([empty, good])  # the empty one runs a stand-in batch with weight 0
    alone = trainers[1].train_step([good])
    assert with_empty["loss"] == alone["loss"] and with_empty["skipped"] == 2
    for (n, a), (_, b) in zip(trainers[0].model.trainable_parameters(), trainers[1].model.trainable_parameters()):
        assert torch.equal(a, b), n


def test_a_dataset_without_any_valid_record_is_an_error(tmp_path, tiny_llama_dir):
    root = tmp_path / "data"
    root.mkdir()
    records = [{"image": f"missing_{i}.png", "caption": "nothing"} for i in range(5)]
    (root / "bad.json").write_text(json.dumps(records))
    config = tiny_config(tiny_llama_dir, root / "bad.json", tmp_path / "out")
    with pytest.raises(ValueError, match=r"bad.json: no valid record \(5 skipped; first: .*missing_0.png"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train(validate_config(config))
    (root / "empty.json").write_text(json.dumps([{"caption": "no image key"}]))
    config["data"]["datasets"][0]["path"] = str(root / "empty.json")
    with pytest.raises(ValueError, match="no valid record"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train(validate_config(config))


def test_dataloader_workers_change_nothing(tmp_path, encoder):
    specs = write_all_formats(tmp_path)
    shapes = DatasetSpec(format="captions_json", path=str(make_shapes(tmp_path, 6)))
    for chosen in ([specs["llava"], shapes], [specs["webdataset"], shapes]):
        runs = []
        for workers in (0, 2):
            data = TrainData(chosen, encoder, seed=3, global_batch=3, iters_per_epoch=3)
            batches = list(data.loader(LoaderSettings(3, 1, pad_id=0, num_workers=workers), range(1, 5)))  # 2 epochs
            runs.append(batches)
        assert len(runs[0]) == len(runs[1]) == 4
        for a, b in zip(*runs):
            assert torch.equal(a.batch.text.input_ids, b.batch.text.input_ids)
            assert torch.equal(a.batch.pixel_values, b.batch.pixel_values)


def test_images_over_the_pixel_limit_are_skipped_and_named(tmp_path, tiny_llama_dir):
    path = make_shapes(tmp_path / "data", 4)  # 32x32 pictures
    config = tiny_config(tiny_llama_dir, path, tmp_path / "out")
    assert validate_config(config).data.max_image_pixels == 4096 * 4096
    config["data"]["max_image_pixels"] = 1000
    with pytest.raises(
        ValueError,
        match=r"4 skipped; first: .*\.png \(in .*train.json:0\) has 32x32 = 1,024 pixels, "
        r"more than the limit of 1,000\)$",
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train(validate_config(config))


def test_malformed_webdataset_samples_and_empty_answers_count_as_skipped_records(tmp_path, tiny_llama_dir):
    shards = tmp_path / "shards"
    write_shards(
        shards,
        [("a0", _jpeg_bytes(), "")] + [(f"g{i}", _jpeg_bytes(), f"a blue square {i}") for i in range(8)],
        per_shard=9,
    )
    with tarfile.open(shards / "00000.tar", "a") as tar:  # a sample without caption after the good ones
        info = tarfile.TarInfo("z9.jpg")
        info.size = len(_jpeg_bytes())
        tar.addfile(info, io.BytesIO(_jpeg_bytes()))
    json_path = make_shapes(tmp_path / "data", 4)
    records = json.loads(json_path.read_text())
    records[0]["caption"] = "  "  # an empty answer: skipped at reading, counted
    json_path.write_text(json.dumps(records))
    # The stream is counted as the loader reads it, one micro-batch ahead: 9 samples in 3 steps read a0 (skipped),
    # g0-g7, z9 (skipped) and, on the second pass, a0 (skipped) again, g0.
    for spec, per_step in (
        ({"format": "webdataset", "path": str(shards)}, [1, 3, 3]),
        ({"format": "captions_json", "path": str(json_path)}, [1, 1, 1]),
    ):
        out = tmp_path / spec["format"]
        config = tiny_config(
            tiny_llama_dir,
            json_path,
            out,
            data={"datasets": [spec]},
            run={"iters_per_epoch": 3, "batch_size": 3 if spec["format"] == "webdataset" else 1},
        )
        with logged() as caught:
            train(validate_config(config))
        assert [r["skipped_records"] for r in read_metrics(out) if "loss" in r] == per_step, spec["format"]
        messages = [w.message for w in caught]
        assert any("caption must be a non-empty string" in m for m in messages)


def test_trainer_batches_are_the_processors_batches(tmp_path, tiny_pair_factory):
    """Training encodes through the processor: a loader batch equals ``processor.prepare(train=True)`` of its samples,
    and an augmented sample equals ``prepare`` with the augmenting transform seeded as the loader seeds it."""
    from minigpt.train.data import Key

    _, processor = tiny_pair_factory()
    shapes = DatasetSpec(format="captions_json", path=str(make_shapes(tmp_path, 6)))
    plain = SampleEncoder.for_processor(processor, train=False)
    data = TrainData([shapes], plain, seed=3, global_batch=3, iters_per_epoch=2)
    (loaded,) = data.loader(LoaderSettings(3, 1, processor.pad_token_id), range(0, 1))
    data.source.set_epoch(0)
    samples = [data.source[i] for i in range(3)]
    prepared = processor.prepare([s.conversation for s in samples], [s.images for s in samples], train=True)
    for name in ("input_ids", "attention_mask", "labels", "image_mask"):
        assert torch.equal(getattr(loaded.batch.text, name), getattr(prepared.text, name)), name
    assert torch.equal(loaded.batch.pixel_values, prepared.pixel_values)

    augmenting = SampleEncoder.for_processor(processor, train=True, seed=3, hflip=True)
    item = TrainData([shapes], augmenting, seed=3, global_batch=3, iters_per_epoch=2).dataset[Key(0, 1)]
    transform = processor.image_transform(augment=True, hflip=True)
    transform.rng.seed("3:(0, 1)")
    one = processor.prepare([samples[1].conversation], [samples[1].images], train=True, transform=transform)
    assert item.encoded.input_ids == one.text.input_ids[0].tolist()
    assert torch.equal(item.pixels[0], one.pixel_values[0]) and not torch.equal(
        item.pixels[0], prepared.pixel_values[1]
    )
