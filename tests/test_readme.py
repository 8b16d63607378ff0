"""Every code block of README.md runs in a test.

The ```python and ```bash blocks are extracted in order and each must have an entry in ``BLOCKS``, keyed by the
block's first line exactly as written. ``test_every_block_is_covered`` fails on a block without an entry and on an
entry whose block is gone: **when you add or edit a README block, add or update its entry here.**

- ``Py(subs, slow)``: the block is executed (``exec``) with the current folder set to a workspace holding what README
  blocks name (see ``workspace``: ``runs/mine/final``, ``model/``, ``model-hf/``, ``cat.jpg``, ...; add files there
  when a new block names new ones). ``subs`` replaces text before it runs, only for what a test cannot have (a 7B hub
  id, full-size encoders, a fixed port); each replaced text must occur in the block, so a README edit that drops it
  fails here.
- ``Sh(run, subs, other, slow)``: each command (continuation lines joined, ``&&`` splits, comments dropped) is
  handled by the first rule that applies:
  1. a command starting with a prefix in ``run`` is run in the workspace, ``minigpt`` being minigpt's CLI
     in-process, and must exit 0;
  2. any other minigpt command (``minigpt``, ``.venv/bin/minigpt``, ``torchrun ... -m minigpt.cli``,
     ``deepspeed ... --module minigpt.cli``, environment assignments in front) is parsed by minigpt's argument
     parser: every subcommand, flag and choice must exist, nothing runs (real 7B models and datasets);
  3. a command starting with a prefix in ``other`` (install script, the test suite itself, the GPU script) is
     checked as far as a test can: the file it runs exists and ``bash -n`` accepts it; the entry says why no more;
  4. anything else fails.
  ``subs`` ({old: new}) applies to commands before rules 1-2 (e.g. ``[--json]``, an optional flag written as such).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from conftest import REPO, SHARED

README = REPO / "README.md"


@dataclass(frozen=True)
class Py:
    subs: dict[str, str] = field(default_factory=dict)
    slow: bool = False


@dataclass(frozen=True)
class Sh:
    run: tuple[str, ...] = ()
    subs: dict[str, str] = field(default_factory=dict)
    other: dict[str, str] = field(default_factory=dict)  # command prefix -> why it is only checked
    slow: bool = False


BLOCKS: dict[str, Py | Sh] = {
    # Set up and run
    "bash scripts/install.sh && .venv/bin/minigpt quickstart     # install (CPU), then the embedded demo": Sh(
        other={
            "bash scripts/install.sh": "installs torch and every dependency from PyPI (CI runs it: .ci/run)",
            ".venv/bin/python -m pytest": "the test suite itself",
        }
    ),
    # Use it from Python
    "from minigpt import Engine": Py(subs={"max_new_tokens=100": "max_new_tokens=8"}),
    "from minigpt import Conversation, Engine, GenerationOptions, MiniGPT, MiniGPTConfig, MiniGPTProcessor, VisionConfig": Py(
        subs={
            'llm="lmsys/vicuna-7b-v0"': "llm=TINY_LLAMA",
            "vision=VisionConfig(),": "vision=VisionConfig.tiny(),",
            "max_new_tokens=100": "max_new_tokens=8",
        }
    ),
    # Training
    "minigpt train configs/minigpt4_stage2.yaml model.llm=/models/vicuna-7b run.batch_size=4": Sh(),
    "torchrun --nproc_per_node 8 -m minigpt.cli train configs/mpp_sft_zero2.yaml": Sh(),
    "minigpt train configs/qlora_stage2.yaml model.llm=/models/Qwen-14B-Chat": Sh(),
    "torchrun --nproc_per_node 2 -m minigpt.cli train CONFIG run.strategy=fsdp": Sh(),
    # Memory: will it fit? (the commands run for real in test_memory_plan's slow README test)
    "minigpt plan configs/minigpt4_stage2.yaml model.llm=vicuna-7b run.batch_size=4": Sh(),
    # Fine-tune on your own pictures (run line by line, as written, by tests/test_import_walk.py)
    "minigpt quickstart --task digits --no-chat             # a model to start from: runs/quickstart/stage2/final": Sh(),
    # Data tools
    "minigpt data analyze llava_instruct.json -f llava --tokenizer Qwen/Qwen-7B-Chat --trust-remote-code \\": Sh(),
    # Checkpoints of the original projects
    "# BLIP-2 vision stack (EVA ViT-g + Q-Former) from LAVIS files, or from a transformers BLIP-2 folder": Sh(
        run=(
            "minigpt convert hf-blip2 blip2-opt-2.7b/",
            "minigpt convert import-hf blip2-opt-2.7b/",
            "minigpt convert projector pretrained_minigpt4_7b.pth",
            "minigpt convert export-hf model/",
            "minigpt info model/",
        ),
        subs={"[--json]": "--json"},
    ),
    "import json": Py(),
    # Performance
    "OMP_NUM_THREADS=1 minigpt bench train --device cpu --llm small --vision small --stage 1 --batch-size 8 --reference-style": Sh(
        other={"bash scripts/gpu_bench.sh": "needs a GPU"}
    ),
    # Preparing weights
    "minigpt convert apply-delta --base llama-7b-hf/ --delta vicuna-7b-delta-v0/ --target vicuna-7b/": Sh(),
    # Chat, web UI and server
    "from minigpt.infer.chat import Chat": Py(),
    "from openai import OpenAI": Py(
        subs={
            '"http://127.0.0.1:8000/v1"': "SERVER_URL",
            '"data:image/png;base64,..."': "PNG_DATA_URL",
        }
    ),
    # Evaluation
    "minigpt eval MODEL --task vqa --data v2_Questions_val.json v2_Annotations_val.json --images coco/val2014": Sh(),
}


def readme_blocks() -> list[tuple[int, str, str]]:
    """``(line, language, text)`` of every ```python / ```bash block of the README."""
    blocks, lines = [], README.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = re.fullmatch(r"```(\w+)\s*", lines[i])
        if match:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            if match.group(1) in ("python", "bash"):
                blocks.append((i + 1, match.group(1), "\n".join(lines[i + 1 : end])))
            i = end
        i += 1
    return blocks


def _key(text: str) -> str:
    return text.splitlines()[0]


def test_every_block_is_covered():
    blocks = readme_blocks()
    missing = [f"README.md:{line} ({lang}) {_key(text)!r}" for line, lang, text in blocks if _key(text) not in BLOCKS]
    assert not missing, "README blocks without an entry in tests/test_readme.py BLOCKS:\n" + "\n".join(missing)
    stale = set(BLOCKS) - {_key(text) for _, _, text in blocks}
    assert not stale, f"BLOCKS entries whose README block is gone: {sorted(stale)}"
    for line, lang, text in blocks:
        assert isinstance(BLOCKS[_key(text)], Py if lang == "python" else Sh), f"README.md:{line}: {lang} block"
    assert len(blocks) >= 13


def _substitute(text: str, subs: dict[str, str], where: str) -> str:
    for old, new in subs.items():
        assert old in text, f"{where}: {old!r} (replaced by the test) is no longer in the block"
        text = text.replace(old, new)
    return text


# ---------------------------------------------------------------------------------------------- workspace


def _picture(path: Path, colour: tuple[int, int, int]) -> None:
    from PIL import Image

    Image.new("RGB", (40, 30), colour).save(path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir, tiny_llama_dir) -> Path:
    """What the README blocks name, built from tiny models."""
    from minigpt.convert.export_hf import export_hf
    from minigpt.model.vision import Blip2VisionEncoder, VisionConfig, save_vision

    root = tmp_path_factory.mktemp("readme")
    for name, colour in (("cat.jpg", (200, 120, 40)), ("taxi.jpg", (230, 200, 20)), ("cat.png", (90, 60, 30))):
        _picture(root / name, colour)
    _picture(root / "dog.png", (120, 90, 60))
    for folder in ("runs/mine/final", "runs/quickstart/stage2/final", "model"):
        shutil.copytree(tiny_model_dir, root / folder)
    torch.manual_seed(0)
    tiny = VisionConfig.tiny()
    save_vision(root / "weights" / "blip2-vision", tiny, Blip2VisionEncoder(tiny).state_dict())
    export_hf(root / "model", root / "model-hf")
    shutil.copytree(root / "model-hf", root / "blip2-opt-2.7b")
    shutil.copy(SHARED / "fixtures" / "lavis-tiny" / "minigpt4_proj.pth", root / "pretrained_minigpt4_7b.pth")
    return root


@pytest.fixture()
def in_workspace(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    return workspace


# ---------------------------------------------------------------------------------------------- python


def _python_cases():
    return [
        pytest.param(line, text, marks=[pytest.mark.slow] if BLOCKS.get(_key(text), Py()).slow else [], id=f"L{line}")
        for line, lang, text in readme_blocks()
        if lang == "python"
    ]


@pytest.mark.parametrize(("line", "text"), _python_cases())
def test_python_block_runs(line, text, in_workspace, tiny_llama_dir, capsys):
    entry = BLOCKS.get(_key(text))
    if entry is None:
        pytest.fail(f"README.md:{line} is not in BLOCKS (see test_every_block_is_covered)")
    code = _substitute(text, entry.subs, f"README.md:{line}")
    namespace = {"TINY_LLAMA": str(tiny_llama_dir), "__name__": "readme_block"}
    with _OpenAIServer(code, in_workspace) as extra:
        namespace.update(extra)
        exec(compile(code, f"README.md:{line}", "exec"), namespace)
    printed = capsys.readouterr().out
    if "print(" in code:
        assert printed.strip(), f"README.md:{line} printed nothing"


class _OpenAIServer:
    """For the openai block: a live ``minigpt serve``-equivalent server (api key KEY, model name "final")."""

    def __init__(self, code: str, root: Path) -> None:
        self.needed, self.root, self.stack = "SERVER_URL" in code, root, None

    def __enter__(self) -> dict[str, str]:
        if not self.needed:
            return {}
        import base64
        import contextlib

        from minigpt.infer.chat import ChatEngine
        from minigpt.infer.engine import Engine
        from minigpt.infer.generate import GenerationOptions
        from minigpt.infer.server import ServerSettings
        from test_server import serve

        engine = ChatEngine(
            Engine.from_pretrained(self.root / "runs" / "mine" / "final"),
            GenerationOptions(max_new_tokens=4),
            max_context=512,
            name="final",
        )
        self.stack = contextlib.ExitStack()
        self.stack.callback(engine.close)
        url = self.stack.enter_context(serve(engine, ServerSettings(api_key="KEY")))
        png = base64.b64encode((self.root / "cat.png").read_bytes()).decode()
        return {"SERVER_URL": url, "PNG_DATA_URL": f"data:image/png;base64,{png}"}

    def __exit__(self, *exc) -> None:
        if self.stack is not None:
            self.stack.close()


# ---------------------------------------------------------------------------------------------- bash


def _commands(text: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        out += [part.strip() for part in line.split("&&")]
    return out


def _minigpt_argv(words: list[str]) -> list[str] | None:
    """The arguments after the minigpt program in ``words`` (env assignments, torchrun, deepspeed), else None."""
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]
    if words and Path(words[0]).name == "minigpt":
        return words[1:]
    if words and words[0] in ("torchrun", "deepspeed", "python", "python3"):
        for i, word in enumerate(words):
            if word == "minigpt.cli" and words[i - 1] in ("-m", "--module"):
                return words[i + 1 :]
    return None


def _bash_cases():
    cases = []
    for line, lang, text in readme_blocks():
        if lang != "bash":
            continue
        entry = BLOCKS.get(_key(text), Sh())
        for command in _commands(text):
            slow = entry.slow
            cases.append(pytest.param(line, text, command, marks=[pytest.mark.slow] if slow else [], id=command[:60]))
    return cases


@pytest.mark.parametrize(("line", "text", "command"), _bash_cases())
def test_bash_command(line, text, command, in_workspace):
    from minigpt.cli import build_parser, main

    entry = BLOCKS.get(_key(text))
    if entry is None:
        pytest.fail(f"README.md:{line} is not in BLOCKS (see test_every_block_is_covered)")
    subs = {old: new for old, new in entry.subs.items() if old in command}
    command = _substitute(command, subs, f"README.md:{line}")
    words = shlex.split(command, comments=True)
    argv = _minigpt_argv(words)
    if argv is not None and any(command.startswith(prefix) for prefix in entry.run):
        assert main(argv) == 0, f"README.md:{line}: {command}"
        return
    if argv is not None:
        try:
            build_parser().parse_args(argv)
        except SystemExit as stop:
            pytest.fail(f"README.md:{line}: minigpt's parser refuses {command!r} (exit {stop.code})")
        return
    reason = next((why for prefix, why in entry.other.items() if command.startswith(prefix)), None)
    assert reason, f"README.md:{line}: {command!r} is neither a minigpt command nor listed in BLOCKS' other"
    script = next((w for w in words if w.endswith(".sh")), None)
    if script:
        assert (REPO / script).is_file(), script
        subprocess.run(["bash", "-n", str(REPO / script)], check=True)
    else:
        assert (REPO / "pyproject.toml").is_file() and shutil.which("bash"), command


def test_run_rules_match_commands():
    """Every ``run`` prefix names a command of its block (a renamed README command must not go unnoticed)."""
    blocks = {_key(text): text for _, _, text in readme_blocks()}
    for key, entry in BLOCKS.items():
        if isinstance(entry, Sh) and key in blocks:
            commands = _commands(blocks[key])
            for prefix in (*entry.run, *entry.other):
                assert any(c.startswith(prefix) for c in commands), f"{prefix!r} matches no command of {key!r}"


def test_minigpt_argv_finds_the_program():
    assert _minigpt_argv(["OMP_NUM_THREADS=1", "minigpt", "bench", "train"]) == ["bench", "train"]
    assert _minigpt_argv(["torchrun", "--nproc_per_node", "4", "-m", "minigpt.cli", "train", "x"]) == ["train", "x"]
    assert _minigpt_argv(["deepspeed", "--module", "minigpt.cli", "train"]) == ["train"]
    assert _minigpt_argv([".venv/bin/minigpt", "quickstart"]) == ["quickstart"]
    assert _minigpt_argv(["bash", "scripts/install.sh"]) is None
