"""Device maps at inference (``--device-map`` / ``LoadSpec.device_map``): the LLM split by accelerate's dispatch (on
this cpu-only machine: layers run on the cpu and layers offloaded to disk, brought in by the hooks per forward) gives
the greedy answers of the unsplit model; the decoding falls back to plain; the flags reach the LoadSpec."""

from __future__ import annotations

import argparse

import pytest
import torch

from minigpt.device import first_mapped_device, parse_max_memory
from minigpt.infer.args import add_model_arguments, spec_from_args
from minigpt.infer.decoding import DecodingSettings
from minigpt.infer.engine import Engine
from minigpt.infer.loading import parse_device_map

QUESTIONS = ["Describe the picture.", "What colour is it?", "Is there a cat?"]
#: layer 1 and the LM head offloaded to disk, the rest on the cpu
SPLIT = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "disk",
}


def _answers(engine: Engine, image_file) -> list[list[int]]:
    from minigpt.data.conversation import Conversation, Image
    from minigpt.data.templates import user_parts

    conversations = []
    for question in QUESTIONS:
        conversation = Conversation()
        conversation.add("user", user_parts(engine.processor.template, [Image(), question]))
        conversations.append(conversation)
    out = engine.generate(conversations, [[str(image_file)]] * len(QUESTIONS), max_new_tokens=12)
    return [g.token_ids for g in out]


def _offloaded(llm) -> list[str]:
    """Modules whose weights the dispatch hooks hold off the device (on meta, brought in per forward)."""
    return [
        name
        for name, module in llm.named_modules()
        if hasattr(module, "_hf_hook") and any(p.device.type == "meta" for p in module.parameters(recurse=False))
    ]


@pytest.fixture(scope="module")
def unsplit_answers(tiny_model_dir, image_file_module):
    engine = Engine.from_pretrained(tiny_model_dir, device="cpu")
    return _answers(engine, image_file_module)


@pytest.fixture(scope="module")
def image_file_module(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "red.png"
    Image.new("RGB", (40, 30), (220, 20, 20)).save(path)
    return path


def test_a_device_map_with_disk_offload_gives_the_unsplit_greedy_answers(
    tiny_model_dir, image_file_module, unsplit_answers, tmp_path
):
    engine = Engine.from_pretrained(
        tiny_model_dir, device="cpu", device_map=SPLIT, offload_folder=str(tmp_path / "offload")
    )
    llm = engine.model.llm
    assert llm.hf_device_map == SPLIT
    assert {"model.layers.1.self_attn.q_proj", "lm_head"} <= set(_offloaded(llm))  # real hooks, weights on disk
    assert engine.model.projector_weight.device.type == "cpu"
    assert engine.decoding_choice.mode == "plain" and "device map" in engine.decoding_choice.reason
    answers = _answers(engine, image_file_module)
    assert answers == unsplit_answers and all(answers)


def test_auto_within_max_memory_offloads_the_rest_and_answers_the_same(
    tiny_model_dir, image_file_module, unsplit_answers
):
    # The tiny LLaMA's embedding and LM head are 8.2 MB each (32000 x 64 fp32); accelerate keeps room for the largest
    # offloaded module, so 16.5 MB of cpu holds the embedding alone and the rest goes to disk.
    engine = Engine.from_pretrained(tiny_model_dir, device="cpu", device_map="auto", max_memory="cpu=16500000")
    device_map = engine.model.llm.hf_device_map
    assert device_map["model.embed_tokens"] == "cpu" and device_map["model.layers"] == "disk", device_map
    assert _offloaded(engine.model.llm)
    assert _answers(engine, image_file_module) == unsplit_answers


def test_static_decoding_asked_for_falls_back_to_plain_with_the_reason(tiny_model_dir, tmp_path):
    engine = Engine.from_pretrained(
        tiny_model_dir,
        device="cpu",
        device_map=SPLIT,
        offload_folder=str(tmp_path),
        decoding=DecodingSettings("static"),
    )
    choice = engine.decoding_choice
    assert choice.mode == "plain" and "device map splits it (cpu, disk)" in choice.reason
    assert not engine.static()


def test_max_memory_forms_and_errors():
    assert parse_max_memory("0=20GiB, 1=20GiB,cpu=30GiB") == {0: "20GiB", 1: "20GiB", "cpu": "30GiB"}
    assert parse_max_memory('{"0": "20GiB", "cpu": "30GiB"}') == {0: "20GiB", "cpu": "30GiB"}
    assert parse_max_memory({0: 1000, "cuda:1": "1GB"}) == {0: 1000, 1: "1GB"}
    with pytest.raises(ValueError, match="use DEVICE=SIZE pairs"):
        parse_max_memory("20GiB")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        parse_max_memory("gpu0=20GiB")
    with pytest.raises(ValueError, match=r"0='lots' is not a size"):
        parse_max_memory("0=lots")


def test_device_map_forms_and_placement(tmp_path):
    assert parse_device_map("auto") == "auto"
    assert parse_device_map('{"model": 0, "lm_head": "cpu"}') == {"model": 0, "lm_head": "cpu"}
    path = tmp_path / "map.json"
    path.write_text('{"": "cpu"}')
    assert parse_device_map(str(path)) == {"": "cpu"}
    with pytest.raises(ValueError, match="not a JSON object"):
        parse_device_map("{model")
    assert first_mapped_device(["cpu", 1, "disk"], "cuda") == torch.device("cuda", 1)
    assert first_mapped_device(["cpu", "disk"], "cuda") == torch.device("cpu")


def test_flags_reach_the_load_spec():
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    parser.add_argument("--decoding", default="auto")
    parser.add_argument("--cuda-graphs", default=True)
    parser.add_argument("--compile-decode", default=False)
    args = parser.parse_args(
        ["m", "--device-map", "auto", "--max-memory", "0=20GiB,cpu=30GiB", "--offload-folder", "o"]
    )
    spec = spec_from_args(args)
    assert (spec.device_map, spec.max_memory, spec.offload_folder) == ("auto", "0=20GiB,cpu=30GiB", "o")


def test_max_memory_without_a_device_map_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="need --device-map"):
        Engine.from_pretrained(tiny_model_dir, device="cpu", max_memory="cpu=1GB")
