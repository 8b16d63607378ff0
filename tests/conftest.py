"""Shared test fixtures: the real tokenizers and reference fixtures (``tests/shared``, a copy of what the tests
need from the product side's ``shared/``; ``MINIGPT_SHARED`` points elsewhere) and tiny models built on the fly.

Tests that compare against reference data are marked ``fidelity``. Under CI (``CI`` set to anything but
``""``/``0``/``false``), a missing shared file fails the test instead of skipping it, and the run fails when any
``fidelity`` test was skipped, whatever the reason."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MINIGPT_SHARED") or REPO / "tests" / "shared")
CACHE = Path(os.environ.get("MINIGPT_TEST_CACHE", Path.home() / ".cache" / "minigpt-tests"))


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def shared_path(*parts: str) -> Path:
    """``SHARED/parts``; skipped (failed under CI) with the path as the reason when it is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        message = f"shared material not present: {path} (MINIGPT_SHARED={os.environ.get('MINIGPT_SHARED')!r})"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return path


_skipped_fidelity: list[str] = []


def pytest_runtest_logreport(report) -> None:
    if report.skipped and "fidelity" in report.keywords:
        _skipped_fidelity.append(report.nodeid)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if _skipped_fidelity:
        verdict = "CI fails the run" if in_ci() else "set CI=true to make this an error"
        terminalreporter.write_line(
            f"{len(_skipped_fidelity)} fidelity test(s) did not run ({verdict}): "
            + ", ".join(_skipped_fidelity[:5])
            + (" ..." if len(_skipped_fidelity) > 5 else ""),
            red=in_ci(),
        )


def pytest_sessionfinish(session, exitstatus) -> None:
    if _skipped_fidelity and in_ci() and exitstatus == 0:
        session.exitstatus = 1


def _gguf_tokenizer(name: str, gguf: str):
    """Convert a GGUF vocabulary once (tens of seconds) and reuse the saved tokenizer afterwards."""
    from transformers import AutoTokenizer

    folder = shared_path("tokenizers")
    cached = CACHE / name
    if (cached / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(cached)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    cached.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(cached)
    return tok


@pytest.fixture(scope="session")
def llama_tokenizer():
    tok = _gguf_tokenizer("llama-spm", "ggml-vocab-llama-spm.gguf")
    tok.bos_token, tok.eos_token = "<s>", "</s>"  # the GGUF conversion's quirks (shared/tokenizers/README.md)
    return tok


@pytest.fixture(scope="session")
def qwen_tokenizer():
    return _gguf_tokenizer("qwen2", "ggml-vocab-qwen2.gguf")


@pytest.fixture(scope="session")
def template_cases() -> dict:
    import json

    data = json.loads(shared_path("fixtures", "templates", "cases.json").read_text())
    return {case["name"]: case for case in data["cases"]}


def save_tiny_llm(directory: Path, tokenizer, arch: str = "llama", seed: int = 0) -> Path:
    """A 2-layer, 64-wide causal LM with ``tokenizer``'s vocabulary, saved as a transformers folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(LlamaConfig(**common)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**common))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, llama_tokenizer) -> Path:
    return save_tiny_llm(tmp_path_factory.mktemp("tiny-llama"), llama_tokenizer)


CHATML_JINJA = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory, qwen_tokenizer) -> Path:
    qwen_tokenizer.chat_template = CHATML_JINJA
    return save_tiny_llm(tmp_path_factory.mktemp("tiny-qwen"), qwen_tokenizer, arch="qwen2")


@pytest.fixture(scope="session")
def tiny_blip2_config():
    """``build(text_config)``: a transformers ``Blip2Config`` of a tiny BLIP-2 (ViT 32 wide on
    28-pixel pictures, Q-Former 16 wide, 4 query tokens) around ``text_config`` (a dict)."""
    from transformers import Blip2Config

    def build(text_config: dict) -> Blip2Config:
        return Blip2Config(
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=28,
                patch_size=14,
            ),
            qformer_config=dict(
                hidden_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=32,
                encoder_hidden_size=32,
                vocab_size=50,
                max_position_embeddings=32,
            ),
            text_config=text_config,
            num_query_tokens=4,
        )

    return build


@pytest.fixture()
def tiny_model_factory(tiny_llama_dir):
    """Build a tiny MiniGPT (random tiny BLIP-2 stack + tiny LLaMA) with any config overrides."""
    from minigpt.model.minigpt import MiniGPT, MiniGPTConfig
    from minigpt.model.vision import VisionConfig

    def make(**overrides):
        import torch

        torch.manual_seed(overrides.pop("seed", 0))
        llm = overrides.pop("llm", str(tiny_llama_dir))
        fields = dict(llm=llm, vision=VisionConfig.tiny(), template="vicuna0", max_txt_len=32)
        fields.update(overrides)
        return MiniGPT.build(MiniGPTConfig(**fields))

    return make


@pytest.fixture()
def tiny_pair_factory(tiny_model_factory):
    """``(model, processor)``: a tiny MiniGPT as ``tiny_model_factory`` builds it and its processor (sharing the
    model's config)."""
    from minigpt.model.processor import MiniGPTProcessor

    def make(**overrides):
        model = tiny_model_factory(**overrides)
        return model, MiniGPTProcessor.from_config(model.config)

    return make


@pytest.fixture()
def image_file(tmp_path) -> Path:
    from PIL import Image

    path = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (220, 20, 20)).save(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """A saved tiny MiniGPT (vicuna0 template), as ``minigpt chat`` / ``serve`` load it."""
    import torch

    from minigpt.model.minigpt import MiniGPT, MiniGPTConfig
    from minigpt.model.processor import MiniGPTProcessor
    from minigpt.model.vision import VisionConfig

    torch.manual_seed(0)
    model = MiniGPT.build(MiniGPTConfig(llm=str(tiny_llama_dir), vision=VisionConfig.tiny(), max_txt_len=32))
    directory = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(directory)
    MiniGPTProcessor.from_config(model.config).save_pretrained(directory)
    return directory


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        record.message = record.getMessage()
        self.records.append(record)


@contextmanager
def logged(match: str | None = None, logger: str = "minigpt") -> Iterator[list[logging.LogRecord]]:
    """Like ``pytest.warns`` for the warnings minigpt logs (skipped records, eval problems): the records logged at
    WARNING or above in the block (``.message`` set); fails unless there is one (matching ``match``, a regex)."""
    handler = _Collect()
    log = logging.getLogger(logger)
    log.addHandler(handler)
    try:
        yield handler.records
    finally:
        log.removeHandler(handler)
    messages = [r.message for r in handler.records]
    assert messages, "no warning was logged"
    assert match is None or any(re.search(match, m) for m in messages), f"none matches {match!r}: {messages}"


@pytest.fixture(autouse=True)
def _restore_quiet_env():
    """A command run in-process sets the environment that quiets third-party libraries (minigpt.console): undo it,
    so that it does not reach later tests' subprocesses."""
    from minigpt.console import QUIET_ENV

    saved = {key: os.environ.get(key) for key in QUIET_ENV}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
