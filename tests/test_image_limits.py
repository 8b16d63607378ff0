"""The pixel limit of chat, web and server (``--max-image-pixels``): images over it are refused from their header."""

from __future__ import annotations

import argparse

import pytest

from minigpt.data.images import DEFAULT_MAX_PIXELS, ImageTooLargeError
from minigpt.infer.args import add_model_arguments, image_limit
from minigpt.infer.chat import ChatEngine
from test_images import png_bomb


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    return parser.parse_args(["model", *argv])


def test_option_default_zero_and_negative():
    assert image_limit(_args()) == DEFAULT_MAX_PIXELS
    assert image_limit(_args("--max-image-pixels", "0")) is None
    assert image_limit(_args("--max-image-pixels", "50000000")) == 50_000_000
    with pytest.raises(ValueError, match="--max-image-pixels must be 0 .* got -1"):
        image_limit(_args("--max-image-pixels", "-1"))


def test_chat_refuses_images_over_the_engine_limit(tiny_pair_factory, image_file, tmp_path):
    from minigpt.infer.engine import Engine

    engine = ChatEngine(Engine(*tiny_pair_factory()))
    chat = engine.chat()
    (tmp_path / "bomb.png").write_bytes(png_bomb(13000, 13000))
    with pytest.raises(ImageTooLargeError, match="bomb.png has 13000x13000 = 169,000,000 pixels"):
        chat.set_images(tmp_path / "bomb.png")
    engine.max_image_pixels = 1000
    with pytest.raises(ImageTooLargeError, match="red.png has 40x30 = 1,200 pixels, more than the limit of 1,000"):
        chat.upload(image_file)
    engine.max_image_pixels = 1200
    chat.upload(image_file)
    assert chat.image_names == [str(image_file)]
    # Decoded once: the model's processor does not check (or decode) it again.
    engine.processor.image_processor.max_pixels = 1
    assert engine.processor.image_processor(chat.images[0].image).shape == (3, 56, 56)
