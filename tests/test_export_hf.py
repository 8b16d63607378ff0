"""Export to transformers' Blip2ForConditionalGeneration: plain transformers loads it and generates the same."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image as PILImage
from transformers import Blip2ForConditionalGeneration, Blip2Processor

from minigpt.convert.export_hf import IMAGE_TOKEN, export_hf, hf_prompt, hf_prompt_ids
from minigpt.data.conversation import Conversation, Image, Text
from minigpt.infer.engine import Engine
from minigpt.infer.generate import GenerationOptions
from minigpt.model.minigpt import MiniGPT
from minigpt.model.processor import MiniGPTProcessor


def _convs():
    return [
        Conversation().add("user", [Image(), Text(" What is in the picture?")]),
        Conversation().add("user", [Image(), Text(" Describe it in detail, please, with colours and shapes.")]),
    ]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_llama_dir):
    from minigpt.model.minigpt import MiniGPTConfig
    from minigpt.model.vision import VisionConfig

    torch.manual_seed(0)
    model = MiniGPT.build(MiniGPTConfig(llm=str(tiny_llama_dir), vision=VisionConfig.tiny(), template="vicuna0"))
    with torch.no_grad():  # a projector that makes the image matter
        model.projector.weight.normal_(0.0, 0.5)
    out = tmp_path_factory.mktemp("hf")
    model.save_pretrained(out / "minigpt")
    ours = MiniGPTProcessor.from_config(model.config)
    ours.save_pretrained(out / "minigpt")
    result = export_hf(out / "minigpt", out / "hf")  # from the directory, as the CLI does
    hf = Blip2ForConditionalGeneration.from_pretrained(out / "hf").eval()
    processor = Blip2Processor.from_pretrained(out / "hf")
    return model.eval(), ours, result, hf, processor


def _hf_inputs(model, hf, batch):
    """Our left-padded batch with every image slot holding the exported image token."""
    ids = batch.text.input_ids.masked_fill(batch.text.image_mask, hf.config.image_token_index)
    return ids, batch.text.attention_mask


def test_config_tokenizer_and_processor(exported, image_file):
    model, mp, result, hf, processor = exported
    vocab = len(mp.tokenizer)
    assert result.image_token_index == vocab == hf.config.image_token_index and result.added_rows == 1
    assert hf.config.num_query_tokens == 8 and hf.config.text_config.model_type == "llama"
    assert hf.config.vision_config.layer_norm_eps == 1e-6  # transformers' post_layernorm eps (ours: 1e-5)
    tok = processor.tokenizer
    assert tok.image_token == IMAGE_TOKEN and tok.convert_tokens_to_ids(IMAGE_TOKEN) == vocab
    assert processor.num_query_tokens is None  # the prompt carries the image tokens (MiniGPT layout)
    emb = hf.get_input_embeddings().weight
    assert emb.shape[0] == vocab + 1
    assert torch.allclose(emb[vocab], model.llm.get_input_embeddings().weight.mean(0), atol=1e-6)
    assert torch.equal(emb[:vocab], model.llm.get_input_embeddings().weight)
    assert torch.equal(hf.language_projection.weight, model.projector.weight)
    # BlipImageProcessor settings reproduce our preprocessing (bicubic, CLIP mean/std, no crop).
    ours = mp.image_processor(image_file)
    theirs = processor(images=PILImage.open(image_file), return_tensors="pt").pixel_values[0]
    assert (ours - theirs).abs().max().item() < 1e-6
    info = json.loads((result.directory / "minigpt_export.json").read_text())
    assert info["template"] == "vicuna0" and info["prompt_example"].count(IMAGE_TOKEN) == 8


def test_same_logits_and_greedy_tokens(exported, image_file):
    model, mp, _, hf, processor = exported
    convs = _convs()
    batch = mp.prepare(convs, [image_file, image_file], train=False)
    ids, mask = _hf_inputs(model, hf, batch)
    assert ids[
        0, -len(hf_prompt_ids(mp.template, processor.tokenizer, convs[0], 8, hf.config.image_token_index)) :
    ].tolist() == hf_prompt_ids(mp.template, processor.tokenizer, convs[0], 8, hf.config.image_token_index)
    with torch.no_grad():
        embeds = model.embed(batch)
        ours = model.llm(inputs_embeds=embeds, attention_mask=mask).logits
        theirs = hf(pixel_values=batch.pixel_values, input_ids=ids, attention_mask=mask).logits
    vocab = ours.shape[-1]
    real = mask.bool()
    diff = (ours - theirs[..., :vocab])[real].abs().max().item()
    print(f"logits max abs diff (ln_vision eps 1e-5 vs 1e-6): {diff:.3g}")
    assert diff < 1e-4
    # Greedy generation: same ids, with transformers' defaults from the exported generation settings.
    eos = hf.language_model.generation_config.eos_token_id
    with torch.no_grad():
        got = hf.generate(
            pixel_values=batch.pixel_values, input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False
        )
        want = model.llm.generate(
            input_ids=batch.text.input_ids,
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=mp.tokenizer.pad_token_id,
        )
    prompt_len = ids.shape[1]
    assert got[:, prompt_len:].tolist() == want[:, prompt_len:].tolist()
    assert got.shape[1] > prompt_len + 5
    # And the text our generate() returns is what the exported model's tokens decode to.
    answers = [
        a.text
        for a in Engine(model, mp).generate(convs, [image_file, image_file], GenerationOptions(max_new_tokens=20))
    ]
    assert answers == [mp.decode(row[prompt_len:]) for row in got]


def test_ln_vision_eps_is_the_only_difference(exported, image_file):
    import dataclasses

    model, mp, _, hf, _ = exported
    pixels = mp.image_processor(image_file)[None]
    with torch.no_grad():
        hf_image = hf.get_image_features(pixel_values=pixels).pooler_output
        ours = model.encode_images(pixels)
        post = model.vision.vision_model.post_layernorm
        saved = post.eps
        post.eps = hf.config.vision_config.layer_norm_eps
        try:
            same_eps = model.encode_images(pixels)
        finally:
            post.eps = saved
    print(
        f"projected image tokens: diff {(ours - hf_image).abs().max().item():.3g} (eps 1e-5 vs 1e-6), "
        f"{(same_eps - hf_image).abs().max().item():.3g} with equal eps"
    )
    assert (same_eps - hf_image).abs().max().item() < 1e-6
    assert (ours - hf_image).abs().max().item() < 1e-4
    assert dataclasses.asdict(model.config.vision)["ln_vision_eps"] == 1e-5


def test_prompt_text_rendering(exported):
    _, mp, _, hf, processor = exported
    text = hf_prompt(mp.template, processor.tokenizer, _convs()[0], 8)
    # No literal <s> (the tokenizer adds BOS), a space after the image tokens where minigpt starts a word.
    assert text.startswith("Give the following image") and f"<Img>{IMAGE_TOKEN * 8} </Img> What" in text
    assert text.endswith("What is in the picture?###Assistant:")


@pytest.mark.parametrize("template", ["vicuna0", "vicuna0_head", "llama2", "caption"])
def test_prompt_text_tokenizes_to_minigpt_ids(exported, template):
    """Multi-turn prompts of every LLaMA template: the text gives minigpt's ids through the processor's tokenizer
    (a second BOS, 'G','ive' for '▁Give' and '</' for '▁</' before the fix)."""
    from minigpt.data.templates import get_template

    _, _, _, hf, processor = exported
    tpl = get_template(template)
    conv = (
        Conversation()
        .add("user", [Image(), Text(tpl.image_separator + "Give it a look?")])
        .add("assistant", [Text("A cat.")])
        .add("user", [Text("And then?")])
    )
    text = hf_prompt(tpl, processor.tokenizer, conv, 8)
    want = hf_prompt_ids(tpl, processor.tokenizer, conv, 8, hf.config.image_token_index)
    assert processor(text=text).input_ids[0] == want


def test_documented_transformers_route_is_token_exact(exported, image_file):
    """The README's route, exactly: Blip2Processor(images, text=minigpt_export.json's prompt_example) ->
    Blip2ForConditionalGeneration.generate gives minigpt's ids, logits and answer."""
    model, mp, result, hf, processor = exported
    info = json.loads((result.directory / "minigpt_export.json").read_text())
    inputs = processor(images=PILImage.open(image_file), text=info["prompt_example"], return_tensors="pt")
    conv = Conversation().add("user", [Image(), Text(" Describe the image.")])
    batch = mp.prepare([conv], [image_file], train=False)
    ours_ids = batch.text.input_ids.masked_fill(batch.text.image_mask, hf.config.image_token_index)
    assert inputs.input_ids.tolist() == ours_ids.tolist() == [info["prompt_example_ids"]]
    with torch.no_grad():
        theirs = hf(**inputs).logits[..., : model.llm.config.vocab_size]
        ours = model.llm(inputs_embeds=model.embed(batch), attention_mask=batch.text.attention_mask).logits
        got = hf.generate(**inputs, max_new_tokens=20, do_sample=False)
    diff = (ours - theirs).abs().max().item()
    print(f"documented route: logits max abs diff {diff:.3g}")
    assert diff < 1e-4
    answer = Engine(model, mp).generate([conv], [image_file], GenerationOptions(max_new_tokens=20))[0].text
    assert mp.decode(got[0, inputs.input_ids.shape[1] :]) == answer


def test_tied_embeddings_and_unrepresentable_models(tmp_path, llama_tokenizer, tiny_model_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(llama_tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            bos_token_id=llama_tokenizer.bos_token_id,
            eos_token_id=llama_tokenizer.eos_token_id,
        )
    )
    llm.save_pretrained(tmp_path / "tied")
    llama_tokenizer.save_pretrained(tmp_path / "tied")
    model = tiny_model_factory(llm=str(tmp_path / "tied")).eval()
    export_hf(model, tmp_path / "hf")
    hf = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert hf.language_model.lm_head.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    assert hf.language_model.lm_head.weight.shape[0] == len(llama_tokenizer) + 1
    ids = torch.tensor([[1, 450, 4996]])
    with torch.no_grad():
        assert torch.equal(hf.language_model(input_ids=ids).logits[..., :-1], model.llm(input_ids=ids).logits)

    with pytest.raises(ValueError, match="not representable.*mlp2x_gelu"):
        export_hf(tiny_model_factory(projector="mlp2x_gelu"), tmp_path / "x")
    with pytest.raises(ValueError, match="not representable.*no Q-Former"):
        from minigpt.model.vision import VisionConfig

        export_hf(tiny_model_factory(vision=VisionConfig.tiny(use_qformer=False)), tmp_path / "y")


def _no_bos_llama(directory, llama_tokenizer):
    """A LLaMA-spm tokenizer that does not add BOS itself (add_bos_token false, as some LLaMA folders ship)."""
    from transformers import AutoTokenizer

    llama_tokenizer.save_pretrained(directory)
    tok = AutoTokenizer.from_pretrained(directory)
    tok.add_bos_token = False
    if hasattr(tok, "update_post_processor"):
        tok.update_post_processor()
    assert tok("a").input_ids[0] != tok.bos_token_id
    return tok


@pytest.mark.parametrize("case", ["llama-spm", "llama-spm-no-bos", "qwen-vicuna0", "qwen-chatml"])
def test_prompt_example_never_spells_bos(case, request, tmp_path, image_file):
    """Whatever the tokenizer does with BOS, the export's prompt_example has no literal BOS and gives minigpt's ids
    through the exported processor (the no-BOS tokenizers wrote a leading '<s>' / '<|endoftext|>' before the fix)."""
    from conftest import save_tiny_llm
    from minigpt.model.minigpt import MiniGPTConfig
    from minigpt.model.vision import VisionConfig

    if case.startswith("qwen"):
        tokenizer, arch = request.getfixturevalue("qwen_tokenizer"), "qwen2"
    elif case == "llama-spm":
        tokenizer, arch = request.getfixturevalue("llama_tokenizer"), "llama"
    else:
        tokenizer, arch = _no_bos_llama(tmp_path / "tok", request.getfixturevalue("llama_tokenizer")), "llama"
    llm = save_tiny_llm(tmp_path / "llm", tokenizer, arch=arch)
    template = "chatml" if case.endswith("chatml") else "vicuna0"
    torch.manual_seed(0)
    model = MiniGPT.build(MiniGPTConfig(llm=str(llm), vision=VisionConfig.tiny(), template=template))
    export_hf(model, tmp_path / "hf")
    info = json.loads((tmp_path / "hf" / "minigpt_export.json").read_text())
    bos = tokenizer.bos_token
    assert not info["prompt_example"].startswith(bos), info["prompt_example"][:40]
    assert bos not in info["prompt_example"]
    processor = Blip2Processor.from_pretrained(tmp_path / "hf")
    got = processor(images=PILImage.open(image_file), text=info["prompt_example"]).input_ids[0]
    assert got == info["prompt_example_ids"]
    if template == "vicuna0":
        assert got[0] == tokenizer.bos_token_id  # the exported tokenizer adds the BOS the template starts with
