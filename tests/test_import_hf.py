"""``convert import-hf``: a whole transformers BLIP-2 folder becomes a minigpt model directory that computes what the
transformers model computes; BLIP-2 folders also serve as ``vision_weights`` and as a projector source."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image as PILImage
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessor,
    LlamaConfig,
    OPTConfig,
    T5Config,
)

from minigpt.cli import main
from minigpt.data.conversation import Conversation, Image, Text
from minigpt.infer.engine import Engine
from minigpt.infer.generate import GenerationOptions
from minigpt.model.minigpt import MiniGPT, MiniGPTConfig
from minigpt.model.processor import MiniGPTProcessor

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


@pytest.fixture(scope="module")
def salesforce_like(tmp_path_factory, llama_tokenizer, tiny_blip2_config):
    """A tiny Salesforce/blip2-opt-style folder: OPT language model, tokenizer, image processor."""
    torch.manual_seed(0)
    text = OPTConfig(
        hidden_size=16,
        ffn_dim=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        word_embed_proj_dim=16,
        vocab_size=len(llama_tokenizer),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = Blip2ForConditionalGeneration(tiny_blip2_config(text.to_dict())).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("vision_model.", "qformer.", "query_tokens", "language_projection")):
                p.normal_(0.0, 0.2)
    directory = tmp_path_factory.mktemp("blip2-opt")
    model.save_pretrained(directory)
    llama_tokenizer.save_pretrained(directory)
    BlipImageProcessor(size={"height": 28, "width": 28}, image_mean=MEAN, image_std=STD).save_pretrained(directory)
    return model, directory


def test_import_salesforce_style_folder(salesforce_like, tmp_path, image_file, capsys):
    hf, directory = salesforce_like
    assert main(["convert", "import-hf", str(directory), "--out", str(tmp_path / "m")]) == 0
    printed = capsys.readouterr().out
    assert "vision, projector, llm (a complete model directory)" in printed and "template blip2" in printed
    model = MiniGPT.from_pretrained(tmp_path / "m").eval()
    assert model.config.template == "blip2" and list(model.config.vision.mean) == MEAN
    assert list(model.config.vision.std) == STD and model.config.vision.num_query_tokens == 4
    pixels = torch.randn(2, 3, 28, 28)
    ids = torch.tensor([[1, 450, 4996, 17354]])
    with torch.no_grad():
        want_image = hf.get_image_features(pixel_values=pixels).pooler_output  # projected query outputs
        got_image = model.encode_images(pixels)
        want_logits = hf.language_model(input_ids=ids).logits
        got_logits = model.llm(input_ids=ids).logits
    diff = (got_image - want_image).abs().max().item()
    print(f"import-hf: projected image tokens max abs diff {diff:.3g} (ln_vision eps 1e-5 vs 1e-6)")
    assert diff < 1e-4 and torch.equal(got_logits, want_logits)
    assert torch.equal(model.projector.weight, hf.language_projection.weight)
    conv = Conversation().add("user", [Image(), Text("Question: what is it? Answer:")])
    engine = Engine(model, MiniGPTProcessor.from_pretrained(tmp_path / "m", model.config))
    assert isinstance(engine.generate([conv], [image_file], GenerationOptions(max_new_tokens=3))[0].text, str)


def test_export_then_import_gives_the_same_model(tiny_pair_factory, tmp_path, image_file, capsys):
    from minigpt.convert.export_hf import export_hf

    source, source_processor = tiny_pair_factory()
    with torch.no_grad():
        source.projector.weight.normal_(0.0, 0.5)
    export_hf(source, tmp_path / "hf", processor=source_processor)
    assert main(["convert", "import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    model = MiniGPT.from_pretrained(tmp_path / "back").eval()
    assert model.config.template == "vicuna0"  # from minigpt_export.json
    convs = [Conversation().add("user", [Image(), Text(" What is in the picture?")])]
    batch = source_processor.prepare(convs, [image_file], train=False)
    with torch.no_grad():
        want = source.llm(inputs_embeds=source.embed(batch), attention_mask=batch.text.attention_mask).logits
        got = model.llm(inputs_embeds=model.embed(batch), attention_mask=batch.text.attention_mask).logits
    assert torch.equal(got[..., : want.shape[-1]], want)  # the export's extra <image> row aside
    options = GenerationOptions(max_new_tokens=8)
    back = Engine(model, MiniGPTProcessor.from_pretrained(tmp_path / "back", model.config))
    assert [a.text for a in back.generate(convs, [image_file], options)] == [
        a.text for a in Engine(source, source_processor).generate(convs, [image_file], options)
    ]


def test_refusals_and_errors(tmp_path, capsys, tiny_blip2_config):
    t5 = T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=60, d_kv=8)
    tiny_blip2_config(t5.to_dict()).save_pretrained(tmp_path / "flan-t5")
    assert main(["convert", "import-hf", str(tmp_path / "flan-t5"), "--out", str(tmp_path / "x")]) == 2
    assert "the language model (t5) is not a causal LM" in capsys.readouterr().err
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["convert", "import-hf", str(tmp_path / "llm"), "--out", str(tmp_path / "y")]) == 2
    assert "not a transformers BLIP-2 folder" in capsys.readouterr().err


def test_blip2_folder_as_vision_weights_and_projector(salesforce_like, tiny_llama_dir, tmp_path, capsys):
    hf, directory = salesforce_like
    from minigpt.convert.lavis import load_vision_source

    assert torch.equal(
        load_vision_source(directory).state_dict()["query_tokens"], hf.query_tokens
    )  # the converters read it
    with pytest.raises(FileNotFoundError, match="not a vision encoder folder .* 'minigpt convert hf-blip2'"):
        MiniGPT.build(MiniGPTConfig(llm=str(tiny_llama_dir), vision_weights=str(directory)))  # the model says how
    with pytest.raises(FileNotFoundError, match="not a vision encoder folder .* nor a transformers BLIP-2 folder"):
        load_vision_source(tmp_path)
    assert main(["convert", "projector", str(directory), "--out", str(tmp_path / "p.safetensors")]) == 0
    assert "language_projection: in 16 -> out 16" in capsys.readouterr().out
    assert torch.equal(load_file(tmp_path / "p.safetensors")["weight"], hf.language_projection.weight)


def _blip2_folder(directory, tokenizer, text_config, build_config) -> tuple:
    """A tiny BLIP-2 folder as transformers writes it (model, ``Blip2Processor`` with ``num_query_tokens``, so the
    processor expands the image tokens before the text); returns ``(model, processor)``."""
    tokenizer.save_pretrained(directory / "tok")
    tokenizer = AutoTokenizer.from_pretrained(directory / "tok")  # a copy: the processor adds <image> to it
    image_processor = BlipImageProcessor(size={"height": 28, "width": 28}, image_mean=MEAN, image_std=STD)
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=4)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    eos = tokenizer.eos_token_id
    text_config.update(vocab_size=len(tokenizer), eos_token_id=eos, pad_token_id=tokenizer.pad_token_id or eos)
    config = build_config(text_config)
    config.image_token_index = image_id
    torch.manual_seed(1)
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model, processor


LANGUAGE_MODELS = {
    # LLaMA language model, LLaMA tokenizer (adds BOS); OPT language model, a tokenizer that adds nothing (Qwen's)
    "llama": (
        "llama_tokenizer",
        LlamaConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1
        ),
    ),
    "opt": (
        "qwen_tokenizer",
        OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2, word_embed_proj_dim=16),
    ),
}


@pytest.mark.parametrize("name", sorted(LANGUAGE_MODELS))
def test_imported_blip2_answers_transformers_prompts_as_transformers(name, request, tmp_path, tiny_blip2_config):
    tokenizer_fixture, text = LANGUAGE_MODELS[name]
    tokenizer = request.getfixturevalue(tokenizer_fixture)
    hf, hf_processor = _blip2_folder(tmp_path / "hf", tokenizer, text.to_dict(), tiny_blip2_config)
    assert main(["convert", "import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "m")]) == 0
    engine = Engine.from_pretrained(tmp_path / "m")
    assert engine.processor.template.name == "blip2"
    bos_added = hf_processor.tokenizer("a").input_ids[0] == hf_processor.tokenizer.bos_token_id
    assert bos_added == (name == "llama")  # both layouts are covered
    generator = torch.Generator().manual_seed(0)
    picture = PILImage.fromarray((torch.rand(28, 28, 3, generator=generator) * 255).byte().numpy())
    for prompt in ("Question: what is in the picture? Answer:", "a photo of"):
        inputs = hf_processor(images=picture, text=prompt, return_tensors="pt")
        conv = Conversation().add("user", [Image(), Text(prompt)])
        batch = engine.processor.prepare([conv], [picture], train=False)
        ids = batch.text.input_ids.masked_fill(batch.text.image_mask, hf.config.image_token_index)
        assert ids.tolist() == inputs.input_ids.tolist()  # the image first, then BOS (if any) and the text
        assert torch.allclose(batch.pixel_values, inputs.pixel_values, atol=1e-6)  # the folder's mean and std
        with torch.no_grad():
            want = hf(**inputs).logits[0, -1]
            got = engine.model.llm(
                inputs_embeds=engine.model.embed(batch), attention_mask=batch.text.attention_mask
            ).logits[0, -1]
            generated = hf.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs.input_ids.shape[1] :]
        diff = (got - want).abs().max().item()
        print(f"import-hf {name}: last-token logits max abs diff {diff:.2g}")
        assert diff < 1e-4
        answer = engine.generate([conv], [picture], GenerationOptions(max_new_tokens=6))[0].text
        assert answer == engine.processor.decode(generated) and answer


def test_blip2_template_training_layout(llama_tokenizer, qwen_tokenizer):
    """Training as LAVIS' blip2_opt: image, the tokenizer's start tokens, the prompt unsupervised, answer + "\\n"."""
    from minigpt.data.templates import IMAGE_SLOT, Chunk, get_template

    template = get_template("blip2")
    conv = Conversation().add("user", [Image(), Text(" Question: what? Answer:")]).add("assistant", [Text(" red")])
    bos = Chunk(ids=(llama_tokenizer.bos_token_id,))
    assert template.render_train(conv, llama_tokenizer) == [
        Chunk(IMAGE_SLOT),
        bos,
        Chunk("Question: what? Answer:"),
        Chunk(" red\n", supervised=True),
    ]
    assert template.render_train(conv, qwen_tokenizer)[1] == Chunk("Question: what? Answer:")  # Qwen adds no BOS
    assert template.stop_token_ids(llama_tokenizer) == []  # EOS only, as transformers' generate


def test_imported_model_exports_back_to_blip2s_layout(salesforce_like, tmp_path, image_file):
    """import-hf then export-hf: the blip2 template is exported as BLIP-2's own processor layout (num_query_tokens
    set), and prompt_example is the bare text."""
    from minigpt.convert.export_hf import export_hf

    _, directory = salesforce_like
    assert main(["convert", "import-hf", str(directory), "--out", str(tmp_path / "m")]) == 0
    export_hf(tmp_path / "m", tmp_path / "hf")
    info = json.loads((tmp_path / "hf" / "minigpt_export.json").read_text())
    processor = Blip2Processor.from_pretrained(tmp_path / "hf")
    assert processor.num_query_tokens == 4 and info["prompt_example"] == "Describe the image."
    got = processor(images=PILImage.open(image_file), text=info["prompt_example"]).input_ids[0]
    assert got == info["prompt_example_ids"] and got[:4] == [info["image_token_index"]] * 4
