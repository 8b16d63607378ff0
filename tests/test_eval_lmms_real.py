"""The real ``lmms-eval --model minigpt`` on a local task (no network), and its sample log scored by minigpt.

Needs lmms-eval installed (``pip install -c constraints.txt -e ".[lmms]"``, see the README); skipped otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from minigpt.eval.runner import score_predictions
from minigpt.eval.tasks import load_task

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("lmms_eval") is None,
        reason="lmms-eval not installed (pip install -c constraints.txt -e '.[lmms]')",
    ),
]

TASK_YAML = """\
task: minigpt_local_pope
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: pope_accuracy
    aggregation: !function utils.aggregate
    higher_is_better: true
metadata:
  - version: 0.0
"""

TASK_UTILS = """\
import os

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))


def doc_to_visual(doc):
    return [Image.open(os.path.join(HERE, doc["image_source"])).convert("RGB")]


def doc_to_text(doc):
    return doc["question"] + "\\nAnswer the question using a single word or phrase."


def process_results(doc, results):
    pred = results[0].lower().strip()
    return {"pope_accuracy": {"question_id": doc["question_id"], "score": float(pred == doc["answer"])}}


def aggregate(results):
    return sum(r["score"] for r in results) / len(results)
"""


def test_lmms_eval_runs_minigpt_on_a_local_task(tmp_path, tiny_model_dir):
    task = tmp_path / "task"
    task.mkdir()
    rows = [
        {"question_id": str(i), "image_source": f"img{i}.png", "question": f"Is there a {obj} in the image?",
         "answer": ans, "category": "random"}
        for i, (obj, ans) in enumerate([("cat", "yes"), ("dog", "no"), ("bus", "no")], 1)
    ]  # fmt: skip
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)], 1):
        Image.new("RGB", (32, 24), color).save(task / f"img{i}.png")
    data = task / "pope_local.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (task / "minigpt_local_pope.yaml").write_text(TASK_YAML.format(data=data))
    (task / "utils.py").write_text(TASK_UTILS)
    out = tmp_path / "out"
    src = str(Path(__file__).parents[1] / "src")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "WANDB_MODE": "disabled",
    }
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "minigpt", "--model_args",
           f"pretrained={tiny_model_dir},device=cpu", "--tasks", "minigpt_local_pope", "--include_path", str(task),
           "--batch_size", "2", "--output_path", str(out), "--log_samples"]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    logs = list(out.rglob("*_samples_minigpt_local_pope.jsonl"))
    assert len(logs) == 1, run.stderr[-3000:]
    entries = [json.loads(line) for line in logs[0].read_text().splitlines()]
    assert sorted(e["doc_id"] for e in entries) == [0, 1, 2]
    assert all("doc" not in e and isinstance(e["filtered_resps"], str) for e in entries)  # the 0.4+ layout

    # minigpt scores lmms-eval's log: every answer attached to the question lmms-eval asked
    result = score_predictions("pope", load_task("pope", data), logs[0])
    by_qid = {e["pope_accuracy"]["question_id"]: e["filtered_resps"] for e in entries}
    assert result.predictions == by_qid and result.metrics["n"] == 3
