"""The slot decoder (static KV cache, graph-ready step) and continuous batching, against transformers' generate.

CUDA graphs cannot run here; the graph path is exercised with a stand-in recorder that replays the recorded step
function (same buffers, same protocol), and the decoder's greedy output is compared token for token with the plain
path on LLaMA and Qwen2 models."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image as PILImage
from transformers import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from minigpt.data.conversation import Conversation, Image, Text
from minigpt.data.tokenize import Encoded, ModelBatch, collate
from minigpt.infer import slots as slots_module
from minigpt.infer.batching import DecodeRequest, SlotScheduler
from minigpt.infer.chat import ChatEngine
from minigpt.infer.decoding import DecodingSettings
from minigpt.infer.engine import Engine
from minigpt.infer.generate import GenerationOptions
from minigpt.infer.slots import SlotDecoder, SlotSampler

RED = PILImage.new("RGB", (40, 30), (220, 20, 20))
QUESTIONS = ["What is this?", "Describe the picture in detail please, every part of it", "Hi"]


def conversations(questions=QUESTIONS) -> list[Conversation]:
    out = []
    for q in questions:
        conv = Conversation()
        conv.add("user", [Image(), Text(" " + q)])
        out.append(conv)
    return out


def answers(engine: Engine, mode: str, options: GenerationOptions, questions=QUESTIONS, **settings) -> list[str]:
    settings = DecodingSettings(mode, **settings)
    if engine.decoding != settings:  # a change frees the slot decoder; the same settings keep (reuse) it
        engine.decoding = settings
    return [a.text for a in engine.generate(conversations(questions), [RED] * len(questions), options)]


def plain_engine(engine: Engine) -> Engine:
    """Another engine on the same model and processor, on transformers' generate (the reference)."""
    return Engine(engine.model, engine.processor, DecodingSettings("plain"))


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    """An engine on a tiny LLaMA MiniGPT."""
    from minigpt.model.minigpt import MiniGPT, MiniGPTConfig
    from minigpt.model.processor import MiniGPTProcessor
    from minigpt.model.vision import VisionConfig

    torch.manual_seed(0)
    model = MiniGPT.build(MiniGPTConfig(llm=str(tiny_llama_dir), vision=VisionConfig.tiny(), max_txt_len=48)).eval()
    return Engine(model, MiniGPTProcessor.from_config(model.config))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_static_greedy_equals_plain_for_a_batch_of_different_lengths(arch, llama, tiny_pair_factory, tiny_qwen_dir):
    model = llama if arch == "llama" else Engine(*tiny_pair_factory(llm=str(tiny_qwen_dir), template="chatml"))
    options = GenerationOptions(max_new_tokens=20)
    plain = answers(model, "plain", options)
    assert len(set(plain)) == 3 and all(len(a.split()) >= 5 for a in plain)
    assert answers(model, "static", options) == plain
    assert model._scheduler is not None and model._scheduler.slots == 3
    # One at a time on the same (reused, larger) decoder: the same answers.
    assert [answers(model, "static", options, [q])[0] for q in QUESTIONS] == plain


def test_stop_strings_min_tokens_and_penalty_match_plain(llama):
    base = answers(llama, "plain", GenerationOptions(max_new_tokens=16))
    stop = " " + base[0].split()[3]
    for options in (
        GenerationOptions(max_new_tokens=16, stop=[stop]),
        GenerationOptions(max_new_tokens=16, repetition_penalty=1.5, min_new_tokens=4),
    ):
        assert answers(llama, "static", options) == answers(llama, "plain", options)
    cut = answers(llama, "static", GenerationOptions(max_new_tokens=16, stop=[stop]))
    assert cut[0] == " ".join(base[0].split()[:3])


def test_seeded_sampling_is_reproducible_and_seeds_differ(llama):
    def sampled(seed: int) -> list[str]:
        return answers(llama, "static", GenerationOptions(max_new_tokens=12, do_sample=True, top_p=0.95, seed=seed))

    first = sampled(1)
    assert sampled(1) == first and sampled(2) != first
    assert first != answers(llama, "static", GenerationOptions(max_new_tokens=12))


def test_compiled_decoder_layers_give_the_same_tokens(tiny_pair_factory, tiny_llama_dir):
    model = Engine(*tiny_pair_factory())  # its own copy: compiling changes the layers for good
    options = GenerationOptions(max_new_tokens=10)
    plain = answers(model, "plain", options, QUESTIONS[:2])
    assert answers(model, "static", options, QUESTIONS[:2], compile=True) == plain
    assert model._scheduler.decoder.compiled


def test_recorded_step_replays_on_static_buffers(llama, monkeypatch):
    """The graph protocol without a GPU: warm-up and recording run the step on inactive rows, ``reset`` cleans up,
    and each replay re-runs the recorded function, whose only inputs are the decoder's buffers."""
    recorded = {}

    def fake_capture(fn, device, warmup=2):
        for _ in range(warmup):
            fn()
        out = fn().clone()
        recorded["calls"] = 0

        def replay():
            recorded["calls"] += 1
            out.copy_(fn())

        return replay, out

    monkeypatch.setattr(slots_module, "supports_graph_capture", lambda device: True)
    monkeypatch.setattr(slots_module, "capture_graph", fake_capture)
    options = GenerationOptions(max_new_tokens=12)
    plain = answers(llama, "plain", options)
    assert answers(llama, "static", options) == plain
    decoder = llama._scheduler.decoder
    assert decoder.graphed and recorded["calls"] == 11  # first token from prefill, then one replay per token
    assert not decoder.active.any() and decoder.cache.positions.tolist() == [0, 0, 0]


def test_a_step_that_cannot_be_recorded_decodes_eagerly(llama, monkeypatch, caplog):
    def refuse(fn, device, warmup=2):
        fn()
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(slots_module, "supports_graph_capture", lambda device: True)
    monkeypatch.setattr(slots_module, "capture_graph", refuse)
    options = GenerationOptions(max_new_tokens=8)
    expected = answers(llama, "plain", options)
    assert answers(llama, "static", options) == expected
    assert not llama._scheduler.decoder.graphed and "stream is capturing" in caplog.text


def test_unsupported_llm_falls_back_to_plain_generate(llama, monkeypatch, caplog):
    def refuse(llm):
        raise slots_module.FastDecodingUnsupported("remote code model")

    monkeypatch.setattr(slots_module, "_forward_keywords", refuse)
    options = GenerationOptions(max_new_tokens=6)
    expected = answers(llama, "plain", options)
    assert answers(llama, "static", options) == expected
    assert llama.decoding_choice.mode == "plain" and "remote code model" in caplog.text


def test_attention_span_grows_in_buckets_with_the_longest_row(llama):
    llm, length = llama.model.llm, 140
    ids = torch.randint(3, 1000, (1, length), generator=torch.Generator().manual_seed(0))
    expected = llm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)[0, length:]
    decoder = SlotDecoder(llm, slots=2, max_len=512)
    assert decoder.spans == [128, 256, 512]
    with torch.inference_mode():
        tokens = [int(decoder.prefill([1], [llm.get_input_embeddings()(ids[0])])[0].argmax())]
        last = torch.zeros(2, dtype=torch.long)
        for _ in range(7):
            last[1] = tokens[-1]
            tokens.append(int(decoder.step(last)[1].argmax()))
    assert tokens == expected.tolist() and decoder.cache.span == 256 and decoder.lengths == [0, length + 7]


def test_prompts_the_slot_cache_cannot_hold_fall_back_to_plain(llama, monkeypatch, caplog):
    """A model whose cache keeps fewer positions than a long prompt (a sliding window) answers it with transformers'
    generate: from generate, and from a batched engine, streaming included."""
    options = GenerationOptions(max_new_tokens=8)
    expected = answers(llama, "plain", options)
    original = SlotDecoder.prefill

    def prefill(self, rows, prompts):
        if max(p.shape[0] for p in prompts) > 60:
            raise slots_module.FastDecodingUnsupported("the model's cache keeps fewer positions than the prompt")
        return original(self, rows, prompts)

    monkeypatch.setattr(SlotDecoder, "prefill", prefill)
    assert answers(llama, "static", options) == expected and "using transformers' generate" in caplog.text
    engine = ChatEngine(llama, options, max_context=128, batch_slots=2)
    try:
        long_question = conversations()[1]
        assert engine.generate(long_question, [RED]).text == expected[1]
        assert "".join(engine.stream(long_question, [RED])) == expected[1]
        assert "answering it alone" in caplog.text and not engine.engine._scheduler.running
    finally:
        engine.close()


def test_decoder_refuses_prompts_longer_than_a_slot(llama):
    decoder = SlotDecoder(llama.model.llm, slots=1, max_len=8)
    with pytest.raises(ValueError, match="does not fit a decoding slot of 8 positions"):
        decoder.prefill([0], [torch.zeros(8, llama.model.llm.config.hidden_size)])
    with pytest.raises(ValueError, match="unknown decoding mode 'fast'"):
        DecodingSettings("fast")


# ---------------------------------------------------------------------------------------------- sampler
def test_sampler_matches_transformers_logits_processors():
    torch.manual_seed(0)
    vocab, ends = 50, [2, 7]
    logits = torch.randn(3, vocab) * 3
    prompts = [[5, 6, 9], [1, 2], [11]]
    options = [
        GenerationOptions(repetition_penalty=1.7, min_new_tokens=3),
        GenerationOptions(do_sample=True, temperature=0.7, top_k=10, top_p=0.8, repetition_penalty=1.2),
        GenerationOptions(do_sample=True, temperature=1.3, top_p=0.5),
    ]
    sampler = SlotSampler(3, vocab, torch.device("cpu"), ends)
    for row, (opts, ids) in enumerate(zip(options, prompts)):
        sampler.admit(row, opts, ids)
    index = torch.arange(3)
    scores = sampler.process(logits, index, options)
    probs = sampler.sampling_probs(scores, index)
    for row, (opts, ids) in enumerate(zip(options, prompts)):
        input_ids = torch.tensor([ids])
        hf = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(opts.repetition_penalty)])
        if opts.min_new_tokens:
            hf.append(MinNewTokensLengthLogitsProcessor(len(ids), opts.min_new_tokens, ends))
        expected = hf(input_ids, logits[row : row + 1].clone())
        assert torch.allclose(scores[row], expected[0])
        if opts.do_sample:
            warp = LogitsProcessorList([TemperatureLogitsWarper(opts.temperature)])
            if opts.top_k:
                warp.append(TopKLogitsWarper(opts.top_k))
            warp.append(TopPLogitsWarper(opts.top_p))
            hf_probs = warp(input_ids, expected).softmax(-1)[0]
            assert torch.allclose(probs[row], hf_probs, atol=1e-6)
            assert 1 <= int((probs[row] > 0).sum()) < vocab
    assert torch.isinf(scores[0, ends]).all()  # held back until min_new_tokens
    sampler.produced(0, 3)
    assert torch.isfinite(sampler.process(logits, index, options)[0, ends]).all()


# ---------------------------------------------------------------------------------------------- batching
@pytest.fixture()
def batched(llama):
    llama.decoding = DecodingSettings("static")
    engine = ChatEngine(llama, GenerationOptions(max_new_tokens=12), max_context=128, batch_slots=2)
    assert engine.engine._scheduler is not None and engine.engine._scheduler.thread is not None
    yield engine
    engine.close()


def test_concurrent_requests_share_the_batch_and_match_one_by_one(llama, batched):
    expected = answers(plain_engine(llama), "plain", GenerationOptions(max_new_tokens=12))
    convs = conversations()
    seen_running = []
    original = batched.engine._scheduler.tick

    def tick():
        seen_running.append(len(batched.engine._scheduler.running))
        original()

    batched.engine._scheduler.tick = tick
    jobs = [(convs[i % 3], i % 3) for i in range(6)]  # six requests, two slots: they queue and join mid-batch
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda job: batched.generate(job[0], [RED]).text, jobs))
    assert got == [expected[i] for _, i in jobs]
    assert max(seen_running) == 2 and not batched.engine._scheduler.running


def test_batched_requests_with_penalty_min_tokens_and_sampling(llama, batched):
    """The scheduler thread runs outside any caller's inference mode: each option still works there."""
    conv = conversations()[0]
    for options in (
        GenerationOptions(max_new_tokens=10, min_new_tokens=6),
        GenerationOptions(max_new_tokens=10, repetition_penalty=1.5),
    ):
        expected = plain_engine(llama).generate([conv], [RED], options)[0].text
        assert batched.generate(conv, [RED], options).text == expected
    sampling = GenerationOptions(max_new_tokens=10, do_sample=True, temperature=0.8, top_k=50, seed=3)
    assert batched.generate(conv, [RED], sampling).text == batched.generate(conv, [RED], sampling).text


def test_streams_beam_search_and_cancellation_on_the_batch(llama, batched):
    conv = conversations()[:1][0]
    expected = batched.generate(conv, [RED]).text
    assert "".join(batched.stream(conv, [RED])) == expected
    beams = GenerationOptions(max_new_tokens=8, num_beams=2)
    assert batched.generate(conv, [RED], beams).text == plain_engine(llama).generate([conv], [RED], beams)[0].text
    stream = batched.stream(conv, [RED], GenerationOptions(max_new_tokens=60))
    next(stream)
    stream.close()
    assert not batched.engine._scheduler.running and not batched.engine._scheduler.waiting
    assert batched.generate(conv, [RED]).text == expected  # the freed slot serves the next request


def test_batch_slots_shrink_to_the_free_memory(llama, monkeypatch, caplog):
    from minigpt.infer import engine as engine_module
    from minigpt.infer.slots import kv_bytes_per_position

    config = llama.model.llm.config
    per_position = kv_bytes_per_position(llama.model.llm)
    assert per_position == 2 * config.num_hidden_layers * config.num_key_value_heads * 16 * 4  # fp32, head_dim 16
    llama.decoding = DecodingSettings("static")
    per_slot = 100 * per_position
    monkeypatch.setattr(engine_module, "free_memory_bytes", lambda device: int(3.9 * per_slot / 0.8))
    engine = ChatEngine(llama, max_context=100, batch_slots=8)
    assert engine.engine._scheduler.slots == 3 and "using 3 slots" in caplog.text
    engine.close()
    monkeypatch.setattr(engine_module, "free_memory_bytes", lambda device: per_slot)
    engine = ChatEngine(llama, max_context=100, batch_slots=8)
    assert engine.engine._scheduler is None and "one at a time" in caplog.text


def text_prompt(ids: list[int]) -> ModelBatch:
    """A one-conversation prompt of ``ids`` without images."""
    return ModelBatch(collate([Encoded(list(ids), [-100] * len(ids), [False] * len(ids))], 0, side="left"), None)


def test_scheduler_rejects_what_does_not_fit_and_reports_errors(llama):
    scheduler = SlotScheduler(llama.model, slots=1, max_len=64)
    with pytest.raises(ValueError, match="does not fit a decoding slot of 64 positions"):
        scheduler.submit(DecodeRequest(text_prompt(list(range(60))), GenerationOptions(max_new_tokens=10)))
    scheduler = SlotScheduler(llama.model, slots=2, max_len=64)
    vocab = llama.model.llm.config.vocab_size
    good = DecodeRequest(text_prompt([1, 2]), GenerationOptions(max_new_tokens=3))
    bad = DecodeRequest(text_prompt([1, vocab + 5]), GenerationOptions(max_new_tokens=3))  # beyond the vocabulary
    scheduler.submit(good)
    scheduler.submit(bad)
    scheduler.run_until_idle()  # admitted together, the prefill fails; retried alone, only the bad one fails
    assert bad.done.is_set() and bad.error is not None and not scheduler.running
    assert good.error is None and len(good.tokens) == 3 and good.finish_reason in ("stop", "length")


def test_stopping_the_scheduler_fails_what_is_still_queued(llama):
    scheduler = SlotScheduler(llama.model, slots=1, max_len=64).start()
    gate, entered = threading.Event(), threading.Event()

    def blocking():
        entered.set()
        gate.wait()

    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(scheduler.run_exclusive, blocking)
        assert entered.wait(10)
        queued = scheduler.submit(DecodeRequest(text_prompt([1, 2]), GenerationOptions(max_new_tokens=10)))
        waiter = pool.submit(lambda: queued.done.wait(10) and queued.error and _raise(queued.error))
        stopper = pool.submit(scheduler.stop)
        while not (scheduler.waiting and scheduler.stopping):
            threading.Event().wait(0.01)
        gate.set()  # the tick ends (admitting the request), then the thread stops and fails it
        stopper.result(10)
        first.result(10)
        with pytest.raises(RuntimeError, match="scheduler was stopped"):
            waiter.result(10)
    assert not scheduler.running and not scheduler.waiting and scheduler.thread is None


def _raise(error: BaseException) -> None:
    raise error
