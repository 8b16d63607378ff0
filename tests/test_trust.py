"""A model folder cannot turn remote code on for itself: only the loading call's flag does."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from minigpt.model.minigpt import MiniGPT, load_config


def _booby_trapped(tiny_model_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of a model folder whose config asks for remote code and whose LLM config maps to code that writes a
    marker file when imported."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "ran.txt"
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "trust_remote_code": True}))
    llm_config = json.loads((folder / "llm" / "config.json").read_text())
    llm_config["auto_map"] = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XModel"}
    (folder / "llm" / "config.json").write_text(json.dumps(llm_config))
    # Subclasses, so that loading the remote code leaves transformers' own classes untouched for later tests.
    code = f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import LlamaConfig\n"
    (folder / "llm" / "configuration_x.py").write_text(code + "\n\nclass XConfig(LlamaConfig):\n    pass\n")
    (folder / "llm" / "modeling_x.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_x import XConfig\n\n\n"
        "class XModel(LlamaForCausalLM):\n    config_class = XConfig\n"
    )
    return folder, marker


def test_a_folder_asking_for_remote_code_does_not_get_it(tiny_model_dir, tmp_path, caplog):
    folder, marker = _booby_trapped(tiny_model_dir, tmp_path)
    with caplog.at_level(logging.WARNING, logger="minigpt.model.minigpt"):
        config = load_config(folder)
    assert config.trust_remote_code is False
    assert "asks for trust_remote_code; ignored" in caplog.text
    MiniGPT.from_pretrained(folder)  # the LLM loads with its built-in LLaMA code
    assert not marker.exists()


def test_remote_code_runs_when_the_call_asks(tiny_model_dir, tmp_path):
    folder, marker = _booby_trapped(tiny_model_dir, tmp_path)
    MiniGPT.from_pretrained(folder, trust_remote_code=True)
    assert marker.read_text() == "ran"


def test_chat_command_does_not_run_a_folders_code(tiny_model_dir, tmp_path, image_file, monkeypatch, capsys):
    from test_terminal import run_chat

    folder, marker = _booby_trapped(tiny_model_dir, tmp_path)
    code, _ = run_chat([str(folder), "--device", "cpu", "--max-new-tokens", "2"], "Hello?\n", monkeypatch, capsys)
    assert code == 0 and not marker.exists()
