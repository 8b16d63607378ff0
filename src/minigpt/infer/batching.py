"""Continuous batching on the slot decoder: requests join a running batch between decode steps and leave it when
they finish, so one GPU serves many chats at the speed of a batched step.

:class:`SlotScheduler` owns a :class:`~minigpt.infer.decoding.SlotDecoder` (and so the model's LLM) while it runs.
:meth:`Engine.generate <minigpt.infer.engine.Engine.generate>` uses it synchronously (submit the batch, :meth:`~SlotScheduler.run_until_idle`); the
server starts its thread (:meth:`~SlotScheduler.start`), and each request thread blocks in
:meth:`~SlotScheduler.generate` while tokens stream to its callback. Work that cannot join a batch (beam search)
runs in the same thread between steps (:meth:`~SlotScheduler.run_exclusive`).
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
from .decoding import DecodingSettings
from .generate import GenerationOptions, hits_stop
from .slots import SlotDecoder, SlotSampler

if TYPE_CHECKING:
    from ..model.minigpt import MiniGPT
    from ..model.processor import MiniGPTProcessor

log = logging.getLogger(__name__)


@dataclass(eq=False)
class DecodeRequest:
    """One prompt to answer: its embeddings (or a one-conversation batch to embed when admitted), prompt ids (for
    the repetition penalty), options, stop strings and an optional per-token callback (raise in it to cancel)."""

    prompt_ids: list[int]
    options: GenerationOptions
    stops: list[str] = field(default_factory=list)
    embeds: torch.Tensor | None = None  # [T, D]
    batch: ModelBatch | None = None
    on_token: Callable[[int], None] | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


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
    ) -> SlotScheduler | None:
        """A scheduler with ``settings``, or None (the reason logged) where the model's LLM cannot run the slot
        decoder: an unsupported model, or a transformers version whose cache API differs."""
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
        except Exception as err:
            log.warning(
                "static decoding is not available (%s: %s); using transformers' generate", type(err).__name__, err
            )
            return None

    @property
    def slots(self) -> int:
        return self.decoder.slots

    @property
    def max_len(self) -> int:
        return self.decoder.max_len

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

    def generate(self, request: DecodeRequest) -> DecodeRequest:
        """Submit and wait (the scheduler thread must be running); re-raises the request's error."""
        if self.thread is None:
            raise RuntimeError("the scheduler is not running: call start() first")
        self.submit(request).done.wait()
        if request.error is not None:
            raise request.error
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
        device = self.decoder.device
        batches = [None if r.embeds is not None else r.batch.to(device) for r in requests]
        pixels = [b.pixel_values for b in batches if b is not None and b.pixel_values is not None]
        images = self.model.encode_images(torch.cat(pixels)) if pixels else None
        prompts, used = [], 0
        for request, batch in zip(requests, batches):
            if batch is None:
                prompts.append(request.embeds.to(device))
                continue
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
        if token in self.end_ids or (request.stops and hits_stop(self.tokenizer, request.tokens, request.stops)):
            self._finish(row, "stop")
        elif len(request.tokens) >= request.options.max_new_tokens:
            self._finish(row, "length")

    def _fail_running(self, error: BaseException) -> None:
        for row in list(self.running):
            self._finish(row, None, error)

    def _finish(self, row: int, reason: str | None, error: BaseException | None = None) -> None:
        request = self.running.pop(row)
        self.decoder.release(row)
        self.sampler.release(row)
        request.finish_reason, request.error = reason, error
        request.done.set()


def stream_callback(streamer: Any, prompt_ids: torch.Tensor) -> Callable[[int], None] | None:
    """A per-token callback feeding a transformers-style ``streamer``: the prompt with the first token (so a request
    that fails before its first token has streamed nothing), then each token."""
    if streamer is None:
        return None
    started = []

    def on_token(token: int) -> None:
        if not started:
            streamer.put(prompt_ids.cpu())
            started.append(True)
        streamer.put(torch.tensor([token]))

    return on_token


def generate_batch(
    scheduler: SlotScheduler,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_ids: torch.Tensor,
    options: GenerationOptions,
    stops: Sequence[str],
    streamer: Any = None,
) -> list[list[int]]:
    """Answer a left-padded batch synchronously on ``scheduler``; the generated ids of each row. A ``streamer``
    (transformers' protocol: the prompt first, then each token; batch size 1) sees the tokens as they come and is
    ended when all are done."""
    requests = []
    for row in range(embeds.shape[0]):
        keep = attention_mask[row].bool()
        ids = prompt_ids[row][keep]
        requests.append(
            DecodeRequest(
                ids.tolist(), options, list(stops), embeds=embeds[row][keep], on_token=stream_callback(streamer, ids)
            )
        )
    for request in requests:
        scheduler.submit(request)
    scheduler.run_until_idle()
    for request in requests:
        if request.error is not None:
            raise request.error
    if streamer is not None:
        streamer.end()
    return [r.tokens for r in requests]


__all__ = ["DecodeRequest", "SlotScheduler", "generate_batch", "stream_callback"]
