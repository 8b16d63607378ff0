"""The composed model: masking, gradients, save/load, generation, image placement, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from minigpt.data.conversation import Conversation, Image, Text
from minigpt.data.images import ImageError
from minigpt.data.tokenize import IGNORE_INDEX
from minigpt.infer.engine import Engine
from minigpt.infer.generate import GenerationOptions
from minigpt.model.minigpt import MiniGPT


def _single(question="<Img><ImageHere></Img> What colour is it?", answer="It is red."):
    return Conversation.single(question, answer)


def test_loss_equals_full_lm_loss_over_answer_tokens(tiny_pair_factory, image_file):
    model, processor = tiny_pair_factory()
    convs = [_single(), _single(answer="A red square on a white background, drawn in the middle.")]
    batch = processor.prepare(convs, [image_file, image_file])
    out = model(batch=batch)
    # Reference: transformers' own loss over the full logits with the same labels.
    embeds = model.embed(batch)
    ref = model.llm(inputs_embeds=embeds, attention_mask=batch.text.attention_mask, labels=batch.text.labels).loss
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert out.num_tokens == int((batch.text.labels[:, 1:] != IGNORE_INDEX).sum())


def test_label_mask_vicuna0_masks_everything_but_answer(tiny_pair_factory, image_file, llama_tokenizer):
    model, processor = tiny_pair_factory()
    batch = processor.prepare([_single(answer="It is red.")], [image_file])
    labels, ids = batch.text.labels[0], batch.text.input_ids[0]
    supervised = ids[labels != IGNORE_INDEX].tolist()
    assert llama_tokenizer.decode(supervised) == "It is red.###"
    # BOS, prompt and the 8 image positions are all masked.
    assert labels[0] == IGNORE_INDEX
    assert (labels[batch.text.image_mask[0]] == IGNORE_INDEX).all()
    assert int(batch.text.image_mask[0].sum()) == model.image_tokens == 8


def test_label_mask_hf_chat_template(tiny_qwen_dir, tiny_pair_factory, image_file, qwen_tokenizer):
    model, processor = tiny_pair_factory(llm=str(tiny_qwen_dir), template="hf", max_txt_len=256)
    conv = Conversation.single("<image>\nWhat is it?", "A red square.", system="Be brief.")
    conv.add("user", "Sure?").add("assistant", "Yes.")
    batch = processor.prepare([conv], [image_file])
    labels, ids = batch.text.labels[0], batch.text.input_ids[0]
    supervised_runs = []
    current: list[int] = []
    for tok, lab in zip(ids.tolist(), labels.tolist()):
        if lab == IGNORE_INDEX:
            if current:
                supervised_runs.append(qwen_tokenizer.decode(current))
            current = []
        else:
            current.append(tok)
    if current:
        supervised_runs.append(qwen_tokenizer.decode(current))
    assert supervised_runs == ["A red square.<|im_end|>\n", "Yes.<|im_end|>\n"]


@pytest.mark.parametrize(
    ("system_prompt", "own", "expected"),
    [
        (None, None, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"),  # the template's default
        ("", None, "<|im_start|>system\n<|im_end|>\n"),
        ("Be brief.", None, "<|im_start|>system\nBe brief.<|im_end|>\n"),
        ("Be brief.", "Say it all.", "<|im_start|>system\nSay it all.<|im_end|>\n"),  # the conversation's own wins
    ],
)
def test_system_prompt_of_the_config_in_training_and_prompts(
    tiny_qwen_dir, tiny_pair_factory, image_file, qwen_tokenizer, system_prompt, own, expected
):
    _, processor = tiny_pair_factory(llm=str(tiny_qwen_dir), template="chatml", system_prompt=system_prompt)
    for train, answer in ((True, "A red square."), (False, None)):
        batch = processor.prepare(
            [Conversation.single("<image>\nWhat is it?", answer, system=own)], [image_file], train
        )
        text = qwen_tokenizer.decode(batch.text.input_ids[0][batch.text.attention_mask[0].bool()])
        assert text.startswith(expected), text


def test_label_mask_caption_stage1(tiny_pair_factory, image_file, llama_tokenizer):
    model, processor = tiny_pair_factory(template="caption")
    conv = Conversation().add("user", [Image()]).add("assistant", "a red square")
    batch = processor.prepare([conv], [image_file])
    labels = batch.text.labels[0]
    assert batch.text.image_mask[0, 1:9].all() and not batch.text.image_mask[0, 0]
    assert llama_tokenizer.decode(batch.text.input_ids[0][labels != IGNORE_INDEX]) == "a red square\n"


def test_gradients_reach_only_trainable_parts(tiny_pair_factory, image_file):
    model, processor = tiny_pair_factory()
    model.train()
    out = model(processor.prepare([_single()], [image_file]))
    out.loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("projector."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert not model.vision.vision_model.training and not model.vision.qformer.training
    assert not model.llm.training and model.projector.training


def test_unfreezing_qformer_gives_it_gradients(tiny_pair_factory, image_file):
    model, processor = tiny_pair_factory(freeze={"vision": True, "qformer": False, "projector": False, "llm": True})
    model.train()
    model(processor.prepare([_single()], [image_file])).loss.backward()
    assert model.vision.query_tokens.grad is not None
    assert model.vision.qformer.training and not model.vision.vision_model.training
    assert all(p.grad is None for p in model.vision.vision_model.parameters())
    counts = model.parameter_counts()
    assert counts["vision"]["trainable"] == 0 and counts["qformer"]["trainable"] == counts["qformer"]["total"]


@pytest.mark.parametrize("trainable_only", [False, True])
def test_save_load_round_trip_gives_identical_logits(tiny_pair_factory, image_file, tmp_path, trainable_only):
    model, processor = tiny_pair_factory()
    with torch.no_grad():
        model.projector.weight.normal_()
    written = model.save_pretrained(tmp_path / "m", trainable_only=trainable_only)
    # The random vision encoder has no other source, so it is kept even when saving trainable parts.
    assert written == (["vision", "projector"] if trainable_only else ["vision", "projector", "llm"])
    loaded = MiniGPT.from_pretrained(tmp_path / "m")
    batch = processor.prepare([_single()], [image_file])
    with torch.no_grad():
        a = model.llm(inputs_embeds=model.embed(batch)).logits
        b = loaded.llm(inputs_embeds=loaded.embed(batch)).logits
    assert torch.equal(a, b)
    assert loaded.config.freeze == model.config.freeze


def test_projector_only_checkpoint_is_small(tiny_pair_factory, tmp_path):
    model, processor = tiny_pair_factory()
    model.save_pretrained(tmp_path / "full")
    vision_dir = tmp_path / "vision"
    from minigpt.convert.lavis import save_vision

    save_vision(vision_dir, model.vision.config, model.vision.state_dict())
    model.config.vision_weights = str(vision_dir)
    assert model.save_pretrained(tmp_path / "proj", trainable_only=True) == ["projector"]
    files = sorted(p.name for p in (tmp_path / "proj").iterdir())
    assert files == ["config.json", "projector.safetensors"]
    size = (tmp_path / "proj" / "projector.safetensors").stat().st_size
    assert size < 64 * 32 * 4 + 4096  # weight [64, 32] + bias, float32, plus header
    reloaded = MiniGPT.from_pretrained(tmp_path / "proj")
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


@pytest.mark.parametrize(
    "options",
    [
        GenerationOptions(max_new_tokens=6),
        GenerationOptions(max_new_tokens=6, do_sample=True, temperature=0.7, top_p=0.9, seed=1),
        GenerationOptions(max_new_tokens=6, num_beams=3),
        GenerationOptions(max_new_tokens=6, repetition_penalty=1.3),
    ],
    ids=["greedy", "sampling", "beam", "repetition"],
)
def test_generation_modes_run(tiny_pair_factory, image_file, options):
    engine = Engine(*tiny_pair_factory())
    conv = Conversation.single("<Img><ImageHere></Img> What is it?")
    answers = [a.text for a in engine.generate(conv, [image_file], options)]
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_greedy_is_deterministic_and_batched_equals_single(tiny_pair_factory, image_file, tmp_path):
    engine = Engine(*tiny_pair_factory())
    other = tmp_path / "blue.png"
    PILImage.new("RGB", (20, 20), (0, 0, 255)).save(other)
    opts = GenerationOptions(max_new_tokens=8, min_new_tokens=8)
    c1 = Conversation.single("<Img><ImageHere></Img> Hi")
    c2 = Conversation.single("<Img><ImageHere></Img> A much longer question about the picture here?")
    single = [engine.generate(c1, [image_file], opts)[0].text, engine.generate(c2, [other], opts)[0].text]
    batched = [a.text for a in engine.generate([c1, c2], [image_file, other], opts)]
    assert batched == single


def test_sampling_depends_on_seed(tiny_pair_factory, image_file):
    engine = Engine(*tiny_pair_factory())
    conv = Conversation.single("<Img><ImageHere></Img> Tell me")
    runs = [
        engine.generate(
            conv,
            [image_file],
            GenerationOptions(max_new_tokens=12, min_new_tokens=12, do_sample=True, temperature=2.0, top_p=1.0, seed=s),
        )[0].text
        for s in (1, 1, 2)
    ]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_max_new_tokens_and_stop_strings(tiny_pair_factory, image_file, llama_tokenizer):
    engine = Engine(*tiny_pair_factory())
    conv = Conversation.single("<Img><ImageHere></Img> Tell me")
    full = engine.generate(conv, [image_file], GenerationOptions(max_new_tokens=10, min_new_tokens=10))[0].text
    assert 0 < len(llama_tokenizer.encode(full, add_special_tokens=False)) <= 12
    words = full.split()
    assert len(words) >= 2, full
    stop = words[1]
    cut = engine.generate(conv, [image_file], GenerationOptions(max_new_tokens=10, min_new_tokens=10, stop=[stop]))[
        0
    ].text
    assert stop not in cut and full.startswith(cut)


def test_stop_string_ends_generation_early(tiny_pair_factory, image_file):
    """The stop criterion halts decoding: generated ids stop right after the stop string appears."""
    from minigpt.infer.generate import StopOnStrings

    _, processor = tiny_pair_factory()
    tok = processor.tokenizer
    ids = torch.tensor([tok.encode("It is red.###Human", add_special_tokens=False)])
    crit = StopOnStrings(tok, ["###"], prompt_len=0)
    cut = next(i for i in range(1, ids.shape[1] + 1) if crit(ids[:, :i], None)[0])
    assert tok.decode(ids[0, :cut]).endswith("###")


def test_multi_image_multi_turn_embeddings_at_placeholders(tiny_pair_factory, image_file, tmp_path):
    model, processor = tiny_pair_factory(max_txt_len=64)
    blue = tmp_path / "blue.png"
    PILImage.new("RGB", (20, 20), (0, 0, 255)).save(blue)
    conv = Conversation()
    conv.add("user", "<Img><ImageHere></Img> and <Img><ImageHere></Img> compare them").add("assistant", "Different.")
    conv.add("user", "<Img><ImageHere></Img> and this one?").add("assistant", "Red again.")
    batch = processor.prepare([conv], [image_file, blue, image_file])
    mask = batch.text.image_mask[0]
    assert int(mask.sum()) == 3 * model.image_tokens
    image_embeds = model.encode_images(batch.pixel_values)
    embeds = model.embed(batch, image_embeds)
    positions = mask.nonzero().flatten()
    blocks = positions.view(3, model.image_tokens)
    for k in range(3):
        assert torch.equal(blocks[k], torch.arange(blocks[k][0], blocks[k][0] + model.image_tokens))
        assert torch.allclose(embeds[0, blocks[k]], image_embeds[k])
    # Each block sits right after "<Img>" and before "</Img>".
    tok = processor.tokenizer
    ids = batch.text.input_ids[0]
    for k in range(3):
        before = tok.decode(ids[: blocks[k][0]][-3:])
        after = tok.decode(ids[blocks[k][-1] + 1 :][:3])
        assert before.endswith("<Img>") and after.startswith("</Img>")
    # Answers of both turns are supervised, nothing else.
    supervised = tok.decode(ids[batch.text.labels[0] != IGNORE_INDEX])
    assert supervised == "Different.### Red again.###"


def test_images_distributed_in_order_to_slots(tiny_pair_factory, image_file):
    model, processor = tiny_pair_factory()
    convs = [_single(), Conversation.single("no image here", "ok")]
    batch = processor.prepare(convs, [image_file])
    assert batch.pixel_values.shape[0] == 1
    assert batch.text.image_mask[0].sum() == 8 and batch.text.image_mask[1].sum() == 0


# ---------------------------------------------------------------------- bad input
def test_missing_image_file_is_a_clear_error(tiny_pair_factory, tmp_path):
    model, processor = tiny_pair_factory()
    with pytest.raises(ImageError, match="not found.*nope.png"):
        processor.prepare([_single()], [tmp_path / "nope.png"])


def test_corrupt_image_is_a_clear_error(tiny_pair_factory, tmp_path):
    model, processor = tiny_pair_factory()
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(ImageError, match="bad.jpg"):
        processor.prepare([_single()], [bad])


@pytest.mark.parametrize("mode", ["RGBA", "L", "I;16", "P"])
def test_odd_image_modes_are_converted(tiny_pair_factory, tmp_path, mode):
    model, processor = tiny_pair_factory()
    path = tmp_path / f"img_{mode.replace(';', '')}.png"
    if mode == "I;16":
        PILImage.fromarray(np.full((20, 20), 40000, dtype=np.uint16)).save(path)
    else:
        PILImage.new(mode, (20, 20)).save(path)
    batch = processor.prepare([_single()], [path])
    assert batch.pixel_values.shape == (1, 3, 56, 56)
    assert torch.isfinite(model(batch=batch).loss)


def test_image_without_placeholder_is_rejected(tiny_pair_factory, image_file):
    model, processor = tiny_pair_factory()
    with pytest.raises(ValueError, match="no image placeholder"):
        processor.prepare([Conversation.single("What colour?", "Red.")], [image_file])


def test_too_many_images_is_rejected(tiny_pair_factory, image_file):
    model, processor = tiny_pair_factory()
    with pytest.raises(ValueError, match="too many images"):
        processor.prepare([_single()], [[image_file, image_file]])


def test_too_few_images_is_rejected(tiny_pair_factory):
    model, processor = tiny_pair_factory()
    with pytest.raises(ValueError, match="1 image placeholder.*0 image"):
        processor.prepare([_single()], None)


def test_bad_config_values_are_clear_errors(tiny_llama_dir):
    from minigpt.model.minigpt import MiniGPTConfig

    with pytest.raises(ValueError, match="unknown template 'nope'"):
        MiniGPTConfig(llm=str(tiny_llama_dir), template="nope")
    with pytest.raises(ValueError, match="unknown part"):
        MiniGPTConfig(llm=str(tiny_llama_dir), freeze={"eyes": True})
    with pytest.raises(ValueError, match="unknown dtype"):
        MiniGPTConfig(llm=str(tiny_llama_dir), llm_dtype="float8")


def test_turn_order_is_validated(tiny_pair_factory, image_file):
    model, processor = tiny_pair_factory()
    conv = Conversation().add("assistant", "Hi").add("user", "<image> what?")
    with pytest.raises(ValueError, match="turn 1 is 'assistant'"):
        processor.prepare([conv], [image_file])


def test_text_parts_are_verbatim():
    conv = Conversation.single("<image>\nWhat?")
    assert conv.turns[0].parts == [Image(), Text("\nWhat?")]
