"""``minigpt info``: read from configs and safetensors headers, equal to what the loaded model reports."""

from __future__ import annotations

import json

import pytest
import torch

from minigpt.cli import main
from minigpt.convert.lavis import save_vision
from minigpt.tools.info import describe, format_info, model_info, safetensors_header


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
    assert (parts["projector"]["type"], parts["projector"]["in_dim"], parts["projector"]["out_dim"]) == (
        "linear",
        32,
        64,
    )
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
    assert info["parameters"] == {
        k: {"total": v["total"], "trainable": v["trainable"]} for k, v in model.parameter_counts().items()
    }
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
    assert capsys.readouterr().err == (
        f"minigpt info: error: {tmp_path} is not a minigpt model directory, a transformers model, a vision encoder "
        "folder or a training run folder (it has no config.json, vision_config.json, metrics.jsonl, checkpoints, "
        "final)\n"
    )
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
    (tmp_path / "final" / "train_config.yaml").write_text(
        yaml.safe_dump({"model": {"llm": "x", "lora": {"r": 4, "alpha": 8.0, "dropout": 0.0}}, "run": {"epochs": 1}})
    )
    info = model_info(tmp_path / "final")
    assert info["lora"] == {"r": 4, "alpha": 8.0, "source": "train_config.yaml"}
    capsys.readouterr()
    assert main(["info", str(tmp_path / "final")]) == 0
    lines = capsys.readouterr().out.splitlines()
    llm_line = next(x for x in lines if x.strip().startswith("llm ") and "(" in x and "LoRA" in x)
    assert llm_line.endswith("(LoRA r=4, alpha=8, merged)") and "(frozen)" not in llm_line
    assert any(x.strip().startswith("vision") and x.endswith("(frozen)") for x in lines)

    model.save_pretrained(tmp_path / "merged")
    (tmp_path / "merged" / "merged_lora.json").write_text(
        json.dumps({"merged_by": "minigpt convert merge-lora", "rank": 16, "alpha": 32.0, "modules": 4})
    )
    capsys.readouterr()
    assert main(["info", str(tmp_path / "merged")]) == 0
    assert "(LoRA r=16, alpha=32, merged)" in capsys.readouterr().out
    # A run without LoRA keeps (frozen).
    (tmp_path / "final" / "train_config.yaml").write_text(yaml.safe_dump({"model": {"llm": "x"}}))
    assert "LoRA" not in format_info(model_info(tmp_path / "final"))


def test_transformers_folders_are_described_not_reported_as_nones(tiny_llama_dir, tiny_model_factory, tmp_path, capsys):
    """An LLM folder and a BLIP-2 folder (here an export): architecture, parameters, dtype, what to do with it."""
    from minigpt.convert.export_hf import export_hf

    info = describe(tiny_llama_dir)
    assert (info["kind"], info["architectures"], info["model_type"]) == ("transformers", ["LlamaForCausalLM"], "llama")
    header = safetensors_header(tiny_llama_dir / "model.safetensors")
    assert info["parameters"] == sum(torch.Size(t["shape"]).numel() for t in header.values())
    assert info["dtypes"] == ["F32"] and set(info["modules"]) == {"model", "lm_head"}
    capsys.readouterr()
    assert main(["info", str(tiny_llama_dir)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"transformers model {tiny_llama_dir} (not a minigpt model directory)")
    assert "LlamaForCausalLM (model_type llama)" in text and f"--llm {tiny_llama_dir}" in text and "None" not in text

    model = tiny_model_factory()
    export_hf(model, tmp_path / "hf")
    info = describe(tmp_path / "hf")
    assert info["model_type"] == "blip-2" and info["language_model"] == "llama"
    assert set(info["modules"]) == {"vision_model", "qformer", "query_tokens", "language_projection", "language_model"}
    assert info["modules"]["qformer"]["parameters"] == model.parameter_counts()["qformer"]["total"] - 8 * 32
    assert info["export"]["template"] == "vicuna0"
    capsys.readouterr()
    assert main(["info", str(tmp_path / "hf")]) == 0
    text = capsys.readouterr().out
    assert "Blip2ForConditionalGeneration (model_type blip-2, language model llama)" in text
    assert "minigpt convert import-hf" in text and "export          minigpt convert export-hf: template vicuna0" in text


def test_vision_and_run_folders(tiny_model_factory, tmp_path, capsys):
    from safetensors.torch import save_file

    model = tiny_model_factory()
    save_vision(tmp_path / "vision", model.config.vision, model.vision.state_dict())
    info = describe(tmp_path / "vision")
    counts = model.parameter_counts()
    assert info["kind"] == "vision" and info["vision"]["parameters"] == counts["vision"]["total"]
    assert info["qformer"]["parameters"] == counts["qformer"]["total"]
    capsys.readouterr()
    assert main(["info", str(tmp_path / "vision")]) == 0
    assert "qformer         2 x 32 (4 heads), 8 queries; 23.74K parameters" in capsys.readouterr().out

    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "checkpoints" / "step_00000002" / "meta.json").write_text('{"step": 2}')
    save_file({"w": torch.zeros(4)}, run / "checkpoints" / "step_00000002" / "trainable.safetensors")
    (run / "metrics.jsonl").write_text(
        "\n".join(
            json.dumps(r)
            for r in (
                {"step": 1, "loss": 2.5},
                {"step": 2, "loss": 2.25},
                {"step": 2, "eval_loss": 2.4},
                {"step": 3, "loss": 2.0},
            )
        )
        + '\n{"step": 4, "lo'
    )  # the last line torn by a kill
    info = describe(run)
    assert (info["kind"], info["steps_done"], info["last_loss"], info["last_eval_loss"]) == ("run", 3, 2.0, 2.4)
    assert [c["step"] for c in info["checkpoints"]] == [2] and info["final"] is None
    capsys.readouterr()
    assert main(["info", str(run)]) == 0
    text = capsys.readouterr().out
    assert "steps done      3 (last loss 2.0000, last eval loss 2.4000)" in text
    assert "checkpoints/step_00000002 (step 2)" in text and "none yet (the run has not finished)" in text
    model.save_pretrained(run / "final", trainable_only=True)
    assert describe(run)["final"]["template"] == "vicuna0"
    assert main(["info", str(run)]) == 0
    assert "final           final/: template vicuna0" in capsys.readouterr().out


def test_other_folders_are_a_clear_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"hidden": 3}')
    assert main(["info", str(tmp_path)]) == 2
    assert "neither a minigpt model config (llm, vision) nor a transformers config" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'}: no such folder" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "config.json")]) == 2  # was "no such folder" for an existing file
    assert f"{tmp_path / 'config.json'} is a file, not a folder" in capsys.readouterr().err


def test_a_part_trained_in_an_earlier_stage_is_not_called_frozen(tiny_model_factory, tmp_path, capsys):
    """The quickstart's layout: stage 1 trains the ViT, stage 2 starts from it (model.init_from) and freezes it."""
    stage1 = tmp_path / "stage1" / "final"
    tiny_model_factory(freeze={"vision": False}).save_pretrained(stage1, trainable_only=True)
    stage2 = tmp_path / "stage2" / "final"
    tiny_model_factory().save_pretrained(stage2, trainable_only=True)
    (stage2 / "train_config.yaml").write_text(f"model:\n  init_from: {stage1}\n")
    info = model_info(stage2)
    assert info["trained"]["vision"] is False and info["trained_earlier"] == {"vision": str(stage1)}
    assert main(["info", str(stage2)]) == 0
    counts = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(" " * 16)]
    assert [line[0] for line in counts if "earlier," in line] == ["vision"]  # the parameters table's vision row
    assert (
        " ".join(next(c for c in counts if c[0] == "vision")[3:])
        == f"(frozen in this run; trained earlier, in {stage1})"
    )
    (stage2 / "train_config.yaml").write_text("model:\n  init_from: null\n")  # no earlier stage recorded
    assert model_info(stage2)["trained_earlier"] == {}
