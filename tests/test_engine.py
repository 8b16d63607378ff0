"""The inference engine: generation runs in eval mode whatever mode the caller left the model in."""

from __future__ import annotations

import pytest
import torch
from PIL import Image as PILImage
from torch import nn

from minigpt.data.conversation import Conversation
from minigpt.infer.decoding import DecodingSettings
from minigpt.infer.engine import Engine
from minigpt.infer.generate import GenerationOptions
from minigpt.model.config import PARTS


def _with_dropout(model, p: float = 0.5):
    """Every dropout of the model (Q-Former / vision nn.Dropout modules and the LLM's attention dropout) at ``p``."""
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
            changed += 1
        if hasattr(module, "attention_dropout") and isinstance(module.attention_dropout, float):
            module.attention_dropout = p
            changed += 1
    model.llm.config.attention_dropout = p
    assert changed > 0
    return model


@pytest.mark.parametrize("mode", ["plain", "static"])
def test_generation_in_train_mode_with_dropout_is_deterministic(tiny_pair_factory, image_file, tmp_path, mode):
    model, processor = tiny_pair_factory(freeze={part: False for part in PARTS}, max_txt_len=64)
    engine = Engine(_with_dropout(model), processor, DecodingSettings(mode, cuda_graphs=False))
    model.train()  # e.g. generating samples in the middle of training; Engine() itself put it in eval mode
    assert model.training and model.vision.qformer.training and model.llm.training
    blue, green = tmp_path / "blue.png", tmp_path / "green.png"
    PILImage.new("RGB", (20, 20), (0, 0, 255)).save(blue)
    PILImage.new("RGB", (30, 20), (0, 200, 0)).save(green)
    convs = [
        Conversation.single("<Img><ImageHere></Img> Hi"),
        Conversation.single("<Img><ImageHere></Img> A much longer question about the picture here?"),
        Conversation.single("<Img><ImageHere></Img> What colour?"),
    ]
    images = [image_file, blue, green]
    opts = GenerationOptions(max_new_tokens=8, min_new_tokens=8)
    with torch.no_grad():  # the dropout is live: in train mode the same image gives other visual tokens each time
        pixels = processor.prepare(convs[:1], [image_file]).pixel_values
        assert not torch.equal(model.encode_images(pixels), model.encode_images(pixels))

    runs = [engine.generate(convs[0], [image_file], opts)[0].text for _ in range(6)]
    assert all(run == runs[0] for run in runs), runs
    single = [engine.generate(conv, [img], opts)[0].text for conv, img in zip(convs, images)]
    batched = [a.text for a in engine.generate(convs, images, opts)]
    assert batched == single
    assert single[0] == runs[0]
    # The caller's mode is given back.
    assert model.training and model.vision.qformer.training and model.llm.training


@pytest.mark.parametrize("mode", ["plain", "static"])
def test_each_answer_says_what_was_generated_and_why_it_ended(tiny_pair_factory, image_file, mode):
    model, processor = tiny_pair_factory()
    engine = Engine(model, processor, DecodingSettings(mode, cuda_graphs=False))
    conv = Conversation.single("<Img><ImageHere></Img> Tell me")
    full = engine.generate(conv, [image_file], max_new_tokens=10, min_new_tokens=10)[0]  # keyword options
    assert full.finish_reason == "length" and full.completion_tokens == len(full.token_ids) == 10
    assert full.prompt_tokens == len(processor.encode(conv, train=False))
    assert full.text == processor.decode(full.token_ids)
    words = full.text.split()
    assert len(words) >= 2, full.text
    cut = engine.generate(conv, [image_file], GenerationOptions(max_new_tokens=10, min_new_tokens=10, stop=[words[1]]))
    ids = cut[0].token_ids
    assert cut[0].finish_reason == "stop_string" and len(ids) < 10 and ids == full.token_ids[: len(ids)]
    assert words[1] in processor.tokenizer.decode(ids) and words[1] not in processor.tokenizer.decode(ids[:-1])

    free = engine.generate(conv, [image_file], max_new_tokens=10)[0]
    k = next(i for i, token in enumerate(free.token_ids) if i > 0 and token not in free.token_ids[:i])
    processor.end_token_ids = lambda: [free.token_ids[k]]  # that token now ends an answer
    ended = Engine(model, processor, DecodingSettings(mode, cuda_graphs=False)).generate(conv, [image_file])[0]
    assert ended.finish_reason == "stop" and ended.token_ids == free.token_ids[: k + 1]


def test_ask_is_one_question_without_placeholders(tiny_pair_factory, image_file):
    engine = Engine(*tiny_pair_factory())
    conv = Conversation.single("<Img><ImageHere></Img> What is it?")  # the template's image separator is a space
    expected = engine.generate(conv, [image_file], GenerationOptions(max_new_tokens=6))[0].text
    assert engine.ask(image_file, "What is it?", max_new_tokens=6) == expected
    assert engine.ask([image_file], "What is it?", max_new_tokens=6) == expected
    with pytest.raises(TypeError, match="unknown generation option"):
        engine.ask(image_file, "What is it?", max_tokens=6)


def test_the_decoding_choice_is_made_once_and_reported(tiny_pair_factory, caplog):
    import logging

    model, processor = tiny_pair_factory()
    with caplog.at_level(logging.INFO, logger="minigpt.infer.engine"):
        engine = Engine(model, processor)
    assert str(engine.decoding_choice) == "plain (auto: no graph capture on cpu)" and engine.decoding.mode == "auto"
    assert "decoding: plain (auto: no graph capture on cpu)" in caplog.text
    engine.decoding = DecodingSettings("static")
    assert engine.decoding_choice.mode == "static" and engine.static() and not engine.static(num_beams=2)
