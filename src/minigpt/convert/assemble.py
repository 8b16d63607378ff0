"""Assemble a model directory from base parts: an LLM, a vision encoder folder (or a transformers BLIP-2 folder) and
a projector checkpoint (ours, or an original MiniGPT-4 / MiniGPT4Qwen / MPP one), as ``minigpt convert assemble``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class AssembleOptions:
    """How :func:`assemble` builds the directory: the prompt ``template`` (None: :func:`suggested_template`), the
    projector's type, the LLM dtype recorded (and used with ``full``), ``full`` (copy the LLM and the vision weights
    in) and whether the LLM's own modelling code may run."""

    template: str | None = None
    projector_type: str = "linear"
    dtype: str = "float32"
    full: bool = False
    trust_remote_code: bool = False


def assemble(
    llm: str,
    vision: str | Path,
    projector: str | Path,
    out: str | Path,
    options: AssembleOptions = AssembleOptions(),
) -> tuple[list[str], Any]:
    """Write a model directory from base parts; returns the parts written (see ``save_pretrained``) and
    the conversion report.

    ``vision``: a vision encoder folder or a transformers BLIP-2 folder. A checkpoint that also holds vision-stack
    tensors (a trained Q-Former: ``query_tokens``, ``Qformer.bert.*``) gets them loaded; the encoder is then stored.
    Without ``options.full`` the LLM is built on the meta device (only its
    config and tokenizer are read) and the directory references ``llm`` and ``vision``: a hub id as is, a local
    folder by its path relative to ``out`` (resolved against the directory when it loads), so the tree can move."""
    from ..model.config import MiniGPTConfig
    from ..model.llm import meta_llm as build_meta_llm
    from ..model.minigpt import MiniGPT
    from ..model.processor import MiniGPTProcessor
    from ..model.vision import VISION_CONFIG
    from .lavis import ConversionReport, checkpoint_vision, convert_minigpt4_projector, is_hf_blip2, load_checkpoint

    vision, out = Path(vision), Path(out)
    template, projector_type, full = options.template, options.projector_type, options.full
    if not (vision / VISION_CONFIG).is_file() and not is_hf_blip2(vision):
        raise FileNotFoundError(
            f"{vision}: not a vision encoder folder (no {VISION_CONFIG}) nor a transformers BLIP-2 "
            "folder; make one with 'minigpt convert lavis' or 'hf-blip2'"
        )
    if not Path(projector).is_file():
        raise FileNotFoundError(f"{projector}: no such file")
    checkpoint = load_checkpoint(projector)
    if Path(projector).suffix == ".safetensors":  # ours
        weights, report = checkpoint, ConversionReport()
    else:  # an original MiniGPT-4 / MiniGPT4Qwen / MPP checkpoint
        weights, report = convert_minigpt4_projector(checkpoint)
    config = MiniGPTConfig(
        llm=llm,
        vision_weights=str(vision),
        projector=projector_type,
        template=template or "vicuna0",
        llm_dtype=options.dtype,
        trust_remote_code=options.trust_remote_code,
    )
    model = MiniGPT.build(config, llm=None if full else build_meta_llm(llm, options.trust_remote_code))
    processor = MiniGPTProcessor.from_config(config)  # the tokenizer, read while the sources are absolute
    config.llm, config.vision_weights = _relative_reference(llm, out), _relative_reference(str(vision), out)
    want = {k: list(v.shape) for k, v in model.projector.state_dict().items()}
    got = {k: list(v.shape) for k, v in weights.items()}
    if want != got:
        raise ValueError(
            f"the projector {projector} ({got}) does not fit this LLM (hidden "
            f"{model.llm.get_input_embeddings().embedding_dim}) and vision encoder (out {model.vision.out_dim}): "
            f"a {projector_type} projector needs {want}"
        )
    model.projector.load_state_dict(weights)
    trained_vision, used = checkpoint_vision(model.config.vision, checkpoint)
    if trained_vision:
        model.vision.load_state_dict(trained_vision, strict=False)
        config.vision_weights = None  # the encoder differs from its source now: stored in the directory
        report.ignored = [k for k in report.ignored if k not in set(used)]
        report.notes = [n for n in report.notes if "belong to the vision stack" not in n]
        report.notes.append(
            f"loaded {len(used)} vision-stack tensor(s) of the checkpoint ({_parts_of(trained_vision)})"
            " over the base encoder; the vision encoder is stored in the directory"
        )
    suggested, why = suggested_template(checkpoint, model.llm.config.model_type, model.config.vision.use_qformer)
    if template is None:
        processor.set_template(suggested)
        report.notes.append(f"template {suggested}: {why} (--template to choose another)")
    elif template != suggested:
        report.notes.append(f"template {template} as asked, though {why} suggests {suggested}")
    written = model.save_pretrained(out, trainable_only=not full)
    processor.save_pretrained(out)
    return written, report


def suggested_template(checkpoint: dict[str, Any], llm_type: str, use_qformer: bool) -> tuple[str, str]:
    """The template an original checkpoint was trained with, and why: MiniGPT4Qwen / MPP (``llm_proj``) and Qwen
    LLMs use ChatML, MiniGPT-4 LLaMA-2 (no Q-Former) ``[INST]``, MiniGPT-4 otherwise Vicuna v0."""
    if any(k.startswith(("llm_proj.", "visionpipe.llm_proj.")) for k in checkpoint):
        return "chatml", "an llm_proj checkpoint (MiniGPT4Qwen / MPP-Qwen)"
    if llm_type.startswith("qwen"):
        return "chatml", f"a {llm_type} LLM (MiniGPT4Qwen style)"
    if not use_qformer:
        return "llama2", "a vision encoder without Q-Former (MiniGPT-4 LLaMA-2)"
    return "vicuna0", "a MiniGPT-4 (Vicuna v0) checkpoint"


def _parts_of(state: dict[str, Any]) -> str:
    parts = {"query_tokens" if k == "query_tokens" else k.split(".")[0] for k in state}
    return ", ".join(sorted(parts))


def _relative_reference(source: str, out: Path) -> str:
    """A local folder as its path relative to the model directory ``out``; anything else (a hub id) as is."""
    if not Path(source).exists():
        return source
    return os.path.relpath(Path(source).resolve(), out.resolve())
