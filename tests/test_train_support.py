"""Helpers shared by the ``test_train_*`` files: a synthetic coloured-shapes set and tiny training configs.

(Imported by the other files; the tests here only check the helpers themselves.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from minigpt.tools import shapes

REPO = Path(__file__).resolve().parents[1]


def make_shapes(root: Path, n: int, seed: int = 0, size: int = 32, name: str = "train") -> Path:
    """``n`` pictures (every colour x shape first) and ``root/{name}.json`` in the captions_json format."""
    items = shapes.make_shapes(root, n, seed=seed, size=size)
    return shapes.write_caption_json(items, root / f"{name}.json")


def tiny_config(llm_dir: Path, train_json: Path, output_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A config dict for the tiny model (random tiny BLIP-2 + 2-layer LLaMA) on ``train_json``; ``sections``
    update the model / data / run sections."""
    config: dict[str, Any] = {
        "model": {"llm": str(llm_dir), "vision": "tiny", "template": "caption", "max_txt_len": 16},
        "data": {"datasets": [{"format": "captions_json", "path": str(train_json)}], "num_workers": 0},
        "run": {
            "output_dir": str(output_dir),
            "seed": 7,
            "batch_size": 4,
            "epochs": 1,
            "device": "cpu",
            "optimizer": {"lr": 1e-2, "weight_decay": 0.05},
            "schedule": {"name": "constant"},
            "save_every": 1000,
            "log_every": 1000,
        },
    }
    for name, values in sections.items():
        config[name].update(values)
    return config


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def torchrun(config: dict[str, Any], path: Path, *overrides: str, **env: str) -> subprocess.CompletedProcess:
    """``minigpt train`` on ``config`` (written to ``path``) in two processes (torchrun, one thread each, offline);
    ``overrides`` are dotted ``key=value`` config overrides, ``env`` extra environment variables. Asserts success."""
    return torchrun_cli("train", str(write_yaml(path, config)), *overrides, **env)


def torchrun_cli(*argv: str, nproc: int = 2, **env: str) -> subprocess.CompletedProcess:
    """``minigpt ARGV`` in ``nproc`` processes (torchrun, one thread each, offline). Asserts success."""
    environment = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **env,
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd += ["-m", "minigpt.cli", *argv]
    done = subprocess.run(cmd, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def losses(records: list[dict[str, Any]]) -> list[float]:
    return [r["loss"] for r in records if "loss" in r]


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line]


def test_make_shapes_writes_a_readable_caption_set(tmp_path):
    from minigpt.data.formats import read_captions_json

    samples = read_captions_json(make_shapes(tmp_path, 12))
    assert len(samples) == 12
    captions = {s.conversation.turns[-1].text for s in samples}
    assert len(captions) == 12 and all(Path(s.images[0]).is_file() for s in samples)
