"""Training config: validation errors name the key path and the file, overrides, the shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from minigpt.train.config import ConfigError, load_config, validate_config
from test_train_support import write_yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = ["minigpt4_stage1", "minigpt4_stage2", "minigpt4qwen", "mpp_pretrain", "mpp_sft", "mpp_sft_lora"]


def _base() -> dict:
    return {
        "model": {"llm": "some/llm", "vision": "tiny"},
        "data": {"datasets": [{"format": "llava", "path": "llava.json"}]},
        "run": {"batch_size": 2},
    }


def _error(tmp_path: Path, data: dict, *overrides: str) -> str:
    path = write_yaml(tmp_path / "cfg.yaml", data)
    with pytest.raises(ConfigError) as err:
        load_config(path, list(overrides))
    return str(err.value)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_validate(name):
    config = load_config(CONFIGS / f"{name}.yaml")
    assert config.model.minigpt_config().template == config.model.template  # maps onto MiniGPTConfig
    assert config.run.seed == 42


def test_shipped_configs_carry_the_reference_values():
    s1, s2 = load_config(CONFIGS / "minigpt4_stage1.yaml"), load_config(CONFIGS / "minigpt4_stage2.yaml")
    assert (s1.run.optimizer.lr, s1.run.schedule.min_lr, s1.run.schedule.warmup_lr) == (1e-4, 8e-5, 1e-6)
    assert (s1.run.epochs, s1.run.iters_per_epoch, s1.run.batch_size, s1.model.max_txt_len) == (4, 5000, 64, 32)
    assert [d.ratio for d in s1.data.datasets] == [115, 14] and s1.model.template == "caption"
    assert (s2.run.optimizer.lr, s2.run.schedule.min_lr, s2.run.schedule.warmup_steps) == (3e-5, 1e-5, 200)
    assert (s2.run.epochs, s2.run.iters_per_epoch, s2.run.batch_size, s2.model.template) == (5, 200, 12, "vicuna0")
    qwen = load_config(CONFIGS / "minigpt4qwen.yaml")
    assert (qwen.run.grad_accum, qwen.run.epochs, qwen.model.max_txt_len, qwen.model.template) == (
        16,
        10,
        256,
        "chatml",
    )
    sft, lora = load_config(CONFIGS / "mpp_sft.yaml"), load_config(CONFIGS / "mpp_sft_lora.yaml")
    assert sft.model.minigpt_config().freeze["llm"] is False and sft.run.optimizer.lr == 2e-5
    assert lora.model.lora is not None and lora.model.minigpt_config().freeze["llm"] is True
    assert load_config(CONFIGS / "mpp_pretrain.yaml").run.optimizer.lr == 1e-3


def test_unknown_key_names_path_file_and_valid_keys(tmp_path):
    data = _base()
    data["run"]["optimizer"] = {"lr": 1e-4, "weight_dacay": 0.1}
    message = _error(tmp_path, data)
    assert "cfg.yaml" in message
    assert "run.optimizer.weight_dacay: unknown key" in message
    assert "weight_decay" in message  # the valid keys are listed


def test_unknown_top_level_section_and_nested_dataset_key(tmp_path):
    data = _base()
    data["trainer"] = {}
    data["data"]["datasets"][0]["img_root"] = "x"
    message = _error(tmp_path, data)
    assert "trainer: unknown key" in message and "data.datasets.0.img_root: unknown key" in message


def test_wrong_types_name_the_key_path(tmp_path):
    data = _base()
    data["run"]["batch_size"] = "four"
    data["model"]["freeze"] = {"llm": "maybe"}
    message = _error(tmp_path, data)
    assert "run.batch_size: Input should be a valid integer" in message and "'four'" in message
    assert "model.freeze.llm: Input should be a valid boolean" in message


def test_semantic_errors(tmp_path):
    data = _base()
    data["model"]["template"] = "alpaca"
    data["model"]["vision"] = {"preset": "tiny", "depht": 3}
    data["data"]["datasets"].append({"format": "webdataset", "path": "shards", "image_root": "x"})
    data["data"]["datasets"].append({"format": "llava", "path": "a.json", "ratio": 0})
    message = _error(tmp_path, data)
    assert "model.template: unknown template 'alpaca'" in message
    assert "model.vision: unknown vision config key(s): depht" in message
    assert "data.datasets.1: image_root does not apply to webdataset" in message
    assert "data.datasets.2.ratio: Input should be greater than 0" in message
    del data["model"]["llm"]
    assert "model.llm: missing (required)" in _error(tmp_path, data)


def test_lora_needs_a_frozen_llm(tmp_path):
    data = _base()
    data["model"].update(lora={"r": 4}, freeze={"llm": False})
    assert "model: lora needs the LLM frozen" in _error(tmp_path, data)


def test_llm_quantization_validates(tmp_path):
    data = _base()
    assert validate_config(data).model.llm_quantization is None
    data["model"]["llm_quantization"] = "4bit"
    assert "needs" not in (err := _error(tmp_path, data)) and "set model.lora" in err
    data["model"]["lora"] = {"r": 4}
    model = validate_config(data).model
    assert (model.llm_quantization, model.llm_quant_type, model.llm_quant_double) == ("4bit", "nf4", True)
    assert "llm_quantization" not in model.minigpt_config().to_dict()  # final/config.json records the base
    assert "model.llm_quantization" in _error(tmp_path, data, "model.llm_quantization=3bit")
    assert "apply to llm_quantization: 4bit only" in _error(
        tmp_path, data, "model.llm_quantization=8bit", "model.llm_quant_double=false"
    )
    assert "DeepSpeed cannot partition" in _error(tmp_path, data, "run.strategy=deepspeed_zero")
    assert "not a GGUF file" in _error(tmp_path, data, "model.llm_gguf_file=x.gguf")


def test_overrides_nested_list_index_and_yaml_values(tmp_path):
    path = write_yaml(tmp_path / "cfg.yaml", _base())
    config = load_config(
        path,
        [
            "run.optimizer.lr=3e-5",
            "run.batch_size=16",
            "data.datasets.0.path=other.json",
            "model.freeze.llm=false",
            "run.report_to=[tensorboard]",
            "model.lora.r=4",
            "model.freeze.llm=true",
        ],
    )
    assert config.run.optimizer.lr == 3e-5 and config.run.batch_size == 16
    assert config.data.datasets[0].path == "other.json"
    assert config.run.report_to == ["tensorboard"] and config.model.lora.r == 4
    assert config.model.minigpt_config().freeze == {"vision": True, "qformer": True, "projector": False, "llm": True}


def test_bad_overrides(tmp_path):
    assert "expected KEY=VALUE" in _error(tmp_path, _base(), "run.batch_size")
    assert "not an index" in _error(tmp_path, _base(), "data.datasets.3.path=x")
    assert "is a value, not a section" in _error(tmp_path, _base(), "run.batch_size.x=1")
    message = _error(tmp_path, _base(), "run.bach_size=3")
    assert "run.bach_size: unknown key" in message and "[from override run.bach_size=3]" in message


def test_yaml_and_file_errors(tmp_path):
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_defaults_and_section_mapping():
    config = validate_config(_base())
    minigpt = config.model.minigpt_config()
    assert minigpt.freeze == {"vision": True, "qformer": True, "projector": False, "llm": True}
    assert minigpt.vision.width == 64  # the tiny preset
    assert config.run.resume == "auto" and config.run.schedule.name == "linear_warmup_cosine"
    assert config.data.datasets[0].reader_spec() == {"format": "llava", "path": "llava.json", "image_root": None}


def test_cli_prints_the_validated_config(tmp_path, capsys):
    from minigpt.train.cli import main

    data = _base()
    data["data"]["datasets"][0]["path"] = str(tmp_path / "llava.json")
    (tmp_path / "llava.json").write_text("[]")
    path = write_yaml(tmp_path / "cfg.yaml", data)
    assert main([str(path), "run.seed=3", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["run"]["seed"] == 3 and printed["run"]["batch_size"] == 2
    assert main([str(path), "run.seed=x"]) == 2
    assert "run.seed" in capsys.readouterr().err


def test_train_is_a_registered_subcommand():
    import argparse

    from minigpt import cli
    from minigpt.train.cli import register

    assert "minigpt.train.cli" in cli.COMMANDS
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "c.yaml", "run.seed=1"])
    assert args.config == "c.yaml" and args.overrides == ["run.seed=1"] and callable(args.func)


@pytest.mark.parametrize("backend", ["tensorboard", "wandb"])
def test_missing_report_backend_is_a_clear_error(tmp_path, monkeypatch, backend):
    import sys

    from minigpt.train.launch import train

    for module in (backend, "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    data = _base()
    data["data"]["datasets"][0]["path"] = str(tmp_path / "llava.json")
    (tmp_path / "llava.json").write_text("[]")
    data["run"].update(report_to=[backend], device="cpu", output_dir=str(tmp_path / "out"))
    with pytest.raises(RuntimeError, match=f"pip install {backend}"):
        train(validate_config(data))


@pytest.mark.parametrize("text", ["no", "off", "false", "'no'"])
def test_amp_no_is_accepted_as_yaml_reads_it(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_base()).replace("run:\n", f"run:\n  amp: {text}\n"), encoding="utf-8")
    assert yaml.safe_load(path.read_text())["run"]["amp"] in (False, "no")
    assert load_config(path).run.amp == "no"
    assert load_config(path, ["run.amp=no"]).run.amp == "no"
    assert "run.amp" in _error(tmp_path, _base(), "run.amp=true")


def test_missing_paths_are_named_by_key_before_anything_loads(tmp_path, capsys):
    from minigpt.train.cli import main
    from minigpt.train.config import check_paths

    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "00000.tar").write_bytes(b"")
    (tmp_path / "cc").mkdir()
    data = _base()
    data["model"].update(
        llm=str(tmp_path / "vicuna-7b"), vision_weights=str(tmp_path / "eva"), projector_weights="proj.pth"
    )
    data["data"]["datasets"] = [
        {"format": "llava", "path": str(tmp_path / "nope.json"), "image_root": str(tmp_path / "imgs")},
        {"format": "webdataset", "path": str(tmp_path / "shards" / "{00000..00001}.tar")},
        {"format": "cc_sbu_align", "path": str(tmp_path / "cc")},
    ]
    data["run"]["resume"] = str(tmp_path / "old-run")
    config = validate_config(data)
    with pytest.raises(ConfigError) as err:
        check_paths(config)
    assert str(err.value).splitlines() == [
        "paths not found:",
        f"  model.llm: no such folder: {tmp_path / 'vicuna-7b'} (nor a hub id ORG/NAME)",
        f"  model.vision_weights: not found: {tmp_path / 'eva'}",
        "  model.projector_weights: not found: proj.pth",
        f"  data.datasets.0.path: not found: {tmp_path / 'nope.json'}",
        f"  data.datasets.0.image_root: not found: {tmp_path / 'imgs'}",
        f"  data.datasets.1.path: webdataset shard not found: {tmp_path / 'shards' / '00001.tar'}",
        f"  data.datasets.2.path: not found: {tmp_path / 'cc' / 'filter_cap.json'}",
        f"  run.resume: not found: {tmp_path / 'old-run'}",
    ]
    path = write_yaml(tmp_path / "cfg.yaml", data)
    assert main([str(path)]) == 2  # training refuses
    assert "model.vision_weights: not found" in capsys.readouterr().err
    assert main([str(path), "--print-config"]) == 0  # the config is shown, its missing paths marked
    out = capsys.readouterr().out
    assert yaml.safe_load(out)["model"]["projector_weights"] == "proj.pth"  # the marks are YAML comments
    assert out.splitlines()[-9:] == [
        "# paths not found (`minigpt train` refuses to start until they exist):",
        *(f"#   {line.strip()}" for line in str(err.value).splitlines()[1:]),
    ]
    check_paths(validate_config(_base() | {"data": {"datasets": [{"format": "llava", "path": str(path)}]}}))


def test_train_checks_paths_before_building_anything(tmp_path, monkeypatch):
    from minigpt.train import launch

    monkeypatch.setattr(launch, "make_strategy", lambda run: pytest.fail("a strategy was made before the check"))
    data = _base()
    data["data"]["datasets"][0]["path"] = str(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match=r"data.datasets.0.path: not found: .*nope.json"):
        launch.train(validate_config(data))
