"""Fold a trained LoRA adapter into the LLM and save plain weights: ``minigpt convert merge-lora``.

The adapter is one of:

- a training checkpoint (``OUTPUT/checkpoints/step_N``, or a run's ``OUTPUT`` meaning its newest checkpoint) or a
  weights file (``.safetensors``, or ``.pth`` read with ``weights_only=True``): LoRA tensors named
  ``[prefix.]base_model.model.<module>.lora_{A,B}[.<adapter>].weight`` (our ``llm.`` prefix, MiniGPT-v2's
  ``llama_model.``) plus, for our checkpoints, the other trained parts (``projector.*``, ...). These files do not
  record the LoRA scale: alpha comes from ``config`` (the run's YAML, ``model.lora.alpha``; found by itself as
  ``OUTPUT/final/train_config.yaml``) or ``lora_alpha`` (refused where it contradicts the config, unless forced);
  the rank is read from the tensors;
- a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``/``.bin``), loaded with
  ``PeftModel.from_pretrained``.

The base is a minigpt model directory (written: a model directory with the merged LLM stored in ``llm/`` and the
base's ``freeze`` recorded, as training's ``final`` folder; ``export_hf_dir`` also writes the transformers
``Blip2ForConditionalGeneration`` export) or a plain transformers LLM folder (written: the merged LLM folder).
Without a base, a training config builds it as the run did (``model`` section, ``init_from`` included).

The merge is peft's ``merge_and_unload`` (what training's ``save_final_model`` runs), so the merged model's
outputs are the adapter-on outputs up to float rounding (1e-6 in float32).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files import atomic_directory, refuse_unsafe_pickle, respect_umask
from .lavis import ConversionReport

log = logging.getLogger(__name__)

__all__ = ["MergeOptions", "MergeResult", "LoraWeights", "read_lora_weights", "merge_lora_into", "merge_lora"]

ADAPTER_CONFIG = "adapter_config.json"
MERGE_INFO = "merged_lora.json"
LORA_KEY = re.compile(r"^(?:(?P<prefix>.+?)\.)?base_model\.model\.(?P<path>.+)\.lora_(?P<ab>A|B)(?:\.[^.]+)?\.weight$")
UNSUPPORTED = ("lora_embedding_", "lora_magnitude_vector", "lora_bias")


@dataclass
class LoraWeights:
    """LoRA tensors of an adapter file, by LLM module path (``model.layers.0.self_attn.q_proj``)."""

    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    prefix: str | None
    other: dict[str, torch.Tensor]  # the file's other tensors (trained parts of a MiniGPT)
    source: Path

    @property
    def ranks(self) -> dict[str, int]:
        return {p: int(t.shape[0]) for p, t in self.a.items()}


@dataclass
class MergeResult:
    directory: Path
    kind: str  # "minigpt" (a model directory) or "llm" (a transformers LLM folder)
    modules: int
    rank: int
    alpha: float
    written: list[str] = field(default_factory=list)
    hf: Any = None  # export_hf's ExportResult with export_hf_dir
    report: ConversionReport = field(default_factory=ConversionReport)


# ---------------------------------------------------------------------------------------------- reading


def _checkpoint_file(path: Path) -> Path:
    from ..train.checkpoint import WEIGHTS, latest_checkpoint

    if path.is_file():
        return path
    if (path / WEIGHTS).is_file():
        return path / WEIGHTS
    newest = latest_checkpoint(path)
    if newest is not None:
        return newest / WEIGHTS
    raise FileNotFoundError(
        f"{path}: not an adapter: expected a checkpoint folder ({WEIGHTS}), a run's output folder (checkpoints/), "
        f"a peft adapter folder ({ADAPTER_CONFIG}) or a weights file"
    )


def read_lora_weights(path: str | Path) -> LoraWeights:
    """The LoRA (and other) tensors of a checkpoint folder, a run folder or a weights file."""
    from ..safe_load import load_checkpoint

    file = _checkpoint_file(Path(path))
    state = load_checkpoint(file)
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    other: dict[str, torch.Tensor] = {}
    prefixes = set()
    for key, value in state.items():
        m = LORA_KEY.match(key)
        if m is None:
            if any(u in key for u in UNSUPPORTED):
                raise ValueError(
                    f"{file}: {key}: this LoRA variant (embedding LoRA, DoRA, LoRA bias) is merged from a "
                    "peft adapter folder only (adapter_config.json + adapter_model.safetensors)"
                )
            other[key] = value
            continue
        prefixes.add(m["prefix"])
        (a if m["ab"] == "A" else b)[m["path"]] = value
    if not a:
        raise ValueError(f"{file}: no LoRA tensors (*.lora_A.* / *.lora_B.*) in it: not a LoRA run's checkpoint")
    if len(prefixes) > 1:
        raise ValueError(f"{file}: LoRA tensors under several prefixes: {sorted(map(str, prefixes))}")
    unpaired = sorted(set(a) ^ set(b))
    if unpaired:
        raise ValueError(f"{file}: LoRA A/B tensors without their partner: {', '.join(unpaired[:5])}")
    for p in a:
        if a[p].ndim != 2 or b[p].ndim != 2 or b[p].shape[1] != a[p].shape[0]:
            raise ValueError(f"{file}: {p}: lora_A {list(a[p].shape)} and lora_B {list(b[p].shape)} do not fit")
    return LoraWeights(a, b, prefixes.pop(), other, file)


def _run_config(weights_file: Path) -> Path | None:
    """``OUTPUT/final/train_config.yaml`` of a checkpoint ``OUTPUT/checkpoints/step_N/trainable.safetensors``."""
    from ..train.checkpoint import CHECKPOINTS
    from ..train.loop import FINAL_DIR

    step = weights_file.parent
    if step.parent.name == CHECKPOINTS:
        candidate = step.parent.parent / FINAL_DIR / "train_config.yaml"
        if candidate.is_file():
            return candidate
    return None


# ---------------------------------------------------------------------------------------------- merging


def merge_lora_into(llm: nn.Module, lora: LoraWeights, alpha: float) -> tuple[nn.Module, int]:
    """Wrap ``llm`` with peft LoRA layers exactly where ``lora`` has tensors, load them and merge; returns the
    merged (plain) LLM and the rank."""
    from peft import LoraConfig, get_peft_model

    modules = dict(llm.named_modules())
    absent = sorted(p for p in lora.a if p not in modules)
    if absent:
        raise ValueError(
            f"the adapter has LoRA weights for modules this LLM lacks ({', '.join(absent[:5])}): was "
            "it trained on another LLM?"
        )
    ranks = lora.ranks
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    rank = max(counts, key=lambda r: counts[r])
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules="^(?:" + "|".join(re.escape(p) for p in sorted(lora.a)) + ")$",
        rank_pattern={re.escape(p): r for p, r in ranks.items() if r != rank},
    )
    peft_model = get_peft_model(llm, config)
    state = {}
    for path in lora.a:
        state[f"base_model.model.{path}.lora_A.default.weight"] = lora.a[path]
        state[f"base_model.model.{path}.lora_B.default.weight"] = lora.b[path]
    try:
        result = peft_model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise ValueError(f"the LoRA weights do not fit this LLM: {err}") from None
    not_loaded = [k for k in result.missing_keys if ".lora_" in k]
    if result.unexpected_keys or not_loaded:
        raise ValueError(f"LoRA weights not placed: unexpected {result.unexpected_keys[:5]}, missing {not_loaded[:5]}")
    return peft_model.merge_and_unload(), rank


def _chosen_alpha(flag: float | None, recorded: float | None, record: str, force: bool) -> float:
    """The LoRA alpha to merge with: ``flag`` (``--lora-alpha``) where it agrees with ``recorded`` or there is no
    record; a contradiction is refused unless ``force`` (a wrong alpha scales every LoRA update, silently)."""
    if flag is None:
        assert recorded is not None
        return recorded
    if recorded is not None and float(flag) != recorded and not force:
        raise ValueError(
            f"--lora-alpha {flag:g} contradicts the run's record ({record}: {recorded:g}); drop --lora-alpha to "
            f"merge with {recorded:g}, or add --force-lora-alpha to merge with {flag:g}"
        )
    return float(flag)


def _is_minigpt_dir(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    data = json.loads(config.read_text())
    return "vision" in data and "llm" in data and "model_type" not in data


def _load_base(
    base: Path | None, config: Any, dtype: str | None, trust_remote_code: bool, report: ConversionReport
) -> tuple[str, Any, Any]:
    """("minigpt", MiniGPT, its processor) or ("llm", llm, its tokenizer). Remote code runs only with
    ``trust_remote_code`` (the call's flag), never because the run's YAML asks for it."""
    if base is None:
        if config is None:
            raise ValueError(
                "give the base model: --base (a minigpt model directory or an LLM folder), or --config "
                "(the run's training YAML) to build it as the run did"
            )
        from ..model.config import REMOTE_CODE_IGNORED
        from ..train.loop import build_model, build_processor

        if config.model.trust_remote_code and not trust_remote_code:
            report.notes.append(f"the run's model.trust_remote_code {REMOTE_CODE_IGNORED}")
        # the base as the run built it, unquantized (a QLoRA run's adapter merges onto the full-precision LLM)
        section = config.model.model_copy(
            update={"lora": None, "llm_quantization": None, "trust_remote_code": trust_remote_code}
        )
        if dtype:
            section = section.model_copy(update={"llm_dtype": dtype})
        model = build_model(section, config.run.seed)
        return "minigpt", model, build_processor(section, model)
    if not base.is_dir():
        raise FileNotFoundError(f"--base {base}: no such folder")
    if _is_minigpt_dir(base):
        from ..model.minigpt import ADAPTER_DIR
        from ..model.processor import load_pretrained

        if (base / ADAPTER_DIR).is_dir():  # QLoRA's final/: loading it merges its adapter already
            raise ValueError(
                f"--base {base} holds a LoRA adapter ({ADAPTER_DIR}/), merged in when it loads: merge its run folder "
                "instead (minigpt convert merge-lora OUTPUT), which builds the unquantized base from the run's config"
            )

        overrides: dict[str, Any] = {"llm_dtype": dtype} if dtype else {}
        return "minigpt", *load_pretrained(base, trust_remote_code=trust_remote_code, **overrides)
    if (base / "config.json").is_file():
        from transformers import AutoTokenizer

        from ..model.llm import load_llm

        llm = load_llm(base, dtype or "float32", trust_remote_code=trust_remote_code)
        return "llm", llm, AutoTokenizer.from_pretrained(str(base), trust_remote_code=trust_remote_code)
    raise FileNotFoundError(f"--base {base}: neither a minigpt model directory nor a transformers LLM folder")


def _save_minigpt(model: Any, processor: Any, out: Path, full: bool) -> list[str]:
    """``save_pretrained`` with the (merged) LLM stored and the base's ``freeze`` recorded (as training's final)."""
    written = model.save_pretrained(out, trainable_only=not full, include=("llm",))
    processor.save_pretrained(out)
    return written


def _fresh(path: Path, what: str) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{what} {path} exists and is not empty; choose a new folder")


@dataclass(frozen=True)
class MergeOptions:
    """How :func:`merge_lora` merges and writes: ``lora_alpha`` (for checkpoints that do not record it; one that
    contradicts the run's record is refused unless ``force_alpha``), the LLM ``dtype`` to load and save (None: the
    base's), ``full`` (store every part), ``export_hf_dir`` (also write the transformers export), the shard size of
    what is written, and whether the LLM's own modelling code may run."""

    lora_alpha: float | None = None
    force_alpha: bool = False
    dtype: str | None = None
    full: bool = False
    export_hf_dir: str | Path | None = None
    max_shard_size: str = "5GB"
    trust_remote_code: bool = False


def merge_lora(
    adapter: str | Path,
    out: str | Path,
    base: str | Path | None = None,
    config: str | Path | None = None,
    options: MergeOptions = MergeOptions(),
) -> MergeResult:
    """Merge ``adapter`` into ``base`` and write ``out`` (see the module doc and :class:`MergeOptions`)."""
    lora_alpha, force_alpha, export_hf_dir = options.lora_alpha, options.force_alpha, options.export_hf_dir
    max_shard_size = options.max_shard_size
    adapter, out = Path(adapter), Path(out)
    _fresh(out, "--out")
    if export_hf_dir is not None:
        _fresh(Path(export_hf_dir), "--export-hf")
    from ..train.config import load_config

    train_config = load_config(config) if config is not None else None
    report = ConversionReport()
    peft_dir = adapter.is_dir() and (adapter / ADAPTER_CONFIG).is_file()
    lora: LoraWeights | None = None
    if not peft_dir:
        lora = read_lora_weights(adapter)
        if train_config is None:
            found = _run_config(lora.source)
            if found is not None:
                config, train_config = found, load_config(found)
                report.notes.append(f"LoRA settings from {found}")
    kind, loaded, text = _load_base(
        Path(base) if base is not None else None, train_config, options.dtype, options.trust_remote_code, report
    )
    llm = loaded.llm if kind == "minigpt" else loaded

    if peft_dir:
        from peft import PeftConfig, PeftModel

        peft_config = PeftConfig.from_pretrained(str(adapter))
        if peft_config.peft_type != "LORA":
            raise ValueError(f"{adapter}: a {peft_config.peft_type} adapter, not LoRA")
        record = f"lora_alpha in {adapter / ADAPTER_CONFIG}"
        peft_config.lora_alpha = _chosen_alpha(lora_alpha, float(peft_config.lora_alpha), record, force_alpha)
        with refuse_unsafe_pickle(adapter):  # adapter_model.bin is read with weights_only=True
            try:
                peft_model = PeftModel.from_pretrained(llm, str(adapter), config=peft_config, is_trainable=False)
            except (RuntimeError, ValueError, KeyError) as err:
                raise ValueError(f"{adapter}: the adapter does not fit the base LLM: {err}") from None
        modules = sum(1 for n, _ in peft_model.named_modules() if n.endswith(".lora_A"))
        merged = peft_model.merge_and_unload()
        rank, alpha = int(peft_config.r), float(peft_config.lora_alpha)
        scale = alpha / (math.sqrt(rank) if peft_config.use_rslora else rank)
        if peft_config.use_rslora:
            report.notes.append("rank-stabilised LoRA (scale alpha / sqrt(r))")
    else:
        assert lora is not None
        lora_section = train_config.model.lora if train_config is not None else None
        if lora_section is None and lora_alpha is None:
            raise ValueError(
                f"{lora.source} does not record the LoRA alpha (the scale is alpha / r): pass --lora-alpha (the run's "
                "model.lora.alpha, 16 by default) or --config with the run's training YAML"
            )
        recorded = float(lora_section.alpha) if lora_section is not None else None
        alpha = _chosen_alpha(lora_alpha, recorded, f"model.lora.alpha in {config}", force_alpha)
        merged, rank = merge_lora_into(llm, lora, alpha)
        scale = alpha / rank
        modules = len(lora.a)
        if lora_section is not None and lora_section.r != rank:
            report.notes.append(f"the tensors have rank {rank}, the config says r={lora_section.r}: used {rank}")
        if len(set(lora.ranks.values())) > 1:
            report.notes.append(f"ranks differ per module: {sorted(set(lora.ranks.values()))}")
        if lora.other:
            if kind == "minigpt":
                try:
                    result = loaded.load_state_dict(lora.other, strict=False)
                except RuntimeError as err:
                    raise ValueError(f"{lora.source}: its trained parts do not fit the base model: {err}") from None
                placed = sorted(set(lora.other) - set(result.unexpected_keys))
                report.ignored.extend(result.unexpected_keys)
                parts = sorted({k.split(".")[0] for k in placed})
                if parts:
                    report.notes.append(
                        f"also loaded the checkpoint's trained {', '.join(parts)} ({len(placed)} tensors)"
                    )
            else:
                report.ignored.extend(sorted(lora.other))
    report.notes.append(f"merged LoRA into {modules} module(s): rank {rank}, alpha {alpha:g} (scale {scale:g})")

    info = {
        "merged_by": "minigpt convert merge-lora",
        "adapter": str(adapter.resolve()),
        "base": str(Path(base).resolve()) if base else None,
        "config": str(Path(config).resolve()) if config else None,
        "rank": rank,
        "alpha": alpha,
        "alpha_from": "--lora-alpha" if lora_alpha is not None else "adapter_config.json" if peft_dir else "config",
        "modules": modules,
    }
    with atomic_directory(out) as tmp:
        if kind == "minigpt":
            loaded.llm = merged
            written = _save_minigpt(loaded, text, tmp, options.full)
        else:
            if export_hf_dir is not None:
                raise ValueError("--export-hf needs a minigpt model as the base (a plain LLM folder was given)")
            merged.save_pretrained(tmp, max_shard_size=max_shard_size)
            respect_umask(tmp)
            text.save_pretrained(tmp)
            written = ["llm"]
        (tmp / MERGE_INFO).write_text(json.dumps(info, indent=2) + "\n")
    result = MergeResult(out, kind, modules, rank, alpha, written, report=report)
    if export_hf_dir is not None:
        from .export_hf import export_hf

        result.hf = export_hf(loaded.eval(), export_hf_dir, max_shard_size=max_shard_size, processor=text)
        report.notes.extend(result.hf.report.notes)
    return result
