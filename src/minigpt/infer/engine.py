"""The inference engine: a model, its processor and how they decode; the one way into generation.

The Python API, chat, web UI, server and eval all generate through :meth:`Engine.generate`, which answers each
conversation with a :class:`~minigpt.infer.generate.Generation` (text, generated ids, finish reason, token counts);
:meth:`Engine.ask` is the one-question shortcut. Every front-end loads its engine with :func:`load_engine`.

The engine chooses how it decodes once, when it is built (:attr:`Engine.decoding_choice`, logged): on the slot
decoder ("static": one preallocated KV cache, CUDA graphs, continuous batching; :mod:`minigpt.infer.batching`), or
with transformers' ``generate`` ("plain": beam search, an LLM without transformers' cache support, a CPU under
``auto``). It owns the one slot scheduler; nothing else builds one. Generation always runs with the model in eval
mode. Two ways to run: synchronously (each call decodes its conversations on the scheduler, one call at a time), or
with continuous batching (:meth:`Engine.start_batching`: the scheduler runs in a thread, concurrent calls share its
steps).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteriaList

from ..data.conversation import Conversation, Image, ImageLike
from ..data.templates import user_parts
from ..data.tokenize import ModelBatch
from ..device import free_memory_bytes
from ..model.minigpt import MiniGPT
from ..model.processor import MiniGPTProcessor, distribute_images
from .batching import DecodeRequest, SlotScheduler
from .decoding import DecodingChoice, DecodingSettings, FastDecodingUnsupported, choose_decoding
from .generate import Generation, GenerationOptions, StopOnStrings, generated_ids
from .loading import LoadSpec, device_map_problem, load_model
from .slots import kv_bytes_per_position, slot_decoding_problem

log = logging.getLogger(__name__)

Images = Sequence[ImageLike] | Sequence[Sequence[ImageLike]] | None
#: What :meth:`Engine.generate` answers: conversations, or one conversation's prompt from ``processor.prepare``.
Prompts = Conversation | Sequence[Conversation] | ModelBatch


class Engine:
    """Generation for one model and processor (see the module doc)."""

    def __init__(self, model: MiniGPT, processor: MiniGPTProcessor, decoding: DecodingSettings | None = None) -> None:
        self.model = model.eval()
        self.processor = processor
        self._scheduler: SlotScheduler | None = None
        self._lock = threading.RLock()
        self.decoding = decoding or DecodingSettings()

    @classmethod
    def from_pretrained(cls, directory: str | Path, **load_options: Any) -> Engine:
        """Load a model directory (``device``, ``dtype``, ``quantize``, ``trust_remote_code``, ``decoding``... as
        :class:`minigpt.infer.loading.LoadSpec` takes them); :func:`load_engine` with ``LoadSpec(model=directory)``."""
        return load_engine(LoadSpec(model=str(directory), **load_options))

    # ------------------------------------------------------------------ settings
    @property
    def decoding(self) -> DecodingSettings:
        """How :meth:`generate` was asked to decode; setting it frees the slot scheduler and chooses again."""
        return self._decoding

    @decoding.setter
    def decoding(self, settings: DecodingSettings) -> None:
        with self._lock:
            self.close()
            self._decoding = settings
            llm = self.model.llm
            quantized = bool(getattr(llm, "is_quantized", False) or getattr(llm, "hf_quantizer", None))
            problem = device_map_problem(llm) or slot_decoding_problem(llm)
            self._choice = choose_decoding(settings, self.model.device, quantized, problem)
            refused = settings.mode == "static" and self._choice.mode == "plain"
            log.log(logging.WARNING if refused else logging.INFO, "decoding: %s", self._choice)

    @property
    def decoding_choice(self) -> DecodingChoice:
        """What :meth:`generate` decodes with (static or plain) and why: chosen once, from :attr:`decoding`, the
        device and the LLM, when the engine is built or its settings change."""
        return self._choice

    @property
    def batching(self) -> bool:
        """Whether continuous batching runs (:meth:`start_batching`)."""
        return self._scheduler is not None and self._scheduler.thread is not None

    def static(self, num_beams: int = 1) -> bool:
        """Whether a generation with ``num_beams`` runs on the slot decoder."""
        return num_beams == 1 and self._choice.mode == "static"

    # ------------------------------------------------------------------ generating
    def ask(self, images: ImageLike | Sequence[ImageLike] | None, question: str, **options: Any) -> str:
        """The answer to one question about ``images`` (one image, a list, or None), placed as the template places
        them (no ``<Img><ImageHere></Img>`` to write); ``options`` are :class:`GenerationOptions` fields."""
        images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
        conversation = Conversation()
        conversation.add("user", user_parts(self.processor.template, [*(Image() for _ in images), question]))
        return self.generate(conversation, [images], **options)[0].text

    @torch.inference_mode()
    def generate(
        self,
        prompts: Prompts,
        images: Images = None,
        options: GenerationOptions | None = None,
        *,
        streamer: Any = None,
        **overrides: Any,
    ) -> list[Generation]:
        """Answer the last user turn of each conversation (or a prompt that ``processor.prepare(train=False)``
        built for one). ``options`` and/or keyword ``overrides`` (``max_new_tokens=20``) set the decoding. A
        ``streamer`` (transformers' protocol, one conversation) sees the tokens as they come."""
        options = (options or GenerationOptions()).merged(overrides)
        if options.seed is not None:
            torch.manual_seed(options.seed)
        static = self.static(options.num_beams)
        batches = self._prepare(prompts, images, one_by_one=static or self.batching)
        stops = self.processor.stop_strings(options.stop)
        if self.batching:  # the model stays in eval mode while the scheduler runs
            return self._generate_batching(batches, options, stops, streamer, static)
        with self._lock, self._eval_mode():
            if static:
                try:
                    return self._generate_static(batches, options, stops, streamer)
                except FastDecodingUnsupported as err:  # e.g. a prompt beyond a sliding window
                    log.warning("static decoding cannot answer this batch (%s); using transformers' generate", err)
            return [g for batch in batches for g in self._generate_plain(batch, options, stops, streamer)]

    def _prepare(self, prompts: Prompts, images: Images, one_by_one: bool) -> list[ModelBatch]:
        """The prompts as model inputs: one left-padded batch, or (for the slot decoder) one batch per conversation."""
        if isinstance(prompts, ModelBatch):
            return [prompts]
        conversations = [prompts] if isinstance(prompts, Conversation) else list(prompts)
        if not one_by_one:
            return [self.processor.prepare(conversations, images, train=False)]
        per_conversation = distribute_images(conversations, images)
        return [self.processor.prepare([c], [i], train=False) for c, i in zip(conversations, per_conversation)]

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        """Dropout off where the caller left the model training (e.g. a trainer's sample; training mode restored
        after). The engine put it in eval mode when it was built: usually there is nothing to switch."""
        if not self.model.training:
            yield
            return
        self.model.eval()
        try:
            yield
        finally:
            self.model.train()

    def _generate_static(
        self, batches: list[ModelBatch], options: GenerationOptions, stops: list[str], streamer: Any
    ) -> list[Generation]:
        """Decode one request per conversation on the slot scheduler, synchronously."""
        longest = max(b.text.input_ids.shape[1] for b in batches)
        scheduler = self._scheduler_for(len(batches), longest + options.max_new_tokens)
        requests = [self._request(batch, options, stops, streamer) for batch in batches]
        for request in requests:
            scheduler.submit(request)
        scheduler.run_until_idle()
        if streamer is not None:
            streamer.end()
        return [self._result(request) for request in requests]

    def _request(self, batch: ModelBatch, options: GenerationOptions, stops: list[str], streamer: Any) -> DecodeRequest:
        """A slot-decoder request for one conversation's ``batch``, feeding a transformers-style ``streamer``: the
        prompt with the first token (so a request that fails before its first token has streamed nothing), then each
        token."""
        if streamer is None:
            return DecodeRequest(batch, options, stops)
        started = []

        def on_token(token: int) -> None:
            if not started:
                streamer.put(batch.text.input_ids[0].cpu())
                started.append(True)
            streamer.put(torch.tensor([token]))

        return DecodeRequest(batch, options, stops, on_token=on_token)

    def _result(self, request: DecodeRequest) -> Generation:
        if request.error is not None:
            raise request.error
        assert request.finish_reason is not None
        text = self.processor.decode(request.tokens, request.options.stop)
        return Generation(text, request.tokens, request.finish_reason, len(request.prompt_ids))

    def _generate_plain(
        self, batch: ModelBatch, options: GenerationOptions, stops: list[str], streamer: Any
    ) -> list[Generation]:
        """transformers' ``generate`` on the prompt embeddings (beam search, and what the slot decoder cannot run)."""
        batch = batch.to(self.model.device)
        text, processor = batch.text, self.processor
        prompt_len = text.input_ids.shape[1]
        end_ids = processor.end_token_ids()
        out = self.model.llm.generate(
            input_ids=text.input_ids,  # rides along with the embeddings so that repetition penalty sees the prompt
            inputs_embeds=self.model.embed(batch),
            attention_mask=text.attention_mask,
            stopping_criteria=StoppingCriteriaList([StopOnStrings(processor.tokenizer, stops, prompt_len)]),
            eos_token_id=end_ids or None,
            pad_token_id=processor.pad_token_id,
            streamer=streamer,
            **options.hf_kwargs(),
        )
        results = []
        for row, prompt_tokens in zip(out, text.attention_mask.sum(dim=1).tolist()):
            ids, reason = generated_ids(row[prompt_len:].tolist(), end_ids, processor.tokenizer, stops)
            results.append(Generation(processor.decode(ids, options.stop), ids, reason, int(prompt_tokens)))
        return results

    def _generate_batching(
        self,
        batches: list[ModelBatch],
        options: GenerationOptions,
        stops: list[str],
        streamer: Any,
        static: bool,
    ) -> list[Generation]:
        """Each conversation joins the running batch as its own request; beam search (and what cannot join) runs
        alone between the scheduler's steps."""
        scheduler = self._scheduler
        assert scheduler is not None

        def alone(batch: ModelBatch) -> Generation:
            return scheduler.run_exclusive(lambda: self._generate_plain(batch, options, stops, streamer)[0])

        if not static:
            return [alone(batch) for batch in batches]
        requests = [scheduler.submit(self._request(batch, options, stops, streamer)) for batch in batches]
        results = []
        for request in requests:
            request.done.wait()
            if isinstance(request.error, FastDecodingUnsupported):  # e.g. beyond a sliding window: answer it alone
                log.warning("this request cannot join the batch (%s); answering it alone", request.error)
                results.append(alone(request.batch))
            else:
                results.append(self._result(request))
        if streamer is not None:
            streamer.end()
        return results

    # ------------------------------------------------------------------ the slot scheduler
    def _scheduler_for(self, rows: int, needed: int) -> SlotScheduler:
        """The slot scheduler for ``rows`` prompts of up to ``needed`` positions: the current one while it fits, else a
        new one replacing it (the old cache is freed first)."""
        if self._decoding.max_len:
            max_len = self._decoding.max_len
        else:
            limit = int(getattr(self.model.llm.config, "max_position_embeddings", 0) or 1 << 30)
            max_len = min(-(-needed // 256) * 256, max(limit, needed))
        current = self._scheduler
        if current is not None and current.slots >= rows and current.max_len >= max_len:
            return current
        self._scheduler = None
        self._scheduler = SlotScheduler.for_model(self.model, self.processor, self._decoding, rows, max_len)
        return self._scheduler

    def start_batching(self, slots: int, max_len: int) -> bool:
        """Continuous batching with ``slots`` rows of ``max_len`` positions (fewer rows when their KV cache would not
        fit in 80% of the free device memory); False (logged) where it cannot run: requests then take turns."""
        with self._lock:
            self.close()
            if not self.static():
                log.info("decoding is %s: requests are answered one at a time", self.decoding_choice)
                return False
            slots = self._slots_that_fit(slots, max_len)
            if slots < 2:
                return False
            try:
                scheduler = SlotScheduler.for_model(self.model, self.processor, self._decoding, slots, max_len)
            except FastDecodingUnsupported as err:
                log.warning("no continuous batching (%s): requests are answered one at a time", err)
                return False
            log.info("continuous batching: %d slots of %d positions", slots, max_len)
            self._scheduler = scheduler.start()
            return True

    def _slots_that_fit(self, slots: int, max_len: int) -> int:
        """``slots``, or fewer when their KV cache would take more than 80% of the device's free memory (logged)."""
        free = free_memory_bytes(self.model.device)
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


def load_engine(spec: LoadSpec) -> Engine:
    """The one way every front-end (Python, chat, web, serve, eval, lmms-eval, bench) loads a model: ``spec``'s model
    and processor on its device, in an :class:`Engine` with its decoding settings."""
    model, processor = load_model(spec)
    return Engine(model, processor, spec.decoding)


__all__ = ["Engine", "Prompts", "load_engine"]
