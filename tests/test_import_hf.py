"""``convert import-hf``: a whole transformers BLIP-2 folder becomes a minigpt model directory that computes what the
transformers model computes; BLIP-2 folders also serve as ``vision_weights`` and as a projector source."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import Blip2ForConditionalGeneration, BlipImageProcessor, OPTConfig, T5Config

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
    assert "vision, projector, llm (a complete model directory)" in printed and "template caption" in printed
    model = MiniGPT.from_pretrained(tmp_path / "m").eval()
    assert model.config.template == "caption" and list(model.config.vision.mean) == MEAN
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
    from minigpt.convert.lavis import load_vision

    assert torch.equal(load_vision(directory).state_dict()["query_tokens"], hf.query_tokens)  # the converters read it
    with pytest.raises(FileNotFoundError, match="not a vision encoder folder .* 'minigpt convert hf-blip2'"):
        MiniGPT.build(MiniGPTConfig(llm=str(tiny_llama_dir), vision_weights=str(directory)))  # the model says how
    with pytest.raises(FileNotFoundError, match="not a vision encoder folder .* nor a transformers BLIP-2 folder"):
        load_vision(tmp_path)
    assert main(["convert", "projector", str(directory), "--out", str(tmp_path / "p.safetensors")]) == 0
    assert "language_projection: in 16 -> out 16" in capsys.readouterr().out
    assert torch.equal(load_file(tmp_path / "p.safetensors")["weight"], hf.language_projection.weight)
