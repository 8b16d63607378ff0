"""The inference engine: a model, its processor and how they decode; the one way into generation.

The Python API, chat, web UI, server and eval all generate through :meth:`Engine.generate`. The engine owns the
decoding settings and the one slot scheduler (KV cache, CUDA graphs: :mod:`minigpt.infer.batching`); nothing else
builds one. Generation always runs with the model in eval mode. What the slot decoder cannot answer (beam search, an
LLM without transformers' cache support, a prompt beyond a sliding window) runs on transformers' ``generate``.

Two ways to run: synchronously (each call decodes its batch on the scheduler, one call at a time), or with
continuous batching (:meth:`Engine.start_batching`: the scheduler runs in a thread, concurrent calls share its steps).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteriaList

from ..data.conversation import Conversation, ImageLike
from ..data.tokenize import ModelBatch
from ..device import free_memory_bytes
from ..model.minigpt import MiniGPT
from ..model.processor import MiniGPTProcessor, distribute_images
from .batching import DecodeRequest, SlotScheduler, generate_batch, stream_callback
from .decoding import DecodingSettings, FastDecodingUnsupported
from .generate import GenerationOptions, StopOnStrings
from .loading import LoadSpec, decoding_for, load_model
from .slots import kv_bytes_per_position

log = logging.getLogger(__name__)

Images = Sequence[ImageLike] | Sequence[Sequence[ImageLike]] | None


class Engine:
    """Generation for one model and processor (see the module doc)."""

    def __init__(self, model: MiniGPT, processor: MiniGPTProcessor, decoding: DecodingSettings | None = None) -> None:
        self.model = model.eval()
        self.processor = processor
        self._decoding = decoding or DecodingSettings()
        self._scheduler: SlotScheduler | None = None
        self._lock = threading.RLock()

    @classmethod
    def from_pretrained(cls, directory: str | Path, **load_kwargs: Any) -> Engine:
        """Load a model directory (``device``, ``dtype``, ``quantize``, ``trust_remote_code``, ``decoding``... as
        :class:`minigpt.infer.loading.LoadSpec` takes them)."""
        spec = LoadSpec(model=str(directory), **load_kwargs)
        model, processor = load_model(spec)
        return cls(model, processor, decoding_for(spec))

    # ------------------------------------------------------------------ settings
    @property
    def decoding(self) -> DecodingSettings:
        """How :meth:`generate` decodes; setting it frees the slot scheduler and its cache."""
        return self._decoding

    @decoding.setter
    def decoding(self, settings: DecodingSettings) -> None:
        with self._lock:
            self.close()
            self._decoding = settings

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def batching(self) -> bool:
        """Whether continuous batching runs (:meth:`start_batching`)."""
        return self._scheduler is not None and self._scheduler.thread is not None

    def static(self, num_beams: int = 1) -> bool:
        """Whether a generation with ``num_beams`` runs on the slot decoder."""
        return self._decoding.use_static(self.device, num_beams)

    # ------------------------------------------------------------------ generating
    @torch.inference_mode()
    def generate(
        self,
        conversations: Conversation | Sequence[Conversation],
        images: Images = None,
        options: GenerationOptions | None = None,
        streamer: Any = None,
    ) -> list[str]:
        """Answer the last user turn of each conversation (batched, left-padded). A ``streamer`` (transformers'
        protocol, one conversation) sees the tokens as they come."""
        if isinstance(conversations, Conversation):
            conversations = [conversations]
        options = options or GenerationOptions()
        stops = self.processor.stop_strings(options.stop)
        if options.seed is not None:
            torch.manual_seed(options.seed)
        if self.batching:  # the model stays in eval mode while the scheduler runs
            return self._generate_batching(conversations, images, options, stops, streamer)
        batch = self.processor.prepare(conversations, images, train=False)
        with self._lock:
            training = self.model.training
            self.model.eval()  # dropout off, whatever mode the caller left the model in
            try:
                return self._generate_alone(batch.to(self.device), options, stops, streamer)
            finally:
                self.model.train(training)

    def _generate_alone(
        self, batch: ModelBatch, options: GenerationOptions, stops: list[str], streamer: Any
    ) -> list[str]:
        """Decode one batch on the slot scheduler (synchronously), or with transformers' ``generate``."""
        text = batch.text
        scheduler = (
            self._scheduler_for(text.input_ids.shape[0], text.input_ids.shape[1] + options.max_new_tokens)
            if self.static(options.num_beams)
            else None
        )
        if scheduler is not None:
            try:
                rows = generate_batch(
                    scheduler, self.model.embed(batch), text.attention_mask, text.input_ids, options, stops, streamer
                )
                return [self.processor.decode(ids, options.stop) for ids in rows]
            except FastDecodingUnsupported as err:  # e.g. a prompt beyond a sliding window
                log.warning("static decoding cannot answer this batch (%s); using transformers' generate", err)
        return self._generate_plain(batch, options, stops, streamer)

    def _generate_plain(
        self, batch: ModelBatch, options: GenerationOptions, stops: list[str], streamer: Any
    ) -> list[str]:
        """transformers' ``generate`` on the prompt embeddings (beam search, and what the slot decoder cannot run)."""
        text, processor = batch.text, self.processor
        prompt_len = text.input_ids.shape[1]
        out = self.model.llm.generate(
            input_ids=text.input_ids,  # rides along with the embeddings so that repetition penalty sees the prompt
            inputs_embeds=self.model.embed(batch),
            attention_mask=text.attention_mask,
            stopping_criteria=StoppingCriteriaList([StopOnStrings(processor.tokenizer, stops, prompt_len)]),
            eos_token_id=processor.end_token_ids() or None,
            pad_token_id=processor.pad_token_id,
            streamer=streamer,
            **options.hf_kwargs(),
        )
        return [processor.decode(row[prompt_len:], options.stop) for row in out]

    def _generate_batching(
        self,
        conversations: Sequence[Conversation],
        images: Images,
        options: GenerationOptions,
        stops: list[str],
        streamer: Any,
    ) -> list[str]:
        """Each conversation joins the running batch as its own request; beam search (and what cannot join) runs
        alone between the scheduler's steps."""
        scheduler = self._scheduler
        assert scheduler is not None
        batches = [
            self.processor.prepare([conv], [imgs], train=False)
            for conv, imgs in zip(conversations, distribute_images(conversations, images))
        ]

        def alone(batch: ModelBatch) -> str:
            return self._generate_plain(batch.to(self.device), options, stops, streamer)[0]

        if not self.static(options.num_beams):
            return [scheduler.run_exclusive(lambda b=b: alone(b)) for b in batches]
        requests = []
        for batch in batches:
            ids = batch.text.input_ids[0]
            requests.append(
                scheduler.submit(
                    DecodeRequest(ids.tolist(), options, stops, batch=batch, on_token=stream_callback(streamer, ids))
                )
            )
        answers = []
        for batch, request in zip(batches, requests):
            request.done.wait()
            if isinstance(request.error, FastDecodingUnsupported):  # e.g. beyond a sliding window: answer it alone
                log.warning("this request cannot join the batch (%s); answering it alone", request.error)
                answers.append(scheduler.run_exclusive(lambda b=batch: alone(b)))
                continue
            if request.error is not None:
                raise request.error
            answers.append(self.processor.decode(request.tokens, options.stop))
        if streamer is not None:
            streamer.end()
        return answers

    # ------------------------------------------------------------------ the slot scheduler
    def _scheduler_for(self, rows: int, needed: int) -> SlotScheduler | None:
        """The slot scheduler for ``rows`` prompts of up to ``needed`` positions: the current one while it fits, else a
        new one replacing it (the old cache is freed first). None where the LLM cannot use it: decoding then stays
        plain (the reason is logged once)."""
        settings = self._decoding
        if settings.max_len:
            max_len = settings.max_len
        else:
            limit = int(getattr(self.model.llm.config, "max_position_embeddings", 0) or 1 << 30)
            max_len = min(-(-needed // 256) * 256, max(limit, needed))
        current = self._scheduler
        if current is not None and current.slots >= rows and current.max_len >= max_len:
            return current
        self._scheduler = None
        self._scheduler = SlotScheduler.for_model(self.model, self.processor, settings, rows, max_len)
        if self._scheduler is None:
            self._decoding = DecodingSettings(mode="plain")
        return self._scheduler

    def start_batching(self, slots: int, max_len: int) -> bool:
        """Continuous batching with ``slots`` rows of ``max_len`` positions (fewer rows when their KV cache would not
        fit in 80% of the free device memory); False (logged) where it cannot run: requests then take turns."""
        with self._lock:
            self.close()
            if not self.static():
                log.info("decoding is %s on %s: requests are answered one at a time", self._decoding.mode, self.device)
                return False
            slots = self._slots_that_fit(slots, max_len)
            if slots < 2:
                return False
            scheduler = SlotScheduler.for_model(self.model, self.processor, self._decoding, slots, max_len)
            if scheduler is None:
                log.warning("no continuous batching: requests are answered one at a time")
                return False
            log.info("continuous batching: %d slots of %d positions", slots, max_len)
            self._scheduler = scheduler.start()
            return True

    def _slots_that_fit(self, slots: int, max_len: int) -> int:
        """``slots``, or fewer when their KV cache would take more than 80% of the device's free memory (logged)."""
        free = free_memory_bytes(self.device)
        if free is None:
            return slots
        per_slot = max_len * kv_bytes_per_position(self.model.llm)
        fits = int(0.8 * free // per_slot)
        if fits < slots:
            log.warning(
                "%d batch slots of %d positions need %.1f GiB of KV cache, but %.1f GiB is free: %s",
                slots,
                max_len,
                slots * per_slot / 2**30,
                free / 2**30,
                f"using {fits} slots (lower --max-context for more)"
                if fits >= 2
                else "answering requests one at a time (lower --max-context or --batch-slots)",
            )
        return min(slots, fits)

    def close(self) -> None:
        """Stop continuous batching (if it runs) and free the slot cache."""
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None and scheduler.thread is not None:
            scheduler.stop()


__all__ = ["Engine"]
