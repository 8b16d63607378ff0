"""Chat on top of :meth:`MiniGPT.generate`: an engine that owns the model, and multi-turn sessions.

:class:`ChatEngine` is what every front-end (terminal, web UI, OpenAI server) holds: it serialises
model access with a lock, checks that prompts fit the context, and streams answers as text deltas.
:class:`Chat` is one conversation with images and history, as in the MiniGPT-4 / MiniGPT4Qwen demos:
images attach to the next user turn (``<Img><ImageHere></Img>`` per image, then the template's
``image_separator``, then the question).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from ..data.conversation import Conversation, Image, ImageLike, Part, Text
from ..data.images import DEFAULT_MAX_PIXELS, load_image
from ..data.templates import IMAGE_SLOT, Template
from ..device import free_memory_bytes
from .batching import DecodeRequest, SlotScheduler, stream_callback
from .decoding import FastDecodingUnsupported
from .generate import GenerationOptions
from .slots import kv_bytes_per_position

if TYPE_CHECKING:
    from ..model.minigpt import MiniGPT

log = logging.getLogger(__name__)


class ContextTooLong(ValueError):
    """The prompt plus ``max_new_tokens`` does not fit the model's context."""


# ---------------------------------------------------------------------------------------------- helpers
def text_part(text: str) -> Text:
    """A verbatim text part; refuses the image placeholder, which would open an image slot."""
    if IMAGE_SLOT in text:
        raise ValueError(f"text may not contain {IMAGE_SLOT!r}: attach images as images, not as placeholders")
    return Text(text)


def user_parts(template: Template, pieces: Sequence[str | Image]) -> list[Part]:
    """Parts of a user turn from text and :class:`Image` pieces, in order; text right after an image
    starts with ``template.image_separator`` (``<Img><ImageHere></Img> question`` as the originals)."""
    parts: list[Part] = []
    for piece in pieces:
        if isinstance(piece, Image):
            parts.append(piece)
        elif piece:
            sep = template.image_separator if parts and isinstance(parts[-1], Image) else ""
            parts.append(text_part(sep + piece))
    return parts


def override_options(
    base: GenerationOptions,
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] | None = None,
) -> GenerationOptions:
    """``base`` with the given fields changed (validated). ``temperature`` 0 means greedy, > 0 sampling."""
    changes: dict[str, Any] = {}
    if temperature is not None:
        if temperature < 0:
            raise ValueError("temperature must be >= 0 (0 = greedy)")
        changes["do_sample"] = temperature > 0
        if temperature > 0:
            changes["temperature"] = float(temperature)
    for name, value in (
        ("top_p", top_p), ("top_k", top_k), ("num_beams", num_beams), ("max_new_tokens", max_new_tokens),
        ("repetition_penalty", repetition_penalty), ("seed", seed),
    ):
        if value is not None:
            changes[name] = value
    if stop is not None:
        changes["stop"] = list(stop)
    return dataclasses.replace(base, **changes)


class _StopCutter:
    """Turns raw streamed text into deltas of the final answer: cut at the first stop string, stripped,
    holding back any tail that may still become a stop string (or trailing whitespace)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.raw = ""
        self.emitted = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.raw += piece
        cuts = [i for i in (self.raw.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped = True
            visible = self.raw[: min(cuts)]
        else:
            hold = max((k for s in self.stops for k in range(1, len(s)) if self.raw.endswith(s[:k])), default=0)
            visible = self.raw[: len(self.raw) - hold]
        visible = visible.strip()
        delta = visible[len(self.emitted) :] if visible.startswith(self.emitted) else ""
        self.emitted += delta
        return delta


def _streamer(tokenizer: Any, cancel: threading.Event) -> Any:
    """A ``TextIteratorStreamer`` whose ``put`` aborts generation once ``cancel`` is set."""
    from transformers import TextIteratorStreamer

    class CancellableStreamer(TextIteratorStreamer):
        def put(self, value: Any) -> None:
            if cancel.is_set():
                raise _Cancelled()
            super().put(value)

    return CancellableStreamer(tokenizer, skip_prompt=True, skip_special_tokens=False)


class _Cancelled(Exception):
    pass


# ---------------------------------------------------------------------------------------------- engine
class ChatEngine:
    """A loaded :class:`MiniGPT` with default options.

    With ``batch_slots`` > 1 (and a model that decodes on the slot decoder, see
    :class:`~minigpt.infer.decoding.DecodingSettings`) requests from many threads decode together in one batch
    (continuous batching, :class:`~minigpt.infer.batching.SlotScheduler`); otherwise one generation runs at a time
    (a lock)."""

    #: Images with more pixels are refused from their header, before decoding (None: no limit); chat, web, server.
    max_image_pixels: int | None = DEFAULT_MAX_PIXELS

    def __init__(
        self,
        model: "MiniGPT",
        options: GenerationOptions | None = None,
        max_context: int | None = None,
        name: str = "minigpt",
        batch_slots: int = 1,
    ) -> None:
        self.model = model.eval()
        self.options = options or GenerationOptions()
        self.max_context = max_context or int(getattr(model.llm.config, "max_position_embeddings", 0) or 2048)
        self.name = name
        self.lock = threading.Lock()
        self.scheduler: SlotScheduler | None = None
        if batch_slots > 1:
            self.scheduler = self._start_scheduler(batch_slots)

    def _start_scheduler(self, slots: int) -> "SlotScheduler | None":
        settings = self.model.decoding
        if not settings.use_static(self.model.device):
            log.info("decoding is %s on %s: requests are answered one at a time", settings.mode, self.model.device)
            return None
        slots = self._slots_that_fit(slots)
        if slots < 2:
            return None
        scheduler = SlotScheduler.for_model(self.model, slots, self.max_context)
        if scheduler is None:
            log.warning("no continuous batching: requests are answered one at a time")
            return None
        log.info("continuous batching: %d slots of %d positions", slots, self.max_context)
        return scheduler.start()

    def _slots_that_fit(self, slots: int) -> int:
        """``slots``, or fewer when their KV cache (``max_context`` positions each) would take more than 80% of the
        device's free memory (logged)."""
        free = free_memory_bytes(self.model.device)
        if free is None:
            return slots
        per_slot = self.max_context * kv_bytes_per_position(self.model.llm)
        fits = int(0.8 * free // per_slot)
        if fits < slots:
            log.warning(
                "%d batch slots of %d positions need %.1f GiB of KV cache, but %.1f GiB is free: %s", slots,
                self.max_context, slots * per_slot / 2**30, free / 2**30,
                f"using {fits} slots (lower --max-context for more)" if fits >= 2
                else "answering requests one at a time (lower --max-context or --batch-slots)",
            )
        return min(slots, fits)

    def close(self) -> None:
        """Stop the batching thread (if any)."""
        if self.scheduler is not None:
            self.scheduler.stop()

    @property
    def template(self) -> Template:
        return self.model.template

    def chat(self, system: str | None = None, options: GenerationOptions | None = None) -> "Chat":
        """A new session on this engine."""
        return Chat(self, system=system, options=options)

    def prompt_length(self, conversation: Conversation) -> int:
        """Tokens of the generation prompt (image slots included)."""
        return len(self.model.encode(conversation, train=False))

    def check_length(self, conversation: Conversation, options: GenerationOptions | None = None) -> int:
        """The prompt length; :class:`ContextTooLong` when prompt + ``max_new_tokens`` exceed the context."""
        options = options or self.options
        n = self.prompt_length(conversation)
        if n + options.max_new_tokens > self.max_context:
            raise ContextTooLong(
                f"the prompt has {n} tokens; with max_new_tokens {options.max_new_tokens} it exceeds the "
                f"context of {self.max_context} tokens"
            )
        return n

    def count_tokens(self, text: str) -> int:
        return len(self.model.tokenizer.encode(text, add_special_tokens=False))

    def generate(
        self, conversation: Conversation, images: Sequence[ImageLike] = (), options: GenerationOptions | None = None
    ) -> str:
        """The answer to the last user turn (waits for the model lock, or for a batch slot)."""
        return self._answer(conversation, images, options or self.options, streamer=None)

    def _answer(self, conversation: Conversation, images: Sequence[ImageLike], options: GenerationOptions,
                streamer: Any) -> str:
        """Generate on the batch scheduler when there is one (beam search: alone, between its steps), else
        under the lock; ``streamer`` (transformers' protocol) sees the tokens."""
        model = self.model

        def alone() -> str:
            return model.generate([conversation], [list(images)], options, streamer=streamer)[0]

        if self.scheduler is None or options.num_beams > 1:
            if self.scheduler is not None:
                return self.scheduler.run_exclusive(alone)
            with self.lock:
                return alone()
        batch = model.prepare([conversation], [list(images)], train=False)
        ids = batch.text.input_ids[0]
        stops = [*model.template.stop_strings, *options.stop]
        request = DecodeRequest(ids.tolist(), options, stops, batch=batch, on_token=stream_callback(streamer, ids))
        try:
            self.scheduler.generate(request)
        except FastDecodingUnsupported as err:  # e.g. a prompt beyond a sliding window: answer it alone
            log.warning("this request cannot join the batch (%s); answering it alone", err)
            return self.scheduler.run_exclusive(alone)
        return model.decode(request.tokens, options.stop)

    def stream(
        self, conversation: Conversation, images: Sequence[ImageLike] = (), options: GenerationOptions | None = None
    ) -> Iterator[str]:
        """The answer as text deltas (stop strings cut, stripped); they join to :meth:`generate`'s text.

        Closing the iterator early stops generation at the next token. Beam search cannot stream in
        transformers: it yields the whole answer at once.
        """
        options = options or self.options
        if options.num_beams > 1:
            yield self.generate(conversation, images, options)
            return
        model = self.model
        stops = [*model.template.stop_strings, *options.stop, model.tokenizer.eos_token, model.tokenizer.pad_token]
        cutter = _StopCutter([s for s in stops if isinstance(s, str)])
        cancel = threading.Event()
        streamer = _streamer(model.tokenizer, cancel)
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["text"] = self._answer(conversation, images, options, streamer)
            except _Cancelled:
                pass
            except BaseException as err:  # re-raised in the consumer
                result["error"] = err
            finally:
                streamer.end()

        thread = threading.Thread(target=run, name="minigpt-generate", daemon=True)
        thread.start()
        try:
            for piece in streamer:
                delta = cutter.feed(piece)
                if delta:
                    yield delta
        finally:
            if thread.is_alive():
                cancel.set()
            thread.join()
        if "error" in result:
            raise result["error"]
        text = result["text"]
        if text.startswith(cutter.emitted):
            if len(text) > len(cutter.emitted):
                yield text[len(cutter.emitted) :]
        else:
            log.warning("streamed text %r differs from the decoded answer %r", cutter.emitted, text)


# ---------------------------------------------------------------------------------------------- session
@dataclass(eq=False)
class ChatImage:
    """An image loaded once (RGB), with the name it was given (a path or ``<image>``)."""

    name: str
    image: Any

    @classmethod
    def load(cls, source: ImageLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> "ChatImage":
        name = str(source) if isinstance(source, (str, Path)) else "<image>"
        return cls(name, load_image(source, max_pixels=max_pixels))


@dataclass
class Exchange:
    """One question and its answer; ``images`` were shown to the model with this question."""

    question: str
    answer: str
    images: list[ChatImage] = field(default_factory=list)


@dataclass
class Prompt:
    """A prepared question: the conversation sent, its images in slot order, the images newly attached
    to the question, the options, and how many old exchanges were left out to fit the context."""

    conversation: Conversation
    images: list[Any]
    attach: list[ChatImage]
    options: GenerationOptions
    dropped: int


class Chat:
    """A multi-turn conversation about the current images.

    ``upload`` adds images, ``set_images`` swaps them, ``reset`` clears the history (keeping the
    images, which attach again to the next question). Older turns keep the images they were asked
    about. When the context is full the oldest exchanges are left out of the prompt (newest kept);
    a current image whose turn was left out is attached again to the new question.
    """

    def __init__(
        self,
        engine: ChatEngine | "MiniGPT",
        system: str | None = None,
        options: GenerationOptions | None = None,
    ) -> None:
        self.engine = engine if isinstance(engine, ChatEngine) else ChatEngine(engine)
        self.system = system
        self.options = options
        self.history: list[Exchange] = []
        self.images: list[ChatImage] = []

    @classmethod
    def load(
        cls,
        model: str | Path | None = None,
        *,
        system: str | None = None,
        options: GenerationOptions | None = None,
        max_context: int | None = None,
        **load_kwargs: Any,
    ) -> "Chat":
        """Load a model directory (or ``llm=``, ``vision=``, ``projector=`` base parts; see
        :class:`minigpt.infer.loading.LoadSpec` for ``device``, ``dtype``, ``quantize``...) and start a session."""
        from .loading import LoadSpec, load_model

        spec = LoadSpec(model=str(model) if model is not None else None, **load_kwargs)
        return cls(ChatEngine(load_model(spec), options, max_context), system=system)

    # -------------------------------------------------------------------------------- images, history
    def upload(self, *images: ImageLike) -> None:
        """Add images; they are shown to the model with the next question."""
        self.images += [ChatImage.load(img, self.engine.max_image_pixels) for img in images]

    def set_images(self, *images: ImageLike) -> None:
        """Replace the current images (history is kept; use :meth:`reset` to forget it)."""
        self.images = [ChatImage.load(img, self.engine.max_image_pixels) for img in images]

    def reset(self, images: bool = False) -> None:
        """Clear the history; with ``images`` forget the images too."""
        self.history = []
        if images:
            self.images = []

    @property
    def image_names(self) -> list[str]:
        return [img.name for img in self.images]

    # -------------------------------------------------------------------------------- asking
    def ask(self, question: str, options: GenerationOptions | None = None) -> str:
        """Answer ``question`` (added to the history)."""
        prompt = self.prepare(question, options)
        answer = self.engine.generate(prompt.conversation, prompt.images, prompt.options)
        self.history.append(Exchange(question, answer, prompt.attach))
        return answer

    def stream(self, question: str, options: GenerationOptions | None = None) -> Iterator[str]:
        """Answer ``question`` as text deltas; the exchange joins the history once the stream ends."""
        prompt = self.prepare(question, options)
        pieces = []
        for delta in self.engine.stream(prompt.conversation, prompt.images, prompt.options):
            pieces.append(delta)
            yield delta
        self.history.append(Exchange(question, "".join(pieces), prompt.attach))

    def prepare(self, question: str, options: GenerationOptions | None = None) -> "Prompt":
        """What :meth:`ask` would send: the newest history that fits the context, then the question with
        the images not yet shown (:class:`ContextTooLong` if the question alone does not fit)."""
        options = options or self.options or self.engine.options
        text_part(question)
        kept = list(self.history)
        while True:
            shown = {id(img) for ex in kept for img in ex.images}
            attach = [img for img in self.images if id(img) not in shown]
            conv = self._conversation(kept, question, attach)
            try:
                self.engine.check_length(conv, options)
                break
            except ContextTooLong:
                if not kept:
                    raise
                kept = kept[1:]
        images = [img.image for ex in kept for img in ex.images] + [img.image for img in attach]
        return Prompt(conv, images, attach, options, len(self.history) - len(kept))

    def _conversation(self, history: list[Exchange], question: str, attach: list[ChatImage]) -> Conversation:
        template = self.engine.template
        conv = Conversation()
        if self.system is not None:
            conv.add("system", [text_part(self.system)])
        for ex in history:
            conv.add("user", user_parts(template, [*(Image() for _ in ex.images), ex.question]))
            conv.add("assistant", [Text(ex.answer.replace(IMAGE_SLOT, ""))])
        conv.add("user", user_parts(template, [*(Image() for _ in attach), question]))
        return conv


__all__ = [
    "Chat", "ChatEngine", "ChatImage", "ContextTooLong", "Exchange", "Prompt", "override_options", "text_part",
    "user_parts",
]
