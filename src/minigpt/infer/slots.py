"""The slot decoder: a preallocated KV cache of fixed "slots" (one request each) and a decode step recorded once as a
CUDA graph.

transformers' ``generate`` spends most of a batch-1 decode step launching kernels from Python (26-29 tokens/s for a
7B model on an H200, where memory bandwidth allows ~320). Here:

- :class:`SlotCache` holds keys/values for ``slots`` rows of ``max_len`` positions, allocated once. Each row has its
  own write position, so requests of any prompt length share one batch and can join or leave between steps
  (continuous batching, :mod:`minigpt.infer.batching`).
- :class:`SlotDecoder` prefills new rows together (their prompts right-padded through the model with a dynamic
  cache, then copied into the rows) and decodes all rows together: one token per row per step, with a 4-D additive
  attention mask that opens each row's own positions. The step reads and writes only static buffers, so on CUDA it is captured once as a graph
  and then replayed (``--no-cuda-graphs`` turns that off); ``compile`` also compiles each decoder layer inside the
  graph (fused kernels).
- :class:`SlotSampler` picks the next token of every row at once: greedy, or temperature / top-k / top-p sampling,
  with repetition penalty and ``min_new_tokens``, each row with its own options and optional seed.

Models whose LLM is not a transformers-native causal LM with a ``Cache`` (e.g. remote-code Qwen-1) use the plain
``generate`` path; so does beam search. On CPU the same loop runs eagerly (tested greedy-identical to the plain path).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin

from ..device import capture_graph, supports_graph_capture
from ..model.llm import compile_decoder_layers
from .decoding import FastDecodingUnsupported
from .generate import GenerationOptions

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- cache
class SlotLayer(CacheLayerMixin):
    """One decoder layer's keys/values, ``[slots, heads, max_len, head_dim]``; a decode step writes each row's new
    key/value at that row's own position (``cache.positions``)."""

    is_compileable = True
    is_sliding = False

    def __init__(self, cache: SlotCache) -> None:
        super().__init__()
        self.owner = cache

    def allocate(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        shape = (self.owner.slots, keys.shape[1], self.owner.max_len)
        self.keys = torch.zeros(*shape, keys.shape[-1], dtype=keys.dtype, device=keys.device)
        self.values = torch.zeros(*shape, values.shape[-1], dtype=values.dtype, device=values.device)
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.allocate(key_states, value_states)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.allocate(key_states, value_states)
        rows, positions, span = self.owner.rows, self.owner.positions, self.owner.span
        self.keys[rows, :, positions] = key_states[:, :, 0]
        self.values[rows, :, positions] = value_states[:, :, 0]
        return self.keys[:, :, :span], self.values[:, :, :span]

    def write(self, row: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Copy a prefilled prompt (``[1, heads, T, dim]``) into positions ``0..T-1`` of ``row``."""
        if not self.is_initialized:
            self.allocate(keys, values)
        length = keys.shape[2]
        self.keys[row, :, :length] = keys[0]
        self.values[row, :, :length] = values[0]

    def get_mask_sizes(self, *args: Any) -> tuple[int, int]:
        return self.owner.span, 0

    def get_seq_length(self) -> int:
        return 0  # positions are per row; the decoder always passes position_ids

    def get_max_length(self) -> int:
        return self.owner.max_len

    get_max_cache_shape = get_max_length  # its name in earlier transformers releases


class SlotCache(Cache):
    """Keys/values of ``slots`` independent rows with a write position each (``positions``, a device tensor).
    A step attends to the first ``span`` positions only (all that any row has filled, rounded up to a bucket)."""

    def __init__(self, num_layers: int, slots: int, max_len: int, device: torch.device) -> None:
        self.slots, self.max_len, self.span = slots, max_len, max_len
        self.rows = torch.arange(slots, device=device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)
        super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])


# ---------------------------------------------------------------------------------------------- decoder
def _forward_keywords(llm: Any) -> tuple[str, bool]:
    """The name of the LLM's cache argument and whether it takes ``logits_to_keep``; raises
    :class:`FastDecodingUnsupported` for models without transformers' ``Cache`` support."""
    params = inspect.signature(llm.forward).parameters
    native = type(llm).__module__.startswith("transformers.models.")
    kw = "cache" if "cache" in params else "past_key_values" if "past_key_values" in params else None
    if not native or kw is None:
        raise FastDecodingUnsupported(f"{type(llm).__name__} is not a transformers-native causal LM with a KV cache")
    return kw, "logits_to_keep" in params


def slot_decoding_problem(llm: Any) -> str | None:
    """Why ``llm`` cannot run the slot decoder (no transformers ``Cache`` support), or None."""
    try:
        _forward_keywords(llm)
    except FastDecodingUnsupported as err:
        return str(err)
    return None


def kv_bytes_per_position(llm: Any) -> int:
    """Bytes of keys and values that one cached position takes, over all layers (the LLM's dtype)."""
    config = llm.config.get_text_config() if hasattr(llm.config, "get_text_config") else llm.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * next(llm.parameters()).element_size()


def span_buckets(max_len: int, smallest: int = 128) -> list[int]:
    """Attention spans a step is recorded for: powers of two from ``smallest``, then ``max_len``."""
    spans, span = [], smallest
    while span < max_len:
        spans.append(span)
        span *= 2
    return spans + [max_len]


class SlotDecoder:
    """Prefill new rows together, decode all rows together (see the module doc)."""

    def __init__(self, llm: Any, slots: int, max_len: int, cuda_graphs: bool = True, compile: bool = False) -> None:
        self.llm = llm
        self.cache_kw, self.keep_kw = _forward_keywords(llm)
        param = next(llm.parameters())
        self.device, dtype = param.device, param.dtype
        config = llm.config.get_text_config() if hasattr(llm.config, "get_text_config") else llm.config
        self.slots, self.max_len = slots, max_len
        self.cache = SlotCache(config.num_hidden_layers, slots, max_len, self.device)
        self.active = torch.zeros(slots, dtype=torch.bool, device=self.device)
        self.input_ids = torch.zeros(slots, 1, dtype=torch.long, device=self.device)
        self.closed = torch.finfo(dtype).min
        self.mask = torch.full((slots, 1, 1, max_len), self.closed, dtype=dtype, device=self.device)
        self.mask[:, :, :, 0] = 0.0
        self._zeros = torch.zeros(slots, dtype=torch.long, device=self.device)
        self._open = torch.zeros((), dtype=dtype, device=self.device)
        self.lengths = [0] * slots  # positions filled per row (host mirror of cache.positions for active rows)
        self.spans = span_buckets(max_len)
        self.compiled = False
        if compile:
            compile_decoder_layers(llm)
            self.compiled = True
        self._graphs: dict[int, tuple[Callable[[], None], torch.Tensor]] = {}
        if cuda_graphs and supports_graph_capture(self.device):
            try:
                with torch.inference_mode():
                    for span in self.spans:  # all rows are free: warm-up and recording touch nothing in use
                        self._graphs[span] = capture_graph(functools.partial(self._step, span), self.device)
            except RuntimeError as err:  # e.g. an op that cannot be recorded: decode eagerly instead
                log.warning("could not record the decode step as a CUDA graph (%s); decoding without it", err)
                self._graphs.clear()
            self.reset()

    @property
    def graphed(self) -> bool:
        return bool(self._graphs)

    def reset(self) -> None:
        for row in range(self.slots):
            self.release(row)

    def _step(self, span: int) -> torch.Tensor:
        """One token for every row, attending to the first ``span`` positions: open each row's write position, run
        the LLM, advance the active rows."""
        cache = self.cache
        cache.span = span
        self.mask.index_put_((cache.rows, self._zeros, self._zeros, cache.positions), self._open)
        extra = {"logits_to_keep": 1} if self.keep_kw else {}
        out = self.llm(
            input_ids=self.input_ids,
            position_ids=cache.positions[:, None],
            attention_mask=self.mask[..., :span],
            use_cache=True,
            **{self.cache_kw: cache},
            **extra,
        )
        cache.positions.add_(self.active.long())
        return out.logits[:, -1]

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed each row's last token (``[slots]``); the next-token logits ``[slots, vocab]`` (a buffer reused by the
        next step: read it before stepping again)."""
        needed = max(self.lengths) + 1
        span = next(s for s in self.spans if s >= needed)
        self.input_ids.copy_(tokens.view(-1, 1))
        for row, length in enumerate(self.lengths):
            if length:
                self.lengths[row] = length + 1
        if span in self._graphs:
            replay, logits = self._graphs[span]
            replay()
            return logits
        return self._step(span)

    @torch.inference_mode()
    def prefill(self, rows: Sequence[int], prompts: Sequence[torch.Tensor]) -> torch.Tensor:
        """Run prompts (``[T_i, D]`` input embeddings) into ``rows`` in one right-padded forward; the logits of each
        one's first new token ``[len(rows), vocab]``."""
        lengths = [p.shape[0] for p in prompts]
        too_long = [n for n in lengths if n >= self.max_len]
        if too_long:
            raise ValueError(
                f"a prompt of {too_long[0]} tokens does not fit a decoding slot of {self.max_len} positions"
            )
        width, dtype = max(lengths), self.mask.dtype
        embeds = torch.zeros(len(prompts), width, prompts[0].shape[-1], dtype=dtype, device=self.device)
        valid = torch.zeros(len(prompts), width, dtype=torch.long, device=self.device)
        for i, prompt in enumerate(prompts):
            embeds[i, : lengths[i]] = prompt
            valid[i, : lengths[i]] = 1
        last = torch.tensor(lengths, device=self.device) - 1
        keep = torch.unique(last)  # the positions whose logits are needed
        extra = {"logits_to_keep": keep} if self.keep_kw else {}
        prompt_cache = DynamicCache(config=self.llm.config)
        positions = torch.arange(width, device=self.device).expand(len(prompts), -1)
        # Compiled layers run eagerly here: prompt lengths vary, and compiling each would hit the recompile limit.
        with torch.compiler.set_stance("force_eager") if self.compiled else contextlib.nullcontext():
            out = self.llm(
                inputs_embeds=embeds,
                attention_mask=valid,
                position_ids=positions,
                use_cache=True,
                **{self.cache_kw: prompt_cache},
                **extra,
            )
        for layer, source in zip(self.cache.layers, prompt_cache.layers):
            if source.keys.shape[2] != width:
                raise FastDecodingUnsupported(
                    "the model's cache keeps fewer positions than the prompt (sliding window)"
                )
            for i, row in enumerate(rows):
                layer.write(row, source.keys[i : i + 1, :, : lengths[i]], source.values[i : i + 1, :, : lengths[i]])
        for row, length in zip(rows, lengths):
            self.mask[row] = self.closed
            self.mask[row, :, :, :length] = 0.0
            self.cache.positions[row] = length
            self.lengths[row] = length
            self.active[row] = True
        column = torch.searchsorted(keep, last) if self.keep_kw else last
        return out.logits[torch.arange(len(prompts), device=self.device), column].clone()

    def release(self, row: int) -> None:
        """Free ``row``: it keeps decoding into position 0 of its own cache, attending to that position only."""
        self.active[row] = False
        self.lengths[row] = 0
        self.cache.positions[row] = 0
        self.mask[row] = self.closed
        self.mask[row, :, :, 0] = 0.0


# ---------------------------------------------------------------------------------------------- sampling
class SlotSampler:
    """Per-row decoding options as device tensors; :meth:`pick` chooses the next token of every row at once,
    applying (as transformers does, in this order) repetition penalty, ``min_new_tokens``, temperature, top-k,
    top-p."""

    def __init__(self, slots: int, vocab: int, device: torch.device, end_ids: Sequence[int]) -> None:
        self.slots, self.vocab, self.device = slots, vocab, device
        self.end_ids = torch.tensor(sorted(set(end_ids)), dtype=torch.long, device=device)
        self.sample = torch.zeros(slots, dtype=torch.bool, device=device)
        self.temperature = torch.ones(slots, 1, device=device)
        self.top_p = torch.ones(slots, 1, device=device)
        self.top_k = torch.zeros(slots, 1, dtype=torch.long, device=device)
        self.penalty = torch.ones(slots, 1, device=device)
        self.seen: torch.Tensor | None = None  # [slots, vocab] bool, allocated for the first penalised row
        self.hold_end = torch.zeros(slots, dtype=torch.bool, device=device)
        self.generators: dict[int, torch.Generator] = {}
        self.options: dict[int, GenerationOptions] = {}

    def admit(self, row: int, options: GenerationOptions, prompt_ids: Sequence[int]) -> None:
        self.options[row] = options
        self.sample[row] = options.do_sample
        self.temperature[row] = options.temperature if options.do_sample else 1.0
        self.top_p[row] = options.top_p if options.do_sample else 1.0
        self.top_k[row] = options.top_k if options.do_sample else 0
        self.penalty[row] = options.repetition_penalty
        if options.repetition_penalty != 1.0:
            if self.seen is None:
                self.seen = torch.zeros(self.slots, self.vocab, dtype=torch.bool, device=self.device)
            self.seen[row] = False
            ids = torch.tensor([i for i in prompt_ids if 0 <= i < self.vocab], dtype=torch.long, device=self.device)
            self.seen[row, ids] = True
        self.hold_end[row] = options.min_new_tokens > 0
        if options.do_sample and options.seed is not None:
            self.generators[row] = torch.Generator(self.device).manual_seed(options.seed)
        else:
            self.generators.pop(row, None)

    def release(self, row: int) -> None:
        self.options.pop(row, None)
        self.generators.pop(row, None)
        self.sample[row] = False
        self.penalty[row] = 1.0
        self.hold_end[row] = False

    def produced(self, row: int, count: int) -> None:
        """``row`` has ``count`` new tokens: stop holding back its end tokens once ``min_new_tokens`` is reached."""
        options = self.options[row]
        if options.min_new_tokens and count >= options.min_new_tokens:
            self.hold_end[row] = False

    def pick(self, logits: torch.Tensor, rows: Sequence[int] | None = None) -> torch.Tensor:
        """Next tokens ``[n]`` from logits ``[n, vocab]`` of ``rows`` (default: all slots, in order)."""
        rows = range(self.slots) if rows is None else list(rows)
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        options = [self.options.get(r) for r in rows]
        scores = self.process(logits, index, options)
        tokens = scores.argmax(-1)
        if any(o is not None and o.do_sample for o in options):
            probs = self.sampling_probs(scores, index)
            noise = torch.empty_like(probs).exponential_()  # argmax(p / E), E ~ Exp(1), draws from p
            for i, row in enumerate(rows):
                if row in self.generators:
                    noise[i] = torch.empty_like(probs[i]).exponential_(generator=self.generators[row])
            tokens = torch.where(self.sample[index], (probs / noise).argmax(-1), tokens)
        if self.seen is not None:
            self.seen[index, tokens] = True
        return tokens

    def process(
        self, logits: torch.Tensor, index: torch.Tensor, options: list[GenerationOptions | None]
    ) -> torch.Tensor:
        """Float scores after repetition penalty and ``min_new_tokens`` (end tokens held back)."""
        scores = logits[:, : self.vocab].float()
        if self.seen is not None and any(o is not None and o.repetition_penalty != 1.0 for o in options):
            penalty = self.penalty[index]
            penalised = torch.where(scores > 0, scores / penalty, scores * penalty)
            scores = torch.where(self.seen[index], penalised, scores)
        if any(o is not None and o.min_new_tokens for o in options) and self.end_ids.numel():
            scores = scores.clone()  # float32 logits may be the decoder's output buffer itself
            ends = scores[:, self.end_ids]
            scores[:, self.end_ids] = torch.where(self.hold_end[index, None], float("-inf"), ends)
        return scores

    def sampling_probs(self, scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The distribution each row samples from: temperature, then top-k (0: off), then top-p."""
        ordered, order = (scores / self.temperature[index]).sort(dim=-1, descending=True)  # one sort serves both
        k = self.top_k[index]
        kth = ordered.gather(1, (k - 1).clamp(min=0))
        ordered = ordered.masked_fill((k > 0) & (ordered < kth), float("-inf"))
        probs = ordered.softmax(-1)
        better = probs.cumsum(-1) - probs  # the mass of the tokens ranked above each one
        top_p = self.top_p[index]
        probs = ordered.masked_fill((better >= top_p) & (top_p < 1), float("-inf")).softmax(-1)
        return torch.zeros_like(probs).scatter(1, order, probs)


__all__ = [
    "SlotCache",
    "SlotDecoder",
    "SlotLayer",
    "SlotSampler",
    "kv_bytes_per_position",
    "slot_decoding_problem",
    "span_buckets",
]
