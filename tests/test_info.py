"""``minigpt info``: read from configs and safetensors headers, equal to what the loaded model reports."""

from __future__ import annotations

import json

import pytest

from minigpt.cli import main
from minigpt.convert.lavis import save_vision
from minigpt.tools.info import format_info, model_info, safetensors_header


def test_full_directory_matches_loaded_model(tiny_model_factory, tmp_path, capsys):
    model = tiny_model_factory(freeze={"qformer": False})
    model.save_pretrained(tmp_path / "m")
    info = model_info(tmp_path / "m")
    counts = model.parameter_counts()
    assert info["parameters"] == counts
    assert info["parameters_total"] == sum(c["total"] for c in counts.values())
    assert info["trained"] == {"vision": False, "qformer": True, "projector": True, "llm": False}
    parts = info["parts"]
    assert parts["vision"]["source"] == "stored" and parts["vision"]["encoder"]["depth"] == 2
    assert parts["qformer"]["num_query_tokens"] == 8 and info["image_tokens"] == 8
    assert (parts["projector"]["type"], parts["projector"]["in_dim"], parts["projector"]["out_dim"]) == ("linear", 32, 64)
    assert parts["llm"]["architectures"] == ["LlamaForCausalLM"] and parts["llm"]["hidden_size"] == 64
    assert parts["llm"]["dtypes"] == ["F32"] and info["template"] == "vicuna0"
    sizes = {f["file"]: f["bytes"] for f in info["files"]}
    assert sizes["llm/model.safetensors"] == (tmp_path / "m" / "llm" / "model.safetensors").stat().st_size
    assert info["bytes_total"] == sum(sizes.values())

    capsys.readouterr()
    assert main(["info", str(tmp_path / "m")]) == 0
    text = capsys.readouterr().out
    assert "projector       linear 32 -> 64; stored; F32" in text and "LlamaForCausalLM" in text
    assert "qformer     23.74K     23.74K" in text and "(frozen)" in text and "llm/model.safetensors" in text
    assert main(["info", str(tmp_path / "m"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == counts


def test_referenced_parts_and_hub_llm(tiny_model_factory, tiny_llama_dir, tmp_path, capsys):
    model = tiny_model_factory(llm_dtype="bfloat16")
    vision = save_vision(tmp_path / "vision", model.config.vision, model.vision.state_dict())
    model.config.vision_weights = str(vision)
    model.save_pretrained(tmp_path / "m", trainable_only=True)  # projector + config only
    info = model_info(tmp_path / "m")
    assert info["parts"]["vision"]["source"] == str(vision)
    assert info["parts"]["llm"]["source"] == str(tiny_llama_dir) and info["dtypes"]["llm"] == "bfloat16"
    assert info["parameters"] == {k: {"total": v["total"], "trainable": v["trainable"]}
                                  for k, v in model.parameter_counts().items()}
    assert [f["file"] for f in info["files"]] == ["config.json", "projector.safetensors"]

    data = json.loads((tmp_path / "m" / "config.json").read_text())
    data["llm"] = "lmsys/vicuna-7b-v0"
    (tmp_path / "m" / "config.json").write_text(json.dumps(data))
    info = model_info(tmp_path / "m")
    assert info["parameters"]["llm"]["total"] is None and info["parameters_total"] is None
    capsys.readouterr()
    assert main(["info", str(tmp_path / "m")]) == 0
    assert "not inspected" in capsys.readouterr().out


def test_errors(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="not a safetensors file"):
        safetensors_header(tmp_path / "bad.safetensors")


def test_merged_lora_llm_is_not_shown_frozen(tiny_model_factory, tmp_path, capsys):
    """Training's final/ after LoRA (train_config.yaml with model.lora) and merge-lora's merged_lora.json: the LLM
    is stored merged, its recorded freeze stays true; info says LoRA r/alpha, merged, not (frozen)."""
    import yaml

    model = tiny_model_factory()
    model.save_pretrained(tmp_path / "final")
    info = model_info(tmp_path / "final")
    assert info["lora"] is None
    (tmp_path / "final" / "train_config.yaml").write_text(yaml.safe_dump(
        {"model": {"llm": "x", "lora": {"r": 4, "alpha": 8.0, "dropout": 0.0}}, "run": {"epochs": 1}}))
    info = model_info(tmp_path / "final")
    assert info["lora"] == {"r": 4, "alpha": 8.0, "source": "train_config.yaml"}
    capsys.readouterr()
    assert main(["info", str(tmp_path / "final")]) == 0
    lines = capsys.readouterr().out.splitlines()
    llm_line = next(x for x in lines if x.strip().startswith("llm ") and "(" in x and "LoRA" in x)
    assert llm_line.endswith("(LoRA r=4, alpha=8, merged)") and "(frozen)" not in llm_line
    assert any(x.strip().startswith("vision") and x.endswith("(frozen)") for x in lines)

    model.save_pretrained(tmp_path / "merged")
    (tmp_path / "merged" / "merged_lora.json").write_text(json.dumps(
        {"merged_by": "minigpt convert merge-lora", "rank": 16, "alpha": 32.0, "modules": 4}))
    capsys.readouterr()
    assert main(["info", str(tmp_path / "merged")]) == 0
    assert "(LoRA r=16, alpha=32, merged)" in capsys.readouterr().out
    # A run without LoRA keeps (frozen).
    (tmp_path / "final" / "train_config.yaml").write_text(yaml.safe_dump({"model": {"llm": "x"}}))
    assert "LoRA" not in format_info(model_info(tmp_path / "final"))
