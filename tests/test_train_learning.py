"""The recipe learns: on synthetic coloured shapes a tiny model's held-out loss drops and it uses the image; the
final folder reloads with ``MiniGPT.from_pretrained``; LoRA adapters train and are merged into the saved LLM."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from minigpt.train.config import DatasetSpec, validate_config
from minigpt.train.data import SampleEncoder, eval_loader
from minigpt.train.launch import train
from test_train_support import losses, make_shapes, tiny_config


@torch.no_grad()
def held_out_loss(model, processor, path: Path) -> float:
    model.eval()
    encoder = SampleEncoder.for_processor(processor, train=False)
    total, tokens = 0.0, 0
    for b in eval_loader(
        [DatasetSpec(format="captions_json", path=str(path))], encoder, 8, 0, 1, processor.pad_token_id
    ):
        total += float(model(batch=b.batch).loss) * b.num_tokens
        tokens += b.num_tokens
    return total / tokens


def test_tiny_model_learns_coloured_shapes(tmp_path, tiny_llama_dir):
    data = tmp_path / "data"
    train_json = make_shapes(data, 96, seed=0)
    eval_json = make_shapes(data, 24, seed=1, name="eval")
    records = json.loads(eval_json.read_text())  # the same pictures with each other's captions
    swapped = [{"image": r["image"], "caption": s["caption"]} for r, s in zip(records, records[1:] + records[:1])]
    (data / "swapped.json").write_text(json.dumps(swapped))
    # The ViT stays frozen; Q-Former, projector and LLM train. With random weights, a frozen LLM hardly moves its loss
    # (~10.3 -> 9.8) and a frozen Q-Former passes almost nothing of the image (the same loss with swapped captions).
    config = tiny_config(
        tiny_llama_dir,
        train_json,
        tmp_path / "out",
        model={"freeze": {"qformer": False, "llm": False}},
        data={"eval": [{"format": "captions_json", "path": str(eval_json)}]},
        run={
            "epochs": 12,
            "batch_size": 8,
            "eval_at_start": True,
            "optimizer": {"lr": 3e-3, "weight_decay": 0.05},
            "schedule": {"name": "constant"},
        },
    )
    start = time.perf_counter()
    result = train(validate_config(config))
    seconds = time.perf_counter() - start
    evals = [r["eval_loss"] for r in result.history if "eval_loss" in r]
    before, after = evals[0], evals[-1]
    print(f"held-out loss {before:.3f} -> {after:.3f} in {len(losses(result.history))} steps, {seconds:.1f} s")
    assert after < 0.7 * before  # the bar: a clear drop (> 30 %); it is ~95 % here
    # It looks at the picture: the right captions are clearly likelier than the swapped ones.
    swapped_loss = held_out_loss(result.model, result.processor, data / "swapped.json")
    print(f"held-out loss with swapped captions {swapped_loss:.3f}")
    assert after < 0.6 * swapped_loss
    # The final folder is what chat loads.
    from minigpt.model.minigpt import MiniGPT
    from minigpt.model.processor import MiniGPTProcessor

    reloaded = MiniGPT.from_pretrained(tmp_path / "out" / "final")
    processor = MiniGPTProcessor.from_pretrained(tmp_path / "out" / "final")
    assert held_out_loss(reloaded, processor, eval_json) == pytest.approx(after, rel=1e-5)


def test_lora_trains_adapters_and_final_holds_the_merged_llm(tmp_path, tiny_llama_dir, image_file):
    from minigpt.data.conversation import Conversation
    from minigpt.model.minigpt import MiniGPT
    from minigpt.model.processor import MiniGPTProcessor

    train_json = make_shapes(tmp_path / "data", 8)
    config = tiny_config(
        tiny_llama_dir,
        train_json,
        tmp_path / "out",
        model={"lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}},
        run={"max_steps": 3, "optimizer": {"lr": 1e-2, "weight_decay": 0.0}, "save_every": 3},
    )
    base = {
        n: p.clone() for n, p in MiniGPT.build(validate_config(config).model.minigpt_config()).llm.named_parameters()
    }
    result = train(validate_config(config))
    from minigpt.train.checkpoint import latest_checkpoint, load_checkpoint

    weights, _ = load_checkpoint(latest_checkpoint(tmp_path / "out"))
    assert any("lora_A" in k for k in weights) and any(k.startswith("projector.") for k in weights)
    assert not any(k.startswith("llm.") and "lora_" not in k for k in weights)  # the base LLM stays frozen
    final = tmp_path / "out" / "final"
    assert (final / "llm").is_dir() and json.loads((final / "config.json").read_text())["freeze"]["llm"] is True
    merged = dict(result.model.llm.named_parameters())
    assert any(not torch.equal(merged[n], base[n]) for n in base if n in merged)  # the adapters were merged in
    reloaded = MiniGPT.from_pretrained(final)
    conv = [Conversation.single("<Img><ImageHere></Img>", "a red square")]
    result.model.eval()
    with torch.no_grad():
        expected = result.model(batch=result.processor.prepare(conv, [image_file])).loss
        got = reloaded(batch=MiniGPTProcessor.from_pretrained(final).prepare(conv, [image_file])).loss
    assert float(got) == pytest.approx(float(expected), rel=1e-5)


def test_eval_task_is_scored_during_training_and_logged(tmp_path, tiny_llama_dir):
    """``run.eval_task`` scores a generation task at each evaluation (here POPE on the shapes)."""
    data = tmp_path / "data"
    train_json = make_shapes(data, 8)
    records = json.loads(train_json.read_text())[:4]
    pope = tmp_path / "pope.jsonl"
    pope.write_text(
        "".join(
            json.dumps(
                {
                    "question_id": i,
                    "image": r["image"],
                    "text": "Is there a red shape?",
                    "label": "yes" if "red" in r["caption"] else "no",
                }
            )
            + "\n"
            for i, r in enumerate(records)
        )
    )
    config = tiny_config(
        tiny_llama_dir,
        train_json,
        tmp_path / "out",
        run={
            "max_steps": 2,
            "eval_every": 2,
            "log_every": 1,
            "eval_task": {"task": "pope", "data": str(pope), "images": str(data), "limit": 4, "max_new_tokens": 3},
        },
    )
    config["data"]["eval"] = [{"format": "captions_json", "path": str(train_json)}]
    result = train(validate_config(config))
    scored = [r for r in result.history if "eval/pope/accuracy" in r]
    assert scored and scored[-1]["step"] == 2
    assert 0.0 <= scored[-1]["eval/pope/accuracy"] <= 1.0 and scored[-1]["eval/pope/n"] == 4
    logged = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/pope/f1" in r for r in logged)
