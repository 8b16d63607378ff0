"""Continuous batching on the slot decoder: requests join a running batch between decode steps and leave it when
they finish, so one GPU serves many chats at the speed of a batched step.

:class:`SlotScheduler` owns a :class:`~minigpt.infer.slots.SlotDecoder` (and so the model's LLM) while it runs. Each
:class:`DecodeRequest` is one conversation's prepared prompt (a one-row :class:`~minigpt.data.tokenize.ModelBatch`,
no padding); it is embedded when admitted, with one vision pass for all the requests admitted together.
:meth:`Engine.generate <minigpt.infer.engine.Engine.generate>` submits its requests and runs the scheduler until idle,
or, with continuous batching (:meth:`~SlotScheduler.start`), waits for them while the scheduler's thread serves
everyone. Work that cannot join a batch (beam search) runs in the same thread between steps
(:meth:`~SlotScheduler.run_exclusive`).
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..data.tokenize import ModelBatch
from .decoding import DecodingSettings, FastDecodingUnsupported
from .generate import FinishReason, GenerationOptions, hits_stop
from .slots import SlotDecoder, SlotSampler

if TYPE_CHECKING:
    from ..model.minigpt import MiniGPT
    from ..model.processor import MiniGPTProcessor

log = logging.getLogger(__name__)


@dataclass(eq=False)
class DecodeRequest:
    """One prompt to answer: a one-conversation batch (embedded when admitted), options, stop strings and an
    optional per-token callback (raise in it to cancel). ``tokens`` and ``finish_reason`` are the answer."""

    batch: ModelBatch
    options: GenerationOptions
    stops: list[str] = field(default_factory=list)
    on_token: Callable[[int], None] | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    #: The prompt's ids (image slots included), for the repetition penalty and the slot length.
    prompt_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        if self.batch.text.input_ids.shape[0] != 1:
            raise ValueError("a decode request holds one conversation")
        self.prompt_ids = self.batch.text.input_ids[0].tolist()


class SlotScheduler:
    """Admits waiting requests into free slots (prefill), then decodes all running rows one token per step."""

    def __init__(
        self,
        model: MiniGPT,
        slots: int,
        max_len: int,
        cuda_graphs: bool = True,
        compile: bool = False,
        end_ids: Sequence[int] = (),
        tokenizer: Any = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer  # decodes the tail of an answer to look for stop strings
        self.decoder = SlotDecoder(model.llm, slots, max_len, cuda_graphs=cuda_graphs, compile=compile)
        self.slots, self.max_len = slots, max_len  # the decoder's rows and positions per row
        vocab = model.llm.get_output_embeddings().weight.shape[0]
        self.end_ids = set(end_ids)
        self.sampler = SlotSampler(slots, vocab, self.decoder.device, sorted(self.end_ids))
        self.last = torch.zeros(slots, dtype=torch.long, device=self.decoder.device)
        self.waiting: collections.deque[DecodeRequest] = collections.deque()
        self.running: dict[int, DecodeRequest] = {}
        self.exclusive: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self.wake = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False

    @classmethod
    def for_model(
        cls, model: MiniGPT, processor: MiniGPTProcessor, settings: DecodingSettings, slots: int, max_len: int
    ) -> SlotScheduler:
        """A scheduler with ``settings``; :class:`FastDecodingUnsupported` where the model's LLM cannot run the slot
        decoder (an unsupported model, or a transformers version whose cache API differs)."""
        try:
            return cls(
                model,
                slots,
                max_len,
                settings.cuda_graphs,
                settings.compile,
                processor.end_token_ids(),
                processor.tokenizer,
            )
        except FastDecodingUnsupported:
            raise
        except Exception as err:
            raise FastDecodingUnsupported(f"{type(err).__name__}: {err}") from err

    # ------------------------------------------------------------------------------------------ submitting
    def submit(self, request: DecodeRequest) -> DecodeRequest:
        if request.stops and self.tokenizer is None:
            raise ValueError("stop strings need the scheduler's tokenizer")
        length = len(request.prompt_ids)
        if length + request.options.max_new_tokens > self.max_len:
            raise ValueError(
                f"a prompt of {length} tokens plus max_new_tokens {request.options.max_new_tokens} "
                f"does not fit a decoding slot of {self.max_len} positions"
            )
        with self.wake:
            self.waiting.append(request)
            self.wake.notify()
        return request

    def run_exclusive(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in the scheduler thread while no step runs (e.g. beam search on the same model)."""
        if self.thread is None:
            return fn()
        future: Future = Future()
        with self.wake:
            self.exclusive.append((fn, future))
            self.wake.notify()
        return future.result()

    # ------------------------------------------------------------------------------------------ running
    def start(self) -> SlotScheduler:
        if self.thread is None:
            self.thread = threading.Thread(target=self._serve, name="minigpt-decode", daemon=True)
            self.thread.start()
        return self

    def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def _serve(self) -> None:
        while True:
            with self.wake:
                while not (self.stopping or self.waiting or self.running or self.exclusive):
                    self.wake.wait()
                if self.stopping:
                    break
            try:
                self.tick()
            except BaseException as err:  # keep serving: the requests in flight fail, the next ones run
                log.exception("decoding failed")
                self._fail_running(err)
        stopped = RuntimeError("the decoding scheduler was stopped")
        self._fail_running(stopped)
        with self.wake:
            for request in self.waiting:
                request.error = stopped
                request.done.set()
            for _, future in self.exclusive:
                future.set_exception(stopped)
            self.waiting.clear()
            self.exclusive.clear()

    def run_until_idle(self) -> None:
        while self.waiting or self.running or self.exclusive:
            self.tick()

    @torch.inference_mode()
    def tick(self) -> None:
        """Run exclusive work, admit what fits, then one decode step for the running rows."""
        while self.exclusive:
            fn, future = self.exclusive.popleft()
            try:
                future.set_result(fn())
            except BaseException as err:
                future.set_exception(err)
        free = [row for row in range(self.slots) if row not in self.running]
        admitted = []
        with self.wake:
            while free and self.waiting:
                admitted.append((free.pop(0), self.waiting.popleft()))
        if admitted:
            self._admit(admitted)
        if not self.running:
            return
        try:
            logits = self.decoder.step(self.last)
            tokens = self.sampler.pick(logits)
            self.last.copy_(tokens)
            picked = tokens.tolist()
        except BaseException as err:  # a failed step fails the requests in it, not the scheduler
            log.exception("decoding step failed")
            self._fail_running(err)
            return
        for row, token in enumerate(picked):
            if row in self.running:
                self._emit(row, token)

    def _admit(self, admitted: list[tuple[int, DecodeRequest]]) -> None:
        """Embed (one vision pass for all their images) and prefill (one forward) new requests, and emit their first
        tokens. If that fails for several, each is retried alone, so that only a bad request fails."""
        rows = [row for row, _ in admitted]
        try:
            logits = self.decoder.prefill(rows, self._embed([request for _, request in admitted]))
        except BaseException as err:
            if len(admitted) > 1:
                for pair in admitted:
                    self._admit([pair])
                return
            request = admitted[0][1]
            request.error = err
            request.done.set()
            return
        self.running.update(admitted)
        try:
            for row, request in admitted:
                self.sampler.admit(row, request.options, request.prompt_ids)
            tokens = self.sampler.pick(logits, rows)
            self.last[rows] = tokens
            picked = tokens.tolist()
        except BaseException as err:
            log.exception("choosing the first tokens failed")
            for row in rows:
                self._finish(row, None, err)
            return
        for row, token in zip(rows, picked):
            self._emit(row, token)

    def _embed(self, requests: list[DecodeRequest]) -> list[torch.Tensor]:
        """Each request's prompt embeddings ``[T, D]``; the images of all of them go through the vision encoder
        together."""
        batches = [r.batch.to(self.decoder.device) for r in requests]
        pixels = [b.pixel_values for b in batches if b.pixel_values is not None]
        images = self.model.encode_images(torch.cat(pixels)) if pixels else None
        prompts, used = [], 0
        for batch in batches:
            count = 0 if batch.pixel_values is None else batch.pixel_values.shape[0]
            prompts.append(self.model.embed(batch, image_embeds=images[used : used + count] if count else None)[0])
            used += count
        return prompts

    def _emit(self, row: int, token: int) -> None:
        request = self.running[row]
        request.tokens.append(token)
        self.sampler.produced(row, len(request.tokens))
        try:
            if request.on_token is not None:
                request.on_token(token)
        except BaseException as err:  # the consumer cancelled (or failed): free the slot
            self._finish(row, None, err)
            return
        if token in self.end_ids:
            self._finish(row, "stop")
        elif request.stops and hits_stop(self.tokenizer, request.tokens, request.stops):
            self._finish(row, "stop_string")
        elif len(request.tokens) >= request.options.max_new_tokens:
            self._finish(row, "length")

    def _fail_running(self, error: BaseException) -> None:
        for row in list(self.running):
            self._finish(row, None, error)

    def _finish(self, row: int, reason: FinishReason | None, error: BaseException | None = None) -> None:
        request = self.running.pop(row)
        self.decoder.release(row)
        self.sampler.release(row)
        request.finish_reason, request.error = reason, error
        request.done.set()


__all__ = ["DecodeRequest", "SlotScheduler"]
