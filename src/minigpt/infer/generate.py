"""Decoding options (and their overrides from a request), the result of a generation, and the stop-string
criterion."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from transformers import StoppingCriteria


@dataclass
class GenerationOptions:
    """Greedy by default; ``do_sample`` for temperature/top-p sampling, ``num_beams`` for beam search."""

    max_new_tokens: int = 300
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0
    num_beams: int = 1
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    min_new_tokens: int = 0
    #: Extra stop strings on top of the template's.
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "repetition_penalty", "length_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.temperature > 0, "temperature must be > 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (self.num_beams >= 1, "num_beams must be >= 1"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.min_new_tokens >= 0, "min_new_tokens must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def hf_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``transformers`` ``generate``."""
        kwargs: dict[str, Any] = dict(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            num_beams=self.num_beams,
            repetition_penalty=self.repetition_penalty,
            min_new_tokens=self.min_new_tokens or None,
        )
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if self.num_beams > 1:
            kwargs["length_penalty"] = self.length_penalty
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def merged(self, overrides: dict[str, Any]) -> GenerationOptions:
        """These options with ``overrides`` (field names, as ``generate(..., max_new_tokens=20)`` passes them)."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown generation option(s) {', '.join(unknown)}")
        return dataclasses.replace(self, **overrides) if overrides else self


#: Why an answer ended: an end token (EOS or the template's stop id), a stop string, or ``max_new_tokens``.
FinishReason = Literal["stop", "stop_string", "length"]


@dataclass(frozen=True)
class Generation:
    """One conversation's answer: its text, the ids the model generated (the end token included, no padding), why it
    ended and the token counts (``prompt_tokens``: the prompt's ids, image positions included)."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def generated_ids(
    ids: Sequence[int], end_ids: Sequence[int], tokenizer: Any, stops: Sequence[str]
) -> tuple[list[int], FinishReason]:
    """The ids one row of transformers' ``generate`` really generated (up to its end token or the token completing a
    stop string; the padding of a finished row dropped) and why it ended."""
    ids = list(ids)
    ends = set(end_ids)
    cut = next((i + 1 for i, token in enumerate(ids) if token in ends), None)
    if stops:
        limit = cut or len(ids)
        hit = next((k for k in range(1, limit + 1) if hits_stop(tokenizer, ids[:k], list(stops))), None)
        if hit is not None and (cut is None or hit < cut):
            return ids[:hit], "stop_string"
    if cut is not None:
        return ids[:cut], "stop"
    return ids, "length"


@dataclass(frozen=True)
class OptionOverrides:
    """The options a request (the server, the web demo, the command line) may change; None keeps the base's.
    ``temperature`` 0 means greedy, > 0 sampling at that temperature."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    num_beams: int | None = None
    max_new_tokens: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: Sequence[str] | None = None

    def apply(self, base: GenerationOptions) -> GenerationOptions:
        """``base`` with the given fields changed (validated)."""
        changes: dict[str, Any] = {}
        temperature = self.temperature
        if temperature is not None:
            if not temperature >= 0 or math.isinf(temperature):  # NaN fails every comparison: refused, not greedy
                raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
            changes["do_sample"] = temperature > 0
            if temperature > 0:
                changes["temperature"] = float(temperature)
        for name in ("top_p", "top_k", "num_beams", "max_new_tokens", "repetition_penalty", "seed"):
            if getattr(self, name) is not None:
                changes[name] = getattr(self, name)
        if self.stop is not None:
            changes["stop"] = list(self.stop)
        return dataclasses.replace(base, **changes)


def hits_stop(tokenizer: Any, ids: list[int], stops: list[str], tail_tokens: int = 16) -> bool:
    """Whether the text of the last ``tail_tokens`` generated ids contains a stop string. Decoding a short tail
    catches a stop string however it was tokenized (``###`` is one token after a space and two when glued to a
    word)."""
    if not stops:
        return False
    text = tokenizer.decode(list(ids[-tail_tokens:]), skip_special_tokens=False)
    return any(s in text for s in stops)


class StopOnStrings(StoppingCriteria):
    """Stops each sequence of transformers' ``generate`` once its generated text contains a stop string."""

    def __init__(self, tokenizer: Any, stops: list[str], prompt_len: int, tail_tokens: int = 16) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.prompt_len = prompt_len
        self.tail = tail_tokens

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if not self.stops:
            return done
        start = max(self.prompt_len, input_ids.shape[1] - self.tail)
        for row, ids in enumerate(input_ids[:, start:].tolist()):
            done[row] = hits_stop(self.tokenizer, ids, self.stops, self.tail)
        return done
