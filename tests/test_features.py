"""Visual-feature cache: round trip, the same training losses with and without the cache, and clear refusals when
the cache does not apply (trainable encoder, augmentation, other weights, images not cached)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from minigpt.cli import main
from minigpt.data.features import FeatureCache, FeatureOptions, cache_features, image_key, open_feature_cache
from minigpt.data.formats import read_dataset
from minigpt.data.images import ImageProcessor
from minigpt.model.vision import Blip2VisionEncoder, VisionConfig
from minigpt.train.config import ConfigError, validate_config
from minigpt.train.launch import train
from test_train_support import losses, make_shapes, tiny_config, write_yaml


def _encoder(seed: int = 0) -> Blip2VisionEncoder:
    torch.manual_seed(seed)
    return Blip2VisionEncoder(VisionConfig.tiny()).eval()


def test_image_key_hashes_the_bytes(tmp_path, image_file):
    copy = tmp_path / "elsewhere" / "copy.png"
    copy.parent.mkdir()
    shutil.copy(image_file, copy)
    assert image_key(image_file) == image_key(copy) == image_key(image_file.read_bytes())
    other = make_shapes(tmp_path / "d", 2)
    first, second = (tmp_path / "d" / r["image"] for r in json.loads(other.read_text()))
    assert image_key(first) != image_key(second)
    with pytest.raises(ValueError, match="cannot read image"):
        image_key(tmp_path / "missing.png")


def test_cache_round_trip_and_resume(tmp_path):
    data = make_shapes(tmp_path / "data", 10)
    samples = read_dataset({"format": "captions_json", "path": str(data)})
    encoder = _encoder()
    out = tmp_path / "cache"
    report = cache_features(
        encoder, samples, out, FeatureOptions(dtype="float32", batch_size=4, shard_size=3, workers=2)
    )
    assert (report.images, report.written, report.reused, report.skipped) == (10, 10, 0, [])
    cache = FeatureCache(out)
    assert len(cache) == 10 and len(cache.shards) == 4  # 3 + 3 + 3 + 1
    processor = ImageProcessor(56, train=False)
    with torch.no_grad():
        for sample in samples:
            expected = encoder(processor(sample.images[0]).unsqueeze(0))[0]
            torch.testing.assert_close(cache.lookup(sample.images[0]), expected, atol=1e-6, rtol=1e-6)
    again = cache_features(encoder, samples, out, FeatureOptions(dtype="float32"))
    assert (again.written, again.reused) == (0, 10)
    with pytest.raises(ValueError, match="other vision weights"):
        cache_features(_encoder(seed=1), samples, out, FeatureOptions(dtype="float32"))
    half = cache_features(encoder, samples, tmp_path / "half", FeatureOptions(batch_size=16))  # float16, the default
    assert (
        half.written == 10
        and FeatureCache(tmp_path / "half").get(image_key(samples[0].images[0])).dtype == torch.float16
    )


def test_unreadable_images_are_reported_and_their_samples_skipped_in_training(tmp_path):
    data = make_shapes(tmp_path / "data", 4)
    records = json.loads(data.read_text())
    (tmp_path / "data" / records[0]["image"]).write_bytes(b"not an image")
    report = cache_features(_encoder(), read_dataset({"format": "captions_json", "path": str(data)}), tmp_path / "c")
    assert report.written == 3 and len(report.skipped) == 1 and "cannot read image" in report.skipped[0][1]
    with pytest.raises(ValueError, match="not in the feature cache"):
        FeatureCache(tmp_path / "c").lookup(tmp_path / "data" / records[0]["image"])


def _config(tmp_path, llm_dir, train_json, name, **data):
    config = tiny_config(
        llm_dir, train_json, tmp_path / name, data={"augment": False, **data}, run={"max_steps": 3, "batch_size": 4}
    )
    return config


def test_same_losses_with_and_without_the_cache(tmp_path, tiny_llama_dir):
    train_json = make_shapes(tmp_path / "data", 16)
    plain = _config(tmp_path, tiny_llama_dir, train_json, "plain")
    reference = losses(train(validate_config(plain)).history)
    # The cache is written by the CLI from the training config: its datasets and its (seeded, random) encoder.
    yaml_path = write_yaml(tmp_path / "plain.yaml", plain)
    for dtype, tolerance in (("float32", 1e-5), ("float16", 2e-3)):
        out = tmp_path / f"cache-{dtype}"
        assert (
            main(
                [
                    "data",
                    "cache-features",
                    "--config",
                    str(yaml_path),
                    "--out",
                    str(out),
                    "--dtype",
                    dtype,
                    "--device",
                    "cpu",
                    "--workers",
                    "1",
                ]
            )
            == 0
        )
        cached = _config(tmp_path, tiny_llama_dir, train_json, f"cached-{dtype}", feature_cache=str(out))
        result = train(validate_config(cached))
        assert losses(result.history) == pytest.approx(reference, abs=tolerance)
    # ... and with packing on top (images reordered with their samples)
    packed = _config(
        tmp_path,
        tiny_llama_dir,
        train_json,
        "cached-packed",
        feature_cache=str(tmp_path / "cache-float32"),
        packing=True,
        pack_len=64,
    )
    assert losses(train(validate_config(packed)).history) == pytest.approx(reference, abs=1e-5)


def test_the_cache_is_refused_where_it_does_not_apply(tmp_path, tiny_llama_dir):
    train_json = make_shapes(tmp_path / "data", 8)
    config = _config(tmp_path, tiny_llama_dir, train_json, "x", feature_cache=str(tmp_path / "c"))
    config["data"]["augment"] = True
    with pytest.raises(ConfigError, match="augment: false"):
        validate_config(config)
    config["data"]["augment"] = False
    config["model"]["freeze"] = {"qformer": False}
    with pytest.raises(ConfigError, match="qformer train"):
        validate_config(config)
    # A cache of another encoder is refused when training opens it.
    samples = read_dataset({"format": "captions_json", "path": str(train_json)})
    cache_features(_encoder(seed=123), samples, tmp_path / "c")
    from minigpt.train.loop import build_model

    section = validate_config(_config(tmp_path, tiny_llama_dir, train_json, "y")).model
    with pytest.raises(ValueError, match="other vision weights"):
        open_feature_cache(tmp_path / "c", build_model(section, seed=7), augment=False)
    with pytest.raises(FileNotFoundError, match="not a feature cache"):
        FeatureCache(tmp_path / "data")
