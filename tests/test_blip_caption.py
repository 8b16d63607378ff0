"""MiniGPT-4's stage-1 caption cleanup (``blip_caption``) as a dataset option, token-exact on the shared fixture."""

from __future__ import annotations

import json

import pytest

from minigpt.data.formats import pre_caption, read_dataset
from minigpt.data.templates import get_template
from minigpt.data.tokenize import collate, encode_conversation
from minigpt.train.config import DatasetSpec
from test_train_data import _jpeg_bytes, write_shards

CASE = "minigpt4_stage1_vicuna0"


def test_pre_caption_matches_the_original_processor(template_cases):
    inputs = template_cases[CASE]["inputs"]
    assert [pre_caption(c) for c in inputs["raw_captions"]] == inputs["answers"]
    assert pre_caption("  Two   (big) dogs!\n", max_words=2) == "two big"
    assert pre_caption("A\tB  C~D\n") == "a\tb c d"  # a single tab stays, as in LAVIS


@pytest.mark.parametrize("fmt", ["captions_json", "webdataset"])
def test_stage1_tokens_match_the_original_from_raw_captions(fmt, template_cases, llama_tokenizer, tmp_path):
    case = template_cases[CASE]
    config, raw = case["config"], case["inputs"]["raw_captions"]
    if fmt == "captions_json":
        path = tmp_path / "captions.json"
        path.write_text(json.dumps([{"image": f"{i}.jpg", "caption": c} for i, c in enumerate(raw)]))
    else:
        path = tmp_path / "shards"
        write_shards(path, [(f"{i:04d}", _jpeg_bytes(), c) for i, c in enumerate(raw)], per_shard=3)
    spec = DatasetSpec(format=fmt, path=str(path), blip_caption=50)
    samples = list(read_dataset(spec.reader_spec()))
    encoded = [
        encode_conversation(
            s.conversation,
            get_template("caption"),
            llama_tokenizer,
            config["image_positions"],
            max_len=config["max_txt_len"],
        )
        for s in samples
    ]
    batch = collate(encoded, pad_id=config["pad_token_id"], pad_to=case["samples"][0]["length"])
    for row, expected in enumerate(case["samples"]):
        ids = [-1 if img else i for i, img in zip(batch.input_ids[row].tolist(), batch.image_mask[row].tolist())]
        assert ids == expected["input_ids"], row
        assert batch.labels[row].tolist() == expected["labels"], row
        assert batch.attention_mask[row].tolist() == expected["attention_mask"], row
    plain = list(read_dataset(DatasetSpec(format=fmt, path=str(path)).reader_spec()))
    assert [s.conversation.turns[-1].text for s in plain] == raw  # the option is off by default


def test_blip_caption_is_for_caption_formats():
    with pytest.raises(ValueError, match="blip_caption applies to the caption formats, not llava"):
        DatasetSpec(format="llava", path="x.json", blip_caption=50)
    assert DatasetSpec(format="cc_sbu_align", path="cc", blip_caption=100).reader_spec() == {
        "format": "cc_sbu_align",
        "root": "cc",
        "blip_caption": 100,
    }
