"""Templates reproduce the original MiniGPT-4 / MiniGPT4Qwen token sequences exactly."""

from __future__ import annotations

import pytest

from minigpt.data.conversation import Conversation, Image, Text, parse_content
from minigpt.data.templates import get_template
from minigpt.data.tokenize import collate, encode_chunks, encode_conversation

pytestmark = pytest.mark.fidelity  # compared against tests/shared reference data

TRAIN_CASES = {
    # case name: (template, tokenizer fixture)
    "minigpt4_stage1_vicuna0": ("caption", "llama_tokenizer"),
    "minigpt4_stage2_vicuna0": ("vicuna0", "llama_tokenizer"),
    "minigpt4_stage2_vicuna0_head": ("vicuna0", "llama_tokenizer"),
    "minigpt4_stage2_llama2": ("llama2", "llama_tokenizer"),
    "minigpt4qwen_single_turn": ("chatml", "qwen_tokenizer"),
    "minigpt4qwen_multi_turn": ("chatml", "qwen_tokenizer"),
}
CHAT_CASES = {
    "minigpt4_chat_vicuna0": ("vicuna0", "llama_tokenizer"),
    "minigpt4_chat_vicuna0_head": ("vicuna0_head", "llama_tokenizer"),
    "minigpt4_chat_llama2_head": ("llama2", "llama_tokenizer"),
    "minigpt4qwen_chat": ("chatml", "qwen_tokenizer"),
}


def _conversations(case: dict) -> list[Conversation]:
    inputs, config = case["inputs"], case["config"]
    if "conversations" in inputs:
        return [_from_turns(turns) for turns in inputs["conversations"]]
    if config.get("chosen_prompt"):
        question = config["chosen_prompt"].split("Human: ")[-1].split("[INST] ")[-1]
        question = question.removesuffix(" ###Assistant: ").removesuffix(" [/INST] ")
        return [Conversation.single(question, answer) for answer in inputs["answers"]]
    return [Conversation().add("user", [Image()]).add("assistant", answer) for answer in inputs["answers"]]


def _from_turns(turns: list[dict]) -> Conversation:
    conv = Conversation()
    for t in turns:
        conv.add(t["from"], t["value"])
    return conv


def _ids_with_images(enc) -> list[int]:
    return [-1 if img else i for i, img in zip(enc.input_ids, enc.image_mask)]


@pytest.mark.parametrize("name", sorted(TRAIN_CASES))
def test_training_sequences_match_original(name, template_cases, request):
    case = template_cases[name]
    template_name, tok_fixture = TRAIN_CASES[name]
    tok = request.getfixturevalue(tok_fixture)
    config = case["config"]
    image_tokens = config.get("image_positions") or config.get("image_len")
    encoded = [
        encode_conversation(conv, get_template(template_name), tok, image_tokens, max_len=config["max_txt_len"])
        for conv in _conversations(case)
    ]
    length = case["samples"][0]["length"] if "length" in case["samples"][0] else config["max_txt_len"]
    batch = collate(encoded, pad_id=config["pad_token_id"], pad_to=length)
    for row, (sample, enc) in enumerate(zip(case["samples"], encoded)):
        expected_ids = sample["input_ids"]
        n = len(expected_ids)
        got_ids = [-1 if m else i for i, m in zip(batch.input_ids[row].tolist(), batch.image_mask[row].tolist())]
        assert got_ids[:n] == expected_ids, f"{name} sample {row} ids"
        assert batch.labels[row].tolist()[:n] == sample["labels"], f"{name} sample {row} labels"
        assert batch.attention_mask[row].tolist()[:n] == sample["attention_mask"], f"{name} sample {row} mask"


@pytest.mark.parametrize("name", sorted(CHAT_CASES))
def test_chat_contexts_and_stop_ids_match_original(name, template_cases, request):
    case = template_cases[name]
    template_name, tok_fixture = CHAT_CASES[name]
    tok = request.getfixturevalue(tok_fixture)
    template = get_template(template_name)
    conv = Conversation()
    for turn in case["turns"]:
        question = turn.get("question") or turn.get("query")
        if not conv.turns:
            question = question if "<ImageHere>" in question else "<Img><ImageHere></Img> " + question
        conv.add("user", question)
        chunks = template.render_prompt(conv, tok)
        enc = encode_chunks(chunks, tok, case["config"]["image_positions"])
        assert _ids_with_images(enc) == turn["context_input_ids"]
        generated = tok.decode(turn["fake_generated_ids"], skip_special_tokens=False)
        answer = template.postprocess(generated)
        expected = turn.get("answer_text_returned") or turn.get("response_returned")
        assert answer == expected
        conv.add("assistant", answer)
    expected_stops = case["stop"]["stop_words_ids"] if "stop" in case else turn["generate_kwargs"]["stop_words_ids"]
    # LLaMA-2 also stops on its EOS "</s>" (id 2), which the original got from generate's eos_token_id.
    assert template.stop_token_ids(tok)[: len(expected_stops)] == expected_stops


def test_parse_content_keeps_text_verbatim():
    assert parse_content("<Img><ImageHere></Img> Describe.") == [Image(), Text(" Describe.")]
    assert parse_content("<image>\nWhat?") == [Image(), Text("\nWhat?")]
    assert parse_content("a <image> b <ImageHere>") == [Text("a "), Image(), Text(" b "), Image()]
