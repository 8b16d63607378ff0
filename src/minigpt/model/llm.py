"""Loading the language model and its tokenizer (any ``AutoModelForCausalLM``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..device import parse_dtype
from ..files import refuse_unsafe_pickle

log = logging.getLogger(__name__)


def load_tokenizer(name_or_path: str | Path, gguf_file: str | None = None, trust_remote_code: bool = False) -> Any:
    """Load a tokenizer and make sure it has a pad token (EOS is used when it has none)."""
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    tok = AutoTokenizer.from_pretrained(str(name_or_path), **kwargs)
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer {name_or_path} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok


def load_llm(
    name_or_path: str | Path,
    dtype: str | torch.dtype = "float32",
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = "sdpa",
    **extra: Any,
) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` on a local directory or a hub id, in ``dtype``.

    ``extra`` goes to ``from_pretrained`` as is (e.g. ``quantization_config``, ``device_map``).
    A GGUF checkpoint is dequantized to ``dtype`` and made saveable as a plain model.
    """
    if gguf_file and extra.get("quantization_config") is not None:
        raise ValueError("a GGUF LLM cannot be loaded in 8/4 bits; drop --load-in-8bit/4bit")
    kwargs: dict[str, Any] = {"dtype": parse_dtype(dtype), "trust_remote_code": trust_remote_code, **extra}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with refuse_unsafe_pickle(name_or_path):  # pytorch_model.bin is read with weights_only=True
        try:
            model = AutoModelForCausalLM.from_pretrained(str(name_or_path), **kwargs)
        except (OSError, ValueError) as err:
            raise OSError(f"could not load the LLM from {name_or_path!r}: {err}") from err
    if gguf_file:
        # transformers refuses to save a model it loaded from GGUF; the weights are plain tensors now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def bnb_quantization(
    bits: str, compute_dtype: str | torch.dtype, quant_type: str = "nf4", double_quant: bool = False
) -> Any:
    """A ``BitsAndBytesConfig`` for ``from_pretrained``: ``8bit`` (LLM.int8) or ``4bit`` (``quant_type`` nf4/fp4,
    optional double quantization, matmuls in ``compute_dtype``). bitsandbytes runs both on CUDA and on the CPU."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise RuntimeError(f"{bits} quantization needs bitsandbytes: pip install bitsandbytes") from err
    from transformers import BitsAndBytesConfig

    if bits == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if bits != "4bit":
        raise ValueError(f"unknown quantization {bits!r}; use 4bit or 8bit")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=parse_dtype(compute_dtype),
    )


def keep_4bit_layout(llm: nn.Module) -> int:
    """Turn off bitsandbytes' CPU repacking of 4-bit layers for training; returns the layers changed.

    bitsandbytes 0.50 repacks a ``Linear4bit``'s weight for its AVX512-BF16 CPU kernel at the first forward in eval
    mode without gradients (an evaluation), rounding the blocks' scales to bfloat16; that kernel has no backward, so
    the training steps after it would get silently wrong gradients (measured: 0.2 off on the input's gradient)."""
    layers = [m for m in llm.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for module in layers:
        module.support_avx512bf16_for_cpu = False
    return len(layers)


def is_quantized(llm: nn.Module) -> bool:
    """Whether ``llm`` (or the model a peft wrapper holds) was loaded in 8 or 4 bits."""
    return bool(getattr(llm, "is_loaded_in_4bit", False) or getattr(llm, "is_loaded_in_8bit", False))


def load_lora_adapter(llm: PreTrainedModel, directory: str | Path) -> nn.Module:
    """``llm`` with the peft LoRA adapter saved in ``directory`` (QLoRA training's ``final/llm_adapter``): merged into
    the weights (a plain model) when ``llm`` is not quantized; kept as separate LoRA layers over a quantized one."""
    from peft import PeftModel

    with refuse_unsafe_pickle(directory):  # adapter_model.bin is read with weights_only=True
        try:
            model = PeftModel.from_pretrained(llm, str(directory), is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as err:
            raise ValueError(f"{directory}: the LoRA adapter does not fit the LLM: {err}") from None
    return model if is_quantized(llm) else model.merge_and_unload()


def meta_llm(name_or_path: str | Path, trust_remote_code: bool = False) -> PreTrainedModel:
    """The LLM's architecture on the meta device (names and shapes, no memory, nothing loaded)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise OSError(f"could not read the LLM config of {str(name_or_path)!r}: {err}") from err
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def decoder_body(llm: nn.Module) -> nn.Module:
    """The causal LM without its head: embeddings, decoder layers, final norm (``get_decoder()`` or ``base_model``)."""
    return llm.get_decoder() if hasattr(llm, "get_decoder") else llm.base_model


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The LLM's stack of decoder layers (``model.layers`` in LLaMA/Qwen2/Mistral)."""
    layers = getattr(decoder_body(llm), "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(llm).__name__}")
    return layers


def compile_decoder_layers(llm: nn.Module) -> None:
    """Regional compilation: ``torch.compile`` each decoder layer (compiled once, reused by every layer of the same
    shape). Callers pass ``use_cache=False`` in training so that no cache object forces recompiles."""
    for layer in decoder_layers(llm):
        layer.compile()
