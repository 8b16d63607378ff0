"""``minigpt web``: the Gradio app on 127.0.0.1, through gradio_client and once in headless Chromium."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

from minigpt.infer.chat import ChatEngine
from minigpt.infer.engine import Engine
from minigpt.infer.generate import GenerationOptions

CHROMIUM = Path("/usr/bin/chromium")
QUESTION = "What is it?"


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    from minigpt.model.minigpt import MiniGPT, MiniGPTConfig
    from minigpt.model.processor import MiniGPTProcessor
    from minigpt.model.vision import VisionConfig

    torch.manual_seed(0)
    model = MiniGPT.build(MiniGPTConfig(llm=str(tiny_llama_dir), vision=VisionConfig.tiny(), max_txt_len=32))
    return ChatEngine(
        Engine(model, MiniGPTProcessor.from_config(model.config)), GenerationOptions(max_new_tokens=8), name="tiny"
    )


@pytest.fixture(scope="module")
def url(engine):
    from minigpt.infer.web import build_ui

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = build_ui(engine)
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    demo.queue()
    _, local_url, share_url = demo.launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, share=False
    )
    assert share_url is None and local_url.startswith("http://127.0.0.1:")
    yield local_url
    demo.close()


def expected_answers(engine: ChatEngine, image: Path, *questions: str) -> list[str]:
    chat = engine.chat()
    chat.upload(image)
    return [chat.ask(q) for q in questions]


def text_of(message: dict) -> str:
    """A Chatbot message's text (Gradio 6 sends content as a list of typed parts)."""
    content = message["content"]
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


def test_api_upload_ask_reset(url, engine, image_file):
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    client.predict(handle_file(str(image_file)), api_name="/set_image")
    first, second = expected_answers(engine, image_file, QUESTION, "Sure?")
    messages, box = client.predict(QUESTION, 0, 0.9, 1, 8, api_name="/ask")
    assert box == "" and [(m["role"], text_of(m)) for m in messages] == [("user", QUESTION), ("assistant", first)]
    messages, _ = client.predict("Sure?", 0, 0.9, 1, 8, api_name="/ask")
    assert [text_of(m) for m in messages][2:] == ["Sure?", second]
    # Sampling and beam sliders are accepted; the answer length follows max tokens.
    messages, _ = client.predict("Again?", 0.8, 0.5, 2, 3, api_name="/ask")
    assert len(messages) == 6 and engine.count_tokens(text_of(messages[-1])) <= 4
    image, messages = client.predict(api_name="/reset")
    assert image is None and messages == []


def test_pixel_bomb_upload_is_refused_before_decoding(url, tmp_path):
    from gradio_client import Client, handle_file

    from test_images import png_bomb

    bomb = tmp_path / "bomb.png"  # a grey-level PNG: Gradio's default RGB conversion would decode it
    bomb.write_bytes(png_bomb(13000, 13000))
    with pytest.raises(Exception, match="has 13000x13000 = 169,000,000 pixels, more than the limit of 16,777,216"):
        Client(url, verbose=False).predict(handle_file(str(bomb)), api_name="/set_image")


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs /usr/bin/chromium: apt-get install -y --no-install-recommends chromium"
)
def test_browser_upload_ask_screenshot(url, engine, image_file, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    args = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=args)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.locator("input[type=file]").first.set_input_files(str(image_file))
            expect(page.locator("img[src*='red']").first).to_be_visible(timeout=20_000)
            page.get_by_label("Question").fill(QUESTION)
            page.get_by_role("button", name="Send").click()
            bot = page.locator(".message.bot").last
            expect(bot).to_have_text(expected_answers(engine, image_file, QUESTION)[0], timeout=30_000)
            page.screenshot(path=str(tmp_path / "web.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "web.png").stat().st_size > 10_000
