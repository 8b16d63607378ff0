"""Remote code runs only when the loading call asks for it: never because a model folder's ``config.json``, a run's
``train_config.yaml`` or a checkpoint's recorded config says ``trust_remote_code: true``, and an output never
passes the setting on. One table over every command and API that loads an LLM or a tokenizer."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from minigpt.cli import main
from minigpt.model.minigpt import MiniGPT, load_model_config

CODE_FILES = {
    "configuration_x.py": "from transformers import LlamaConfig\n\n\nclass XConfig(LlamaConfig):\n    pass\n",
    "modeling_x.py": "from transformers import LlamaForCausalLM\n\nfrom .configuration_x import XConfig\n\n\n"
    "class XModel(LlamaForCausalLM):\n    config_class = XConfig\n",
    "tokenization_x.py": "from transformers import PreTrainedTokenizerFast\n\n\n"
    "class XTokenizer(PreTrainedTokenizerFast):\n    pass\n",
}
AUTO_MAP = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XModel"}
TOKENIZER_AUTO_MAP = {"AutoTokenizer": [None, "tokenization_x.XTokenizer"]}


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def trap(folder: Path, marker: Path) -> Path:
    """Make the transformers folder ``folder`` (an LLM and/or a tokenizer) map its classes to code that writes
    ``marker`` when imported, and ask for ``trust_remote_code`` in its own files too; returns ``folder``."""
    for name, code in CODE_FILES.items():
        # Subclasses, so that loading the remote code leaves transformers' own classes untouched for later tests.
        (folder / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n" + code)
    if (folder / "config.json").is_file():
        _edit_json(folder / "config.json", auto_map=AUTO_MAP, trust_remote_code=True)
    if (folder / "tokenizer_config.json").is_file():
        _edit_json(folder / "tokenizer_config.json", auto_map=TOKENIZER_AUTO_MAP, trust_remote_code=True)
    return folder


def _booby_trapped(tiny_model_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of a model folder whose config asks for remote code and whose LLM and tokenizer folders map to code
    that writes a marker file when imported."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "ran.txt"
    _edit_json(folder / "config.json", trust_remote_code=True)
    trap(folder / "llm", marker)
    trap(folder / "tokenizer", marker)
    return folder, marker


def test_a_folder_asking_for_remote_code_does_not_get_it(tiny_model_dir, tmp_path, caplog):
    folder, marker = _booby_trapped(tiny_model_dir, tmp_path)
    with caplog.at_level(logging.WARNING, logger="minigpt.model.minigpt"):
        config = load_model_config(folder)
    assert config.trust_remote_code is False
    assert "asks for trust_remote_code; ignored" in caplog.text
    MiniGPT.from_pretrained(folder)  # the LLM loads with its built-in LLaMA code
    assert not marker.exists()


def test_remote_code_runs_when_the_call_asks(tiny_model_dir, tmp_path):
    folder, marker = _booby_trapped(tiny_model_dir, tmp_path)
    MiniGPT.from_pretrained(folder, trust_remote_code=True)
    assert marker.read_text() == "ran"


def test_a_trapped_tokenizer_runs_its_code_when_the_call_asks(tiny_model_dir, tmp_path):
    """The tokenizer trap works (so the table's tokenizer rows can fail)."""
    from minigpt.model.llm import load_tokenizer

    folder, marker = _booby_trapped(tiny_model_dir, tmp_path)
    load_tokenizer(folder / "tokenizer", trust_remote_code=True)
    assert marker.read_text() == "ran"


def test_chat_command_does_not_run_a_folders_code(tiny_model_dir, tmp_path, image_file, monkeypatch, capsys):
    from test_terminal import run_chat

    folder, marker = _booby_trapped(tiny_model_dir, tmp_path)
    code, _ = run_chat([str(folder), "--device", "cpu", "--max-new-tokens", "2"], "Hello?\n", monkeypatch, capsys)
    assert code == 0 and not marker.exists()


# ------------------------------------------------------------------------------------------------ the table
# Each row: (what it loads, where the setting is planted) -> a function (folder, tmp_path, image_file, monkeypatch)
# that runs the command or API on the trapped model folder ``folder`` and returns the output model folder it wrote
# (or None).
Row = Callable[[Path, Path, Path, pytest.MonkeyPatch], "Path | None"]


def _api_minigpt(folder, tmp_path, image_file, monkeypatch):
    MiniGPT.from_pretrained(folder)


def _api_load_pretrained(folder, tmp_path, image_file, monkeypatch):
    from minigpt.model.processor import MiniGPTProcessor, load_pretrained

    load_pretrained(folder)
    MiniGPTProcessor.from_pretrained(folder)


def _api_engine(folder, tmp_path, image_file, monkeypatch):
    from minigpt.infer.engine import Engine

    Engine.from_pretrained(folder, device="cpu")


def _serve(folder, tmp_path, image_file, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    assert main(["serve", str(folder), "--device", "cpu"]) == 0


def _web(folder, tmp_path, image_file, monkeypatch):
    from minigpt.infer import web

    class Demo:
        def queue(self, **_):
            pass

        def launch(self, **_):
            return None, "http://127.0.0.1:7860/", None  # Gradio's (app, local URL, share URL)

        def block_thread(self):
            pass

    monkeypatch.setattr(web, "build_ui", lambda engine: Demo())
    assert main(["web", str(folder), "--device", "cpu"]) == 0


def _eval(folder, tmp_path, image_file, monkeypatch):
    data = tmp_path / "pope.jsonl"
    data.write_text(json.dumps({"question_id": 0, "image": image_file.name, "text": "Red?", "label": "yes"}) + "\n")
    argv = ["eval", str(folder), "--task", "pope", "--data", str(data), "--images", str(image_file.parent)]
    assert main([*argv, "--max-new-tokens", "2", "--output", str(tmp_path / "eval"), "--no-progress"]) == 0


def _export_hf(folder, tmp_path, image_file, monkeypatch):
    assert main(["convert", "export-hf", str(folder), "--out", str(tmp_path / "hf")]) == 0
    text_config = json.loads((tmp_path / "hf" / "config.json").read_text())["text_config"]
    assert "auto_map" not in text_config  # not handed on without its code


def _import_hf(folder, tmp_path, image_file, monkeypatch):
    """A transformers BLIP-2 folder (made clean, then trapped) imported."""
    from minigpt.convert.export_hf import export_hf

    export_hf(folder, tmp_path / "hf")
    hf = tmp_path / "hf"
    _edit_json(hf / "config.json", auto_map={"AutoConfig": AUTO_MAP["AutoConfig"]}, trust_remote_code=True)
    trap(hf, tmp_path / "ran.txt")
    assert main(["convert", "import-hf", str(hf), "--out", str(tmp_path / "imported")]) == 0
    return tmp_path / "imported"


def _data_analyze(folder, tmp_path, image_file, monkeypatch):
    data = tmp_path / "caps.json"
    data.write_text(json.dumps([{"image": image_file.name, "caption": "a red square"}]))
    argv = ["data", "analyze", str(data), "--format", "captions_json", "--image-root", str(image_file.parent)]
    assert main([*argv, "--tokenizer", str(folder / "tokenizer"), "--template", "caption"]) == 0


def _assemble(folder, tmp_path, image_file, monkeypatch):
    from minigpt.model.vision import save_vision

    model = MiniGPT.from_pretrained(folder)
    vision = save_vision(tmp_path / "vision", model.config.vision, model.vision.state_dict())
    argv = ["convert", "assemble", "--llm", str(folder / "llm"), "--vision", str(vision)]
    assert main([*argv, "--projector", str(folder / "projector.safetensors"), "--out", str(tmp_path / "a")]) == 0
    return tmp_path / "a"


def _lora_run(folder: Path, tmp_path: Path) -> Path:
    """A LoRA training run over the trapped LLM whose final/train_config.yaml asks for remote code; returns its
    checkpoint folder."""
    from minigpt.train.checkpoint import save_checkpoint
    from minigpt.train.config import LoraSection
    from minigpt.train.loop import apply_lora

    model = MiniGPT.from_pretrained(folder)
    apply_lora(model, LoraSection(r=2, alpha=4.0, dropout=0.0))
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    run = tmp_path / "run"
    step = save_checkpoint(run, 1, weights, {"step": 1})
    section = {"llm": str(folder / "llm"), "vision": "tiny", "trust_remote_code": True}
    config = {
        "model": {**section, "max_txt_len": 32, "lora": {"r": 2, "alpha": 4.0, "dropout": 0.0}},
        "data": {"datasets": [{"format": "llava", "path": "unused.json"}]},
        "run": {"output_dir": str(run)},
    }
    (run / "final").mkdir()
    (run / "final" / "train_config.yaml").write_text(yaml.safe_dump(config))
    return step


def _merge_lora_run(folder, tmp_path, image_file, monkeypatch):
    step = _lora_run(folder, tmp_path)
    assert main(["convert", "merge-lora", str(step), "--out", str(tmp_path / "merged")]) == 0
    return tmp_path / "merged"


def _merge_lora_base(folder, tmp_path, image_file, monkeypatch):
    step = _lora_run(folder, tmp_path)
    argv = ["convert", "merge-lora", str(step), "--base", str(folder), "--lora-alpha", "4"]
    assert main([*argv, "--out", str(tmp_path / "merged")]) == 0
    return tmp_path / "merged"


def _merge_lora_llm(folder, tmp_path, image_file, monkeypatch):
    """A peft adapter folder merged into the trapped LLM folder."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    peft = get_peft_model(LlamaForCausalLM.from_pretrained(folder / "llm"), LoraConfig(r=2, target_modules=["q_proj"]))
    peft.save_pretrained(tmp_path / "adapter")
    argv = ["convert", "merge-lora", str(tmp_path / "adapter"), "--base", str(folder / "llm")]
    assert main([*argv, "--out", str(tmp_path / "merged")]) == 0


def _deepspeed(folder, tmp_path, image_file, monkeypatch):
    """A ZeRO checkpoint whose recorded minigpt_config asks for remote code, with the trapped LLM as its source."""
    from test_convert_deepspeed import _model_states, _save_dir

    model = MiniGPT.from_pretrained(folder, freeze={"llm": False})
    recorded = {**model.config.to_dict(), "llm": str(folder / "llm"), "trust_remote_code": True}
    module = {k: v.detach().clone() for k, v in model.state_dict().items()}
    states = _model_states(model, module, minigpt_config=recorded)
    run = _save_dir(tmp_path / "run", {"mp_rank_00_model_states.pt": states})
    assert main(["convert", "deepspeed", str(run), "--out", str(tmp_path / "out")]) == 0
    return tmp_path / "out"


def _train_init_from(folder, tmp_path, image_file, monkeypatch):
    """Training's model: ``init_from`` the trapped folder (which asks for remote code), the YAML not asking."""
    from minigpt.train.config import ModelSection
    from minigpt.train.loop import build_model, build_processor

    section = ModelSection(llm=str(folder / "llm"), vision="tiny", init_from=str(folder), max_txt_len=32)
    build_processor(section, build_model(section))


ROWS: dict[str, Row] = {
    "MiniGPT.from_pretrained / config.json": _api_minigpt,
    "load_pretrained + MiniGPTProcessor / config.json": _api_load_pretrained,
    "Engine.from_pretrained / config.json": _api_engine,
    "serve / config.json": _serve,
    "web / config.json": _web,
    "eval / config.json": _eval,
    "export-hf / config.json": _export_hf,
    "import-hf / the BLIP-2 config.json": _import_hf,
    "data analyze --tokenizer / tokenizer_config.json": _data_analyze,
    "assemble / the LLM's config.json": _assemble,
    "merge-lora RUN / the run's train_config.yaml": _merge_lora_run,
    "merge-lora --base DIR / config.json": _merge_lora_base,
    "merge-lora --base LLM / the LLM's config.json": _merge_lora_llm,
    "deepspeed / the checkpoint's minigpt_config": _deepspeed,
    "train init_from / config.json": _train_init_from,
}


@pytest.mark.parametrize("name", list(ROWS))
def test_no_file_turns_remote_code_on(name, tiny_model_dir, tmp_path, image_file, monkeypatch):
    folder, marker = _booby_trapped(tiny_model_dir, tmp_path)
    out = ROWS[name](folder, tmp_path, image_file, monkeypatch)
    assert not marker.exists(), f"{name}: the folder's own code ran"
    if out is not None:
        assert json.loads((out / "config.json").read_text())["trust_remote_code"] is False


def test_an_output_never_inherits_the_flag(tiny_model_dir, tmp_path, image_file, monkeypatch):
    """``--trust-remote-code`` given: the code runs (the trap works), and the folder written says false."""
    folder, marker = _booby_trapped(tiny_model_dir, tmp_path)
    model = MiniGPT.from_pretrained(folder)
    vision = tmp_path / "vision"
    from minigpt.model.vision import save_vision

    save_vision(vision, model.config.vision, model.vision.state_dict())
    argv = ["convert", "assemble", "--llm", str(folder / "llm"), "--vision", str(vision), "--trust-remote-code"]
    assert main([*argv, "--projector", str(folder / "projector.safetensors"), "--out", str(tmp_path / "a")]) == 0
    assert marker.read_text() == "ran"
    assert json.loads((tmp_path / "a" / "config.json").read_text())["trust_remote_code"] is False
    with torch.no_grad():
        assert MiniGPT.from_pretrained(tmp_path / "a", trust_remote_code=True).config.trust_remote_code
