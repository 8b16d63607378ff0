"""``minigpt serve``: a live uvicorn server on 127.0.0.1, exercised with the ``openai`` client."""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import torch
from openai import OpenAI
from PIL import Image as PILImage

from minigpt.infer.chat import ChatEngine
from minigpt.infer.decoding import DecodingSettings
from minigpt.infer.engine import Engine
from minigpt.infer.generate import GenerationOptions
from minigpt.infer.server import ServerSettings, create_app
from test_images import png_bomb

KEY = "test-key"
QUESTION = "What is it?"


@contextlib.contextmanager
def serve(engine: ChatEngine, settings: ServerSettings) -> Iterator[str]:
    """Run ``create_app(engine, settings)`` with uvicorn in a thread; yields the base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(engine, settings), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module", params=["one-at-a-time", "batched"])
def engine(request, tiny_llama_dir):
    """The server's engine: transformers' generate under a lock, or continuous batching on the slot decoder."""
    from minigpt.model.minigpt import MiniGPT, MiniGPTConfig
    from minigpt.model.processor import MiniGPTProcessor
    from minigpt.model.vision import VisionConfig

    torch.manual_seed(0)
    model = MiniGPT.build(MiniGPTConfig(llm=str(tiny_llama_dir), vision=VisionConfig.tiny(), max_txt_len=32))
    batched = request.param == "batched"
    decoding = DecodingSettings("static" if batched else "plain")
    engine = ChatEngine(
        Engine(model, MiniGPTProcessor.from_config(model.config), decoding),
        GenerationOptions(max_new_tokens=10),
        max_context=512,
        name="tiny",
        batch_slots=4 if batched else 1,
    )
    assert engine.engine.batching == batched
    yield engine
    engine.close()


SETTINGS = dict(api_key=KEY, max_request_bytes=400_000, max_image_bytes=60_000, max_queue=8)


@pytest.fixture(scope="module")
def url(engine):
    with serve(engine, ServerSettings(**SETTINGS)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)


def png_url(image: PILImage.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


RED = PILImage.new("RGB", (40, 30), (220, 20, 20))


def ask(url: str | None = "", text: str = QUESTION) -> list[dict]:
    """One user message: an image (``""``: the red PNG; ``None``: none) then ``text``."""
    parts = [{"type": "image_url", "image_url": {"url": url or png_url(RED)}}] if url is not None else []
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def expected_answer(engine: ChatEngine) -> str:
    chat = engine.chat()
    chat.upload(RED)
    return chat.ask(QUESTION)


def test_models(client):
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_completion_matches_the_chat_api(client, engine):
    reply = client.chat.completions.create(model="tiny", messages=ask())
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected_answer(engine)
    assert choice.finish_reason in ("stop", "length") and reply.usage.prompt_tokens > 8  # 8 image positions


def test_stream(client, engine):
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=ask(), stream=True, stream_options={"include_usage": True}
        )
    )
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1 and "".join(deltas) == expected_answer(engine)
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage.completion_tokens > 0


def test_usage_is_exact_and_a_request_is_tokenized_once(client, engine, monkeypatch):
    chat = engine.chat()
    chat.upload(RED)
    prompt = chat.prepare(QUESTION)
    answer = engine.generate(prompt.batch, options=prompt.options)  # what the scheduler generated
    tokenized = []
    processor_type = type(engine.processor)
    for name in ("encode", "count_tokens"):
        original = getattr(processor_type, name)
        monkeypatch.setattr(
            processor_type, name, lambda self, *a, _f=original, **k: tokenized.append(1) or _f(self, *a, **k)
        )
    reply = client.chat.completions.create(model="tiny", messages=ask())
    assert len(tokenized) == 1
    assert reply.choices[0].message.content == answer.text == engine.processor.decode(answer.token_ids)
    usage = reply.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        prompt.batch.text.input_ids.shape[1],
        len(answer.token_ids),
    )
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert reply.choices[0].finish_reason == {"length": "length"}.get(answer.finish_reason, "stop")
    tokenized.clear()
    stream = client.chat.completions.create(
        model="tiny", messages=ask(), stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert len(tokenized) == 1 and chunks[-1].usage == usage


def test_four_concurrent_requests(client, engine):
    expected = expected_answer(engine)

    def one(i: int) -> str:
        if i % 2:
            stream = client.chat.completions.create(model="tiny", messages=ask(), stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream)
        return client.chat.completions.create(model="tiny", messages=ask()).choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(one, range(4))) == [expected] * 4


def test_multi_turn_text_and_system(client):
    messages = [
        {"role": "system", "content": "Be brief."},
        *ask(),
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": "Sure?"},
    ]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3


def status_of(client: OpenAI, **kwargs) -> tuple[int, str]:
    kwargs.setdefault("model", "tiny")
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**kwargs)
    return info.value.status_code, info.value.message


def active_requests(base: str) -> int:
    return httpx.get(base.removesuffix("/v1") + "/health").json()["active"]


def test_api_key_required(url):
    with pytest.raises(openai.AuthenticationError, match="API key"):
        OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    assert status_of(OpenAI(base_url=url, api_key="wrong", max_retries=0), messages=ask())[0] == 401
    no_key = httpx.post(url + "/chat/completions", json={"model": "tiny", "messages": ask()})
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"


def test_bad_input_is_a_clear_4xx(client, url):
    noise = PILImage.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8))
    bomb_url = "data:image/png;base64," + base64.b64encode(png_bomb(13000, 13000)).decode()  # 82 bytes
    cases = [
        (ask("data:image/png;base64,not*base64!"), 400, "invalid base64"),
        (ask("data:image/png;base64," + base64.b64encode(b"plain text").decode()), 400, "not a readable image"),
        (ask("data:text/plain;base64,aGVsbG8="), 400, "not an image"),
        (ask(png_url(noise)), 413, "image larger than 60000 bytes"),
        (ask(bomb_url), 413, "13000x13000 = 169,000,000 pixels, more than the limit of 16,777,216"),
        (ask(None, "x" * 500_000), 413, "request body larger than 400000 bytes"),
        (ask("/etc/hostname"), 400, "--allow-local-images"),
        (ask("https://example.com/cat.png"), 400, "not fetched"),
        (ask(None, "a <ImageHere> b"), 400, "ImageHere"),
        ([{"role": "tool", "content": "x"}], 400, "unsupported role"),
        (ask(None, "word " * 600), 400, "exceeds the context"),
    ]
    for messages, status, message in cases:
        code, text = status_of(client, messages=messages)
        assert (code, message in text) == (status, True), text
    code, text = status_of(client, messages=ask(), model="gpt-4o")
    assert code == 404 and "model 'gpt-4o' not found" in text
    assert status_of(client, messages=ask(), n=2)[0] == 400
    assert status_of(client, messages="not a list")[0] == 400
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for value in ("NaN", "Infinity", "-0.5"):  # NaN was taken as greedy; JSON clients can send these literals
        body = '{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "temperature": ' + value + "}"
        answer = httpx.post(url + "/chat/completions", content=body, headers=headers)
        assert answer.status_code == 400, (value, answer.text)
        assert "temperature must be a finite number >= 0 (0 = greedy)" in answer.json()["error"]["message"]
    assert active_requests(url) == 0  # refused requests gave their queue slot back


def test_local_images_only_inside_the_allowed_dir(engine, tmp_path, image_file):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "red.png").write_bytes(image_file.read_bytes())
    with serve(engine, ServerSettings(**{**SETTINGS, "allow_local_images": str(allowed)})) as base:
        client = OpenAI(base_url=base, api_key=KEY, max_retries=0)
        for path in (str(allowed / "red.png"), "red.png", f"file://{allowed}/red.png"):
            assert client.chat.completions.create(model="tiny", messages=ask(path)).choices[0].message.content
        assert status_of(client, messages=ask(str(image_file)))[0] == 403
        assert status_of(client, messages=ask("../red.png"))[0] == 403


def held(lock) -> bool:
    """Whether another thread holds ``lock`` (the engine's generation lock)."""
    if lock.acquire(blocking=False):
        lock.release()
        return False
    return True


def test_full_queue_answers_429_and_a_dropped_stream_frees_the_model(engine):
    gate = threading.Event()

    class Gated(ChatEngine):
        def generate(self, *args, **kwargs):
            gate.wait(30)
            return super().generate(*args, **kwargs)

    inner = engine.engine
    gated = Gated(Engine(inner.model, inner.processor, inner.decoding), engine.options, name="tiny")
    with serve(gated, ServerSettings(**{**SETTINGS, "max_queue": 1})) as base:
        client = OpenAI(base_url=base, api_key=KEY, max_retries=0)
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(client.chat.completions.create, model="tiny", messages=ask())
            deadline = time.monotonic() + 10
            while active_requests(base) == 0:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            code, text = status_of(client, messages=ask())
            assert code == 429 and "busy" in text
            gate.set()
            assert first.result().choices[0].message.content
        # A client that goes away mid-stream: generation stops and the model lock is released.
        with client.chat.completions.create(model="tiny", messages=ask(), stream=True, max_tokens=400) as stream:
            next(iter(stream))
        deadline = time.monotonic() + 10
        while held(gated.engine._lock) or active_requests(base):
            assert time.monotonic() < deadline, "the model stayed locked after the client left"
            time.sleep(0.05)
        assert client.chat.completions.create(model="tiny", messages=ask()).choices[0].message.content


def test_unknown_paths_and_wrong_methods_answer_the_openai_error_shape():
    """Routing errors come as ``{"error": {...}}`` like every other error, not FastAPI's ``{"detail": ...}``."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    app = create_app(SimpleNamespace(name="tiny", template=None), ServerSettings(api_key=KEY))
    with TestClient(app) as http:
        unknown = http.post("/v1/completions", json={"model": "tiny", "prompt": "hi"})
        wrong = http.get("/v1/chat/completions")
        health = http.get("/health")
    assert unknown.status_code == 404 and unknown.json() == {
        "error": {
            "message": "unknown path /v1/completions; this server serves /v1/chat/completions and /v1/models",
            "type": "not_found_error",
            "param": None,
            "code": "unknown_url",
        }
    }
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert wrong.json()["error"] == {
        "message": "method GET not allowed for /v1/chat/completions (allowed: POST)",
        "type": "invalid_request_error",
        "param": None,
        "code": "method_not_allowed",
    }
    assert health.json() == {"status": "ok", "active": 0}
