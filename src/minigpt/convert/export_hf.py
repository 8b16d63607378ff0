"""Export a minigpt model directory to a plain ``transformers`` ``Blip2ForConditionalGeneration`` folder.

The exported folder loads with ``Blip2ForConditionalGeneration.from_pretrained`` and ``Blip2Processor``
(no minigpt code, no ``trust_remote_code``), so any transformers-based stack can serve it:

- ``vision_model.*``, ``qformer.*``, ``query_tokens``: our encoder's tensors (they already use these names);
- ``language_projection``: our ``linear`` projector (``mlp2x_gelu`` has no place in BLIP-2: an error);
- ``language_model``: the LLM, as ``text_config`` = the LLM's own config;
- the tokenizer puts BOS before every text when the template starts prompts with it (set when the LLM's tokenizer
  does not already), so a prompt text never spells out BOS;
- an ``<image>`` token (added to the tokenizer when missing; the embedding matrices grow by one row only if
  the new id is beyond them, the new rows are the mean of the old ones) whose id is ``image_token_index``.

What plain transformers does differently, and what that costs:

- transformers' ``post_layernorm`` (LAVIS' ``ln_vision``) uses the ViT's eps 1e-6, ours LAVIS' 1e-5: the
  image embeddings differ by ~3e-6 (lavis-tiny fixture), the logits by a few 1e-6 (measured on the tiny
  model); greedy tokens stay the same in the tests, but ties may in principle resolve differently.
- The image position: ``Blip2Processor`` with ``num_query_tokens`` set puts the image tokens before BOS (the
  BLIP-2 layout, our ``blip2`` template, exported so). MiniGPT-4 templates put them inside the prompt (``<Img><ImageHere></Img>``), so the
  processor is saved with ``num_query_tokens=None`` and the prompt text must carry the ``<image>`` tokens
  where our template has its image slot: :func:`hf_prompt` renders it as a text that the processor tokenizes to
  exactly our ids (``minigpt_export.json`` has an example, and its ids).
- Stop strings spanning several tokens (``###`` as two tokens) are not in ``generation_config``; single-token
  stops and EOS are (``eos_token_id``), the rest is the serving stack's ``stop`` option.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.conversation import Conversation, Image, Text
from ..data.templates import IMAGE_SLOT, Blip2Template, Template, special_prefix
from ..data.tokenize import encode_chunks
from ..files import respect_umask
from .lavis import ConversionReport

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
EXPORT_INFO = "minigpt_export.json"

__all__ = ["IMAGE_TOKEN", "ExportResult", "export_hf", "blip2_config", "hf_prompt", "hf_prompt_ids"]


@dataclass
class ExportResult:
    directory: Path
    image_token_index: int
    num_query_tokens: int
    added_rows: int
    report: ConversionReport = field(default_factory=ConversionReport)


def blip2_config(model: Any, text_config: Any, image_token_index: int) -> Any:
    """transformers ``Blip2Config`` of a :class:`~minigpt.model.minigpt.MiniGPT` (checks representability)."""
    from transformers import Blip2Config
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    v = model.config.vision
    if not v.use_qformer:
        raise ValueError(
            "not representable as Blip2ForConditionalGeneration: the vision encoder has no Q-Former "
            "(MiniGPT-4 LLaMA-2 style concatenated patch tokens)"
        )
    if model.config.projector != "linear" or not isinstance(model.projector, nn.Linear):
        raise ValueError(
            f"not representable as Blip2ForConditionalGeneration: projector {model.config.projector!r}; "
            "BLIP-2's language_projection is a single nn.Linear (use a 'linear' projector)"
        )
    if text_config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or model.config.trust_remote_code:
        raise ValueError(
            f"the LLM ({text_config.model_type}) is not a causal LM that plain transformers builds without "
            "trust_remote_code; Blip2ForConditionalGeneration cannot hold it"
        )
    return Blip2Config(
        vision_config=v.hf_vision_config(),
        qformer_config=v.hf_qformer_config(),
        text_config=text_config,
        num_query_tokens=v.num_query_tokens,
        image_token_index=image_token_index,
    )


def _image_token(
    tokenizer: Any, trust_remote_code: bool = False, add_bos: bool = False, named: bool = True
) -> tuple[Any, int]:
    """A copy of ``tokenizer`` with ``<image>`` as a special token and (``named``) as its ``image_token`` (what
    ``Blip2Processor`` reads), and that token's id. ``add_bos``: the copy puts BOS before every text (the template
    starts prompts with it), so a prompt text never has to spell it out. Not ``named`` for a processor with
    ``num_query_tokens``: transformers' ``Blip2Processor`` then expects the token it adds itself (an ``AddedToken``)
    and fails on the tokenizer's string."""
    import tempfile

    from transformers import AddedToken, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        tok = AutoTokenizer.from_pretrained(
            tmp,
            **({"extra_special_tokens": {"image_token": IMAGE_TOKEN}} if named else {}),
            trust_remote_code=trust_remote_code,
        )
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    if add_bos and special_prefix(tok) != (tok.bos_token_id,):
        tok.add_bos_token = True
        if hasattr(tok, "update_post_processor"):
            tok.update_post_processor()
    index = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if tok.convert_ids_to_tokens(index) != IMAGE_TOKEN or tok.pad_token_id != tokenizer.pad_token_id:
        raise ValueError(f"could not add {IMAGE_TOKEN} to the tokenizer")
    return tok, index


def _starts_with_bos(processor: Any, conversation: Conversation) -> bool:
    """Whether the template's generation prompt starts with the tokenizer's BOS (as a literal id)."""
    bos = processor.tokenizer.bos_token_id
    try:
        first = processor.template.render_prompt(conversation, processor.tokenizer)[0]
    except ValueError:
        return False
    return bos is not None and first.ids is not None and first.ids[:1] == (bos,)


def _grown(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` with ``rows`` extra rows, each the mean of the existing ones (a neutral new token)."""
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(rows, -1)], dim=0)


def _llm_state(llm: nn.Module, rows: int) -> dict[str, torch.Tensor]:
    """The LLM's state dict with the input/output embedding matrices grown by ``rows`` (ties kept)."""
    state = dict(llm.state_dict())
    if rows <= 0:
        return state
    grown: dict[int, torch.Tensor] = {}
    targets = [m.weight for m in (llm.get_input_embeddings(), llm.get_output_embeddings()) if m is not None]
    for name, value in list(state.items()):
        for target in targets:
            if value.data_ptr() == target.data_ptr() and value.shape == target.shape:
                key = target.data_ptr()
                if key not in grown:
                    grown[key] = _grown(value, rows)
                state[name] = grown[key]
    return state


def _generation_config(template: Template, tokenizer: Any) -> Any:
    from transformers import GenerationConfig

    eos = [ids[0] for ids in template.stop_token_ids(tokenizer) if len(ids) == 1]
    if tokenizer.eos_token_id is not None:
        eos.append(tokenizer.eos_token_id)
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=sorted(set(eos)) or None,
        pad_token_id=tokenizer.pad_token_id,
    )


def export_hf(
    model_or_dir: Any,
    out: str | Path,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str = "5GB",
    processor: Any = None,
) -> ExportResult:
    """Write ``out`` as a ``Blip2ForConditionalGeneration`` folder + ``Blip2Processor`` files.

    ``model_or_dir``: a :class:`~minigpt.model.minigpt.MiniGPT` (left unchanged; ``processor``: its processor, else
    the one its config names) or its directory.
    ``dtype``: of the saved weights (default: the model's LLM dtype); the Q-Former and query tokens are saved
    in float32 (transformers' ``_keep_in_fp32_modules``; its loader may still cast them to ``dtype``).
    """
    from transformers import Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor
    from transformers.image_utils import PILImageResampling

    from ..device import dtype_name, parse_dtype
    from ..model.processor import MiniGPTProcessor, load_pretrained

    if isinstance(model_or_dir, (str, Path)):  # load the LLM in the export dtype straight away (memory)
        overrides = {"llm_dtype": dtype_name(parse_dtype(dtype))} if dtype else {}
        model, processor = load_pretrained(model_or_dir, **overrides)
    else:
        model = model_or_dir
        processor = processor or MiniGPTProcessor.from_config(model.config)
    dtype = parse_dtype(dtype or model.config.llm_dtype)
    out = Path(out)
    report = ConversionReport()

    example = (
        Conversation()
        .add("user", [Image(), Text(processor.template.image_separator + "Describe the image.")])
        .with_system(processor.config.system_prompt)
    )
    native = isinstance(processor.template, Blip2Template)  # BLIP-2's own layout: the processor adds the images
    tokenizer, image_index = _image_token(
        processor.tokenizer,
        model.config.trust_remote_code,
        add_bos=_starts_with_bos(processor, example),
        named=not native,
    )
    rows = model.llm.get_input_embeddings().weight.shape[0]
    added = max(0, image_index + 1 - rows)
    text_config = copy.deepcopy(model.llm.config)
    if getattr(text_config, "auto_map", None):  # the LLM folder's own code is not exported: do not point at it
        del text_config.auto_map
        report.notes.append("dropped the LLM's auto_map from text_config (its code is not part of the export)")
    if added:
        text_config.vocab_size = rows + added
        report.notes.append(
            f"added {IMAGE_TOKEN} as token {image_index}; embeddings grown {rows} -> {rows + added} "
            "rows (new rows = mean of the old)"
        )
    else:
        report.notes.append(f"{IMAGE_TOKEN} is token {image_index} (inside the existing {rows} embedding rows)")
    generation = _generation_config(processor.template, tokenizer)
    # Blip2ForConditionalGeneration.generate runs language_model.generate, whose defaults come from text_config:
    # give it the template's single-token stops too.
    text_config.eos_token_id = generation.eos_token_id
    config = blip2_config(model, text_config, image_index)
    config.dtype = dtype

    state: dict[str, torch.Tensor] = {}
    state.update(model.vision.state_dict())
    state.update({f"language_projection.{k}": v for k, v in model.projector.state_dict().items()})
    state.update({f"language_model.{k}": v for k, v in _llm_state(model.llm, added).items()})
    fp32 = ("qformer.", "query_tokens")
    state = {
        k: v.detach().to(torch.float32 if k.startswith(fp32) else dtype).contiguous() if v.is_floating_point() else v
        for k, v in state.items()
    }
    with torch.device("meta"):
        hf = Blip2ForConditionalGeneration(config)
    expected = hf.state_dict().keys()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"Blip2ForConditionalGeneration names differ: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    hf.load_state_dict(state, strict=True, assign=True)
    hf.generation_config = generation

    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out, max_shard_size=max_shard_size)
    respect_umask(out)
    _record_dtype(out / "config.json", dtype)
    v = model.config.vision
    image_processor = BlipImageProcessor(
        do_resize=True,
        size={"height": v.image_size, "width": v.image_size},
        resample=PILImageResampling.BICUBIC,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(v.mean),
        image_std=list(v.std),
        do_convert_rgb=True,
    )
    # num_query_tokens=None: the processor must not put the image tokens before BOS (BLIP-2's layout); the
    # prompt carries them where the MiniGPT template has its image slot. The blip2 template is BLIP-2's layout.
    Blip2Processor(
        image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=v.num_query_tokens if native else None
    ).save_pretrained(out)

    report.notes.append(
        f"post_layernorm (ln_vision) eps: transformers uses the ViT's {v.vit_eps}, minigpt {v.ln_vision_eps} "
        "(image embeddings differ by ~3e-6)"
    )
    info: dict[str, Any] = {
        "exported_by": "minigpt convert export-hf",
        "template": model.config.template,
        "image_token": IMAGE_TOKEN,
        "image_token_index": image_index,
        "num_query_tokens": v.num_query_tokens,
        "prompt": "render the minigpt template, with each image slot replaced by num_query_tokens image tokens; "
        "processor(images=..., text=prompt_example) gives exactly prompt_example_ids, minigpt's ids",
        "ln_vision_eps": {"minigpt": v.ln_vision_eps, "transformers": v.vit_eps},
        "source_llm": model.config.llm,
    }
    try:
        info["prompt_example_ids"] = hf_prompt_ids(
            processor.template, tokenizer, example, v.num_query_tokens, image_index
        )
        info["prompt_example"] = hf_prompt(processor.template, tokenizer, example, v.num_query_tokens)
    except ValueError as err:  # a template that cannot render the example (e.g. 'hf' without chat_template)
        report.notes.append(f"{EXPORT_INFO}: no prompt example ({err})")
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return ExportResult(out, image_index, v.num_query_tokens, added, report)


def _record_dtype(path: Path, dtype: torch.dtype) -> None:
    """transformers records the dtype of the float32 Q-Former; record the weights' (loaders use it for "auto")."""
    data = json.loads(path.read_text())
    name = str(dtype).removeprefix("torch.")
    for section in (data, data.get("text_config"), data.get("vision_config")):
        if isinstance(section, dict):
            section["dtype"] = name
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def hf_prompt_ids(
    template: Template, tokenizer: Any, conversation: Conversation, num_query_tokens: int, image_token_index: int
) -> list[int]:
    """Generation-prompt ids exactly as minigpt tokenizes them, each image slot = ``num_query_tokens`` x
    ``image_token_index`` (what the exported model's ``input_ids`` must be for identical output)."""
    chunks = template.render_prompt(conversation, tokenizer)
    return encode_chunks(chunks, tokenizer, num_query_tokens, slot_id=image_token_index).input_ids


def hf_prompt(template: Template, tokenizer: Any, conversation: Conversation, num_query_tokens: int) -> str:
    """The generation prompt as a text that ``tokenizer`` (the export's, with ``<image>``), called as
    ``Blip2Processor`` calls it, turns into exactly :func:`hf_prompt_ids`; a ValueError when no such text exists.

    minigpt tokenizes each chunk on its own; one string differs in two ways, both undone here and checked piece by
    piece: the tokenizer adds its own BOS (so the literal BOS is left out), and after a special token (BOS,
    ``<image>``) a SentencePiece tokenizer starts no new word (so a space is written where a chunk starts one).
    """
    image_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    want = hf_prompt_ids(template, tokenizer, conversation, num_query_tokens, image_index)
    if isinstance(template, Blip2Template):  # the export's processor puts the image tokens first itself
        last = template.render_prompt(conversation, tokenizer)[-1]
        text = last.text if last.ids is None and IMAGE_SLOT not in last.text else ""
        if [image_index] * num_query_tokens + tokenizer(text).input_ids != want:
            raise ValueError("the blip2 layout holds one image before the text: use the ids")
        return text
    text, end = "", 0
    for candidates, length in _prompt_pieces(
        template.render_prompt(conversation, tokenizer), tokenizer, num_query_tokens
    ):
        end += length
        text = next((text + c for c in candidates if tokenizer(text + c).input_ids == want[:end]), None)
        if text is None:
            raise ValueError(f"no text tokenizes to minigpt's prompt ids at {candidates[0]!r}: use the ids")
    return text


def _prompt_pieces(chunks: list[Any], tokenizer: Any, num_query_tokens: int) -> list[tuple[list[str], int]]:
    """Each piece of the prompt (literal ids, text, an image's tokens): the texts that may stand for it, best
    first, and how many ids minigpt gives it."""
    pieces = []
    for chunk in chunks:
        if chunk.ids is not None:
            pieces.append((["", tokenizer.decode(list(chunk.ids))], len(chunk.ids)))  # "": the tokenizer's own BOS
            continue
        for i, text in enumerate(chunk.text.split(IMAGE_SLOT)):
            if i:
                pieces.append(([IMAGE_TOKEN * num_query_tokens], num_query_tokens))
            if text:
                pieces.append(([text, " " + text], len(tokenizer.encode(text, add_special_tokens=False))))
    return pieces
