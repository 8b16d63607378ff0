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

    runs = [engine.generate(convs[0], [image_file], opts)[0] for _ in range(6)]
    assert all(run == runs[0] for run in runs), runs
    single = [engine.generate(conv, [img], opts)[0] for conv, img in zip(convs, images)]
    batched = engine.generate(convs, images, opts)
    assert batched == single
    assert single[0] == runs[0]
    # The caller's mode is given back.
    assert model.training and model.vision.qformer.training and model.llm.training
