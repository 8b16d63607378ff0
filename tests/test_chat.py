"""Chat API: prompts like the originals, history, reset, image swap, trimming, streaming, loading."""

from __future__ import annotations

import pytest
import torch
from PIL import Image as PILImage

from minigpt.data.conversation import Image, Text
from minigpt.infer.chat import Chat, ChatEngine, ContextTooLong, _StopCutter
from minigpt.infer.decoding import DecodingSettings
from minigpt.infer.engine import Engine
from minigpt.infer.generate import GenerationOptions, OptionOverrides
from minigpt.infer.loading import LoadSpec, load_model, resolve_placement

GREEDY = GenerationOptions(max_new_tokens=12)


@pytest.fixture(scope="module", params=["plain", "static"])
def engine(request, tiny_model_dir):
    """An engine on transformers' generate, or on the slot decoder (the GPU default; eager here)."""
    spec = LoadSpec(model=str(tiny_model_dir), decoding=DecodingSettings(request.param))
    return ChatEngine(Engine(*load_model(spec), spec.decoding), GREEDY)


@pytest.fixture()
def blue_file(tmp_path):
    path = tmp_path / "blue.png"
    PILImage.new("RGB", (30, 40), (10, 20, 230)).save(path)
    return path


def prompt_text(chat: Chat, question: str) -> str:
    """The rendered prompt that ``chat.ask(question)`` would send (BOS chunk left out)."""
    chunks = chat.engine.template.render_prompt(chat.prepare(question).conversation, chat.engine.processor.tokenizer)
    return "".join(c.text for c in chunks)


def test_first_question_gets_the_image_like_the_original_demo(engine, image_file):
    chat = engine.chat()
    chat.upload(image_file)
    assert prompt_text(chat, "What colour is it?") == (
        "Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I provide it "
        "to you. Please answer my questions.###Human: <Img><ImageHere></Img> What colour is it?###Assistant:"
    )


def test_multi_turn_history_and_images_per_turn(engine, image_file):
    chat = engine.chat(system="Be brief.")
    chat.upload(image_file, image_file)
    first = chat.ask("What is it?")
    second = chat.ask("And now?")
    assert [(ex.question, ex.answer, len(ex.images)) for ex in chat.history] == [
        ("What is it?", first, 2),
        ("And now?", second, 0),
    ]
    conv = chat.prepare("Third?").conversation
    assert conv.turns[0].parts == [Text("Be brief.")]
    assert conv.turns[1].parts == [Image(), Image(), Text(" What is it?")]
    assert conv.turns[2].parts == [Text(first)]
    assert conv.turns[3].parts == [Text("And now?")]
    assert conv.turns[5].parts == [Text("Third?")]
    assert "###Human: <Img><ImageHere></Img><Img><ImageHere></Img> What is it?###Assistant: " in prompt_text(chat, "x")


def test_reset_keeps_image_which_attaches_again(engine, image_file):
    chat = engine.chat()
    chat.upload(image_file)
    chat.ask("What is it?")
    chat.reset()
    assert chat.history == [] and chat.image_names == [str(image_file)]
    prompt = chat.prepare("Again?")
    assert prompt.conversation.turns[-1].parts == [Image(), Text(" Again?")] and len(prompt.images) == 1
    chat.reset(images=True)
    assert chat.prepare("Text only?").images == [] and chat.image_names == []


def test_swap_image_attaches_the_new_one_to_the_next_question(engine, image_file, blue_file):
    chat = engine.chat()
    chat.upload(image_file)
    chat.ask("What is it?")
    chat.set_images(blue_file)
    assert chat.image_names == [str(blue_file)]
    prompt = chat.prepare("And this one?")
    # The old turn keeps its image; the new image comes with the new question, in slot order.
    assert prompt.conversation.num_images == 2
    assert [img.getpixel((0, 0)) for img in prompt.images] == [(220, 20, 20), (10, 20, 230)]
    chat.ask("And this one?")
    assert [len(ex.images) for ex in chat.history] == [1, 1]


def test_streaming_deltas_join_to_the_greedy_answer(engine, image_file):
    chat, streamed = engine.chat(), engine.chat()
    chat.upload(image_file)
    streamed.upload(image_file)
    answer = chat.ask("What is it?")
    deltas = list(streamed.stream("What is it?"))
    assert len(deltas) > 1 and "".join(deltas) == answer and answer
    assert streamed.history[0].answer == answer
    # Multi-turn: the second answers agree too.
    assert "".join(streamed.stream("More?")) == chat.ask("More?")


def test_stop_strings_are_cut_identically_when_streaming(engine, image_file):
    chat = engine.chat()
    chat.upload(image_file)
    words = chat.ask("What is it?").split()
    assert len(words) >= 3
    options = OptionOverrides(stop=[" " + words[2]]).apply(GREEDY)
    expected = " ".join(words[:2])
    chat.reset()
    assert chat.ask("What is it?", options) == expected
    chat.reset()
    assert "".join(chat.stream("What is it?", options)) == expected


def test_stop_cutter_holds_back_partial_stop_strings():
    cutter = _StopCutter(["###", "</s>"])
    deltas = [cutter.feed(p) for p in (" Hello", " wor", "ld #", "#", "# ignored")]
    assert deltas == ["Hello", " wor", "ld", "", ""] and cutter.emitted == "Hello world" and cutter.stopped
    cutter = _StopCutter(["###"])
    assert [cutter.feed(p) for p in ("a #", "b")] == ["a", " #b"]


def test_closing_a_stream_early_stops_generation_and_frees_the_model(engine, image_file):
    stream = engine.stream(engine.chat().prepare("Hi").conversation, [], GenerationOptions(max_new_tokens=200))
    lock = engine.engine._lock  # held by the generating thread while it decodes
    next(stream)
    assert not lock.acquire(blocking=False)
    stream.close()
    assert lock.acquire(blocking=False)
    lock.release()


def test_history_is_trimmed_to_fit_and_the_image_is_attached_again(tiny_model_dir, image_file):
    small = ChatEngine(Engine(*load_model(LoadSpec(model=str(tiny_model_dir)))), GREEDY, max_context=90)
    chat = small.chat()
    chat.upload(image_file)
    chat.ask("What is it?")
    chat.ask("Why?")
    prompt = chat.prepare("And then what happened next?")
    assert prompt.dropped >= 1
    assert small.prompt_length(prompt.conversation) + GREEDY.max_new_tokens <= 90
    # The image's turn was left out, so the image comes again with the new question.
    assert prompt.conversation.turns[-1].parts[0] == Image() and len(prompt.images) == 1
    with pytest.raises(ContextTooLong, match="exceeds the context of 90"):
        chat.prepare("word " * 100)


def test_placeholder_in_text_is_refused(engine):
    with pytest.raises(ValueError, match="ImageHere"):
        engine.chat().ask("Look: <ImageHere>")


def test_option_overrides_temperature_zero_is_greedy():
    assert OptionOverrides(temperature=0).apply(GREEDY).do_sample is False
    sampled = OptionOverrides(temperature=0.7, top_p=0.5, num_beams=2).apply(GREEDY)
    assert (sampled.do_sample, sampled.temperature, sampled.top_p, sampled.num_beams) == (True, 0.7, 0.5, 2)
    with pytest.raises(ValueError):
        OptionOverrides(top_p=0).apply(GREEDY)


def test_base_parts_and_projector_override_load_the_same_model(
    tiny_model_dir, tiny_llama_dir, tmp_path, engine, image_file
):
    from safetensors.torch import save_file

    from minigpt.convert.lavis import save_vision

    model = engine.engine.model
    save_vision(tmp_path / "vision", model.vision.config, model.vision.state_dict())
    # The projector as a MiniGPT4Qwen checkpoint ({"model": {"llm_proj.*"}}).
    torch.save({"model": {f"llm_proj.{k}": v for k, v in model.projector.state_dict().items()}}, tmp_path / "q.pth")
    chat = Chat.load(llm=str(tiny_llama_dir), vision=str(tmp_path / "vision"), projector=str(tmp_path / "q.pth"))
    reference = engine.chat()
    for c in (chat, reference):
        c.upload(image_file)
    assert chat.ask("What is it?", GREEDY) == reference.ask("What is it?")
    # --projector replaces a directory's projector.
    zero = {k: torch.zeros_like(v) for k, v in model.projector.state_dict().items()}
    save_file(zero, tmp_path / "zero.safetensors")
    swapped, _ = load_model(LoadSpec(model=str(tiny_model_dir), projector=str(tmp_path / "zero.safetensors")))
    assert all(float(p.detach().abs().sum()) == 0 for p in swapped.projector.parameters())


def test_gpu_only_options_give_a_clear_message_on_cpu():
    with pytest.raises(RuntimeError, match="float16 is not supported .* CPU"):
        resolve_placement(LoadSpec(model="x", device="cpu", dtype="fp16"))
    assert resolve_placement(LoadSpec(device="cpu", dtype="bf16"))[1] == torch.bfloat16
    assert resolve_placement(LoadSpec(device="cpu"))[1] == torch.float32
    with pytest.raises(ValueError, match="--llm and --projector"):
        load_model(LoadSpec(device="cpu"))


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_chat_on_cpu(tiny_model_dir, image_file, bits):
    """bitsandbytes runs 4-bit (NF4) and 8-bit layers on the CPU: --load-in-4bit/8bit load and answer there."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    chat = Chat.load(tiny_model_dir, device="cpu", quantize=bits, options=GREEDY)
    llm = chat.engine.engine.model.llm
    layer = {"4bit": bnb.nn.Linear4bit, "8bit": bnb.nn.Linear8bitLt}[bits]
    assert isinstance(llm.model.layers[0].self_attn.q_proj, layer)
    chat.upload(image_file)
    assert chat.ask("What is it?")


def test_bfloat16_weights_on_cpu(tiny_model_dir, image_file):
    chat = Chat.load(tiny_model_dir, device="cpu", dtype="bf16", options=GREEDY)
    assert chat.engine.engine.model.llm.dtype == torch.bfloat16
    chat.upload(image_file)
    assert chat.ask("What is it?")


def test_llm_kwargs_reach_the_llm_loader(tiny_model_dir, engine, image_file):
    """The 8/4-bit path passes a quantization config through ``llm_kwargs``; checked with a device map (no GPU)."""
    from minigpt.model.minigpt import MiniGPT
    from minigpt.model.processor import MiniGPTProcessor

    model = MiniGPT.from_pretrained(tiny_model_dir, llm_kwargs={"device_map": {"": "cpu"}})
    chat, reference = (
        Chat(ChatEngine(Engine(model, MiniGPTProcessor.from_pretrained(tiny_model_dir)), GREEDY)),
        engine.chat(),
    )
    for c in (chat, reference):
        c.upload(image_file)
    assert chat.ask("What is it?") == reference.ask("What is it?")


def test_quantization_kwargs_build_bitsandbytes_configs():
    pytest.importorskip("bitsandbytes")
    from minigpt.infer.loading import _quantization_kwargs

    four = _quantization_kwargs("bfloat16", "4bit", torch.device("cpu"))
    assert four["quantization_config"].load_in_4bit and four["quantization_config"].bnb_4bit_quant_type == "nf4"
    assert four["quantization_config"].bnb_4bit_compute_dtype == torch.bfloat16
    assert _quantization_kwargs("bfloat16", "8bit", torch.device("cpu"))["quantization_config"].load_in_8bit
    assert _quantization_kwargs("bfloat16", None, torch.device("cpu")) == {}
