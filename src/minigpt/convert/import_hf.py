"""Import a complete transformers ``Blip2ForConditionalGeneration`` folder as a minigpt model directory.

The inverse of :mod:`minigpt.convert.export_hf`: ``Salesforce/blip2-*`` checkpoints (and our own exports) become a
self-contained model directory that chats, evaluates and fine-tunes like any other:

- ``vision_model.*``, ``qformer.*``, ``query_tokens`` -> ``vision.safetensors`` (as ``convert hf-blip2``; ``ln_vision``
  keeps LAVIS' eps 1e-5, transformers uses 1e-6: ~3e-6 on the image embeddings);
- ``language_projection`` -> a ``linear`` projector;
- ``language_model`` (a causal LM: OPT, LLaMA...) and the folder's tokenizer -> ``llm/``;
- the image size, mean and std from ``preprocessor_config.json``; the template from ``minigpt_export.json`` (our
  exports) or ``template`` (default ``blip2``: the layout of transformers' ``Blip2Processor``, image tokens first,
  then the tokenizer's BOS and the text, so the imported model answers transformers' prompts as transformers does).

Flan-T5 BLIP-2 models have an encoder-decoder language model, which minigpt's causal-LM pipeline cannot hold:
they are refused with that reason.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .lavis import ConversionReport, convert_hf_blip2, convert_minigpt4_projector, is_hf_blip2, vision_encoder

DEFAULT_TEMPLATE = "blip2"

__all__ = ["import_hf"]


def import_hf(
    directory: str | Path, out: str | Path, template: str | None = None, dtype: str | None = None
) -> tuple[list[str], ConversionReport]:
    """Write ``out`` as a minigpt model directory holding every part of the BLIP-2 folder ``directory``; returns
    the parts written and a report. ``dtype``: the LLM's (default: the folder's)."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from ..device import dtype_name
    from ..files import refuse_unsafe_pickle
    from ..model.config import MiniGPTConfig
    from ..model.minigpt import MiniGPT
    from ..model.processor import MiniGPTProcessor
    from ..model.projector import build_projector
    from .export_hf import EXPORT_INFO

    directory = Path(directory)
    if not is_hf_blip2(directory):
        raise FileNotFoundError(f"{directory}: not a transformers BLIP-2 folder (config.json with model_type blip-2)")
    # trust_remote_code=False: a folder's auto_map is never followed (no flag here turns its code on)
    text_type = AutoConfig.from_pretrained(directory, trust_remote_code=False).text_config.model_type
    if text_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(
            f"{directory}: the language model ({text_type}) is not a causal LM; minigpt's LLM is one "
            "(BLIP-2 Flan-T5 models cannot be imported)"
        )
    exported = json.loads((directory / EXPORT_INFO).read_text()) if (directory / EXPORT_INFO).is_file() else {}
    template = template or exported.get("template") or DEFAULT_TEMPLATE

    vision_config, vision_state, report = convert_hf_blip2(directory)
    vision_config = _with_image_processing(vision_config, directory)
    projector_state, projector_report = convert_minigpt4_projector(directory)
    report.notes += projector_report.notes
    with refuse_unsafe_pickle(directory):
        llm = _language_model(directory, dtype)
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = MiniGPTConfig(
        llm=exported.get("source_llm") or str(directory),
        vision=vision_config,
        template=template,
        llm_dtype=dtype_name(llm.dtype),
    )
    out_dim, in_dim = projector_state["weight"].shape
    projector = build_projector("linear", in_dim, out_dim)
    projector.load_state_dict(projector_state)
    model = MiniGPT(config, vision_encoder(vision_config, vision_state), projector, llm)
    report.notes.append(
        f"template {template}"
        + (
            ""
            if template != DEFAULT_TEMPLATE
            else " (transformers' Blip2Processor layout: the image, then the text, which BLIP-2 continues, e.g. "
            "'Question: ... Answer:'; fine-tune with a chat template, or pass --template, for chat)"
        )
    )
    written = model.save_pretrained(out)
    MiniGPTProcessor(config, tokenizer).save_pretrained(out)
    return written, report


def _language_model(directory: Path, dtype: str | None) -> Any:
    """The folder's ``language_model`` as a stand-alone causal LM (transformers resolves names and ties)."""
    from transformers import Blip2ForConditionalGeneration

    from ..device import parse_dtype

    hf = Blip2ForConditionalGeneration.from_pretrained(directory, dtype=parse_dtype(dtype) if dtype else "auto")
    llm = hf.language_model
    del hf
    return llm


def _with_image_processing(config: Any, directory: Path) -> Any:
    """``config`` with the image size, mean and std of the folder's image processor, from
    ``preprocessor_config.json`` (Salesforce's folders) or ``processor_config.json``'s ``image_processor``
    (what transformers 5 writes), when it has one."""
    preprocessor, data = directory / "preprocessor_config.json", None
    if preprocessor.is_file():
        data = json.loads(preprocessor.read_text())
    elif (directory / "processor_config.json").is_file():
        preprocessor = directory / "processor_config.json"
        data = json.loads(preprocessor.read_text()).get("image_processor")
    if not isinstance(data, dict):
        return config
    size = data.get("size") or {}
    changes: dict[str, Any] = {}
    if data.get("image_mean"):
        changes["mean"] = tuple(data["image_mean"])
    if data.get("image_std"):
        changes["std"] = tuple(data["image_std"])
    if size.get("height") and size["height"] != config.image_size:
        raise ValueError(
            f"{preprocessor}: images resized to {size['height']}, the vision encoder takes {config.image_size}"
        )
    return dataclasses.replace(config, **changes)
