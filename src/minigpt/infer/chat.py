"""Chat on top of the :class:`~minigpt.infer.engine.Engine`: a served model, and multi-turn sessions.

The roles: :class:`~minigpt.infer.engine.Engine` generates (any batch of conversations; ``ask`` for one question).
:class:`ChatEngine` is an engine *served* to a front-end (terminal, web UI, OpenAI server): default options, a
context size, a name, an image size limit; it prepares each prompt once (checking that it fits the context) and
answers it at once or as a stream of text deltas. :class:`Chat` is one user's multi-turn session on a ChatEngine,
with images and history, as in the MiniGPT-4 / MiniGPT4Qwen demos: images attach to the next user turn
(``<Img><ImageHere></Img>`` per image, then the template's ``image_separator``, then the question).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.conversation import Conversation, Image, ImageLike, Text
from ..data.images import DEFAULT_MAX_PIXELS, load_image
from ..data.templates import IMAGE_SLOT, Template, text_part, user_parts
from ..data.tokenize import ModelBatch
from .engine import Engine, load_engine
from .generate import Generation, GenerationOptions
from .loading import LoadSpec

if TYPE_CHECKING:
    from ..model.processor import MiniGPTProcessor

log = logging.getLogger(__name__)


class ContextTooLong(ValueError):
    """The prompt plus ``max_new_tokens`` does not fit the model's context."""


# ---------------------------------------------------------------------------------------------- streaming
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


class Stream:
    """An answer as text deltas (iterate; :meth:`close` stops generation at the next token); :attr:`result` is the
    :class:`Generation` once the deltas are exhausted."""

    def __init__(self, deltas: Callable[[Stream], Iterator[str]]) -> None:
        self.result: Generation | None = None
        self._deltas = deltas(self)

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> str:
        return next(self._deltas)

    def close(self) -> None:
        self._deltas.close()


# ---------------------------------------------------------------------------------------------- engine
class ChatEngine:
    """An :class:`Engine` with default options and a context size, as every front-end (terminal, web UI, OpenAI
    server) holds it: prompts are checked against the context, answers stream as text deltas. With ``batch_slots``
    > 1 (and a model that decodes on the slot decoder, see :class:`~minigpt.infer.decoding.DecodingSettings`)
    requests from many threads decode together (continuous batching); otherwise they take turns."""

    #: Images with more pixels are refused from their header, before decoding (None: no limit); chat, web, server.
    max_image_pixels: int | None = DEFAULT_MAX_PIXELS

    def __init__(
        self,
        engine: Engine,
        options: GenerationOptions | None = None,
        max_context: int | None = None,
        name: str = "minigpt",
        batch_slots: int = 1,
    ) -> None:
        self.engine = engine
        self.options = options or GenerationOptions()
        llm_context = getattr(engine.model.llm.config, "max_position_embeddings", 0)
        self.max_context = max_context or int(llm_context or 2048)
        self.name = name
        if batch_slots > 1:
            engine.start_batching(batch_slots, self.max_context)

    def close(self) -> None:
        """Stop the batching thread (if any)."""
        self.engine.close()

    @property
    def processor(self) -> MiniGPTProcessor:
        return self.engine.processor

    @property
    def template(self) -> Template:
        return self.processor.template

    def chat(self, system: str | None = None, options: GenerationOptions | None = None) -> Chat:
        """A new session on this engine."""
        return Chat(self, system=system, options=options)

    def prompt_length(self, conversation: Conversation) -> int:
        """Tokens of the generation prompt (image slots included)."""
        return len(self.processor.encode(conversation, train=False))

    def prepare(
        self, conversation: Conversation, images: Sequence[ImageLike] = (), options: GenerationOptions | None = None
    ) -> ModelBatch:
        """The conversation's prompt, tokenized once (answer it with :meth:`generate` or :meth:`stream`);
        :class:`ContextTooLong` when it plus ``max_new_tokens`` exceeds the context."""
        options = options or self.options
        prompt = self.processor.prepare([conversation], [list(images)], train=False)
        n = prompt.text.input_ids.shape[1]
        if n + options.max_new_tokens > self.max_context:
            raise ContextTooLong(
                f"the prompt has {n} tokens; with max_new_tokens {options.max_new_tokens} it exceeds the "
                f"context of {self.max_context} tokens"
            )
        return prompt

    def count_tokens(self, text: str) -> int:
        return self.processor.count_tokens(text)

    def generate(
        self,
        prompt: Conversation | ModelBatch,
        images: Sequence[ImageLike] = (),
        options: GenerationOptions | None = None,
    ) -> Generation:
        """The answer to the last user turn (waits for its turn, or for a batch slot); ``prompt`` is a conversation
        with its ``images``, or what :meth:`prepare` made of them."""
        return self.engine.generate(self._prompt(prompt, images), None, options or self.options)[0]

    def stream(
        self,
        prompt: Conversation | ModelBatch,
        images: Sequence[ImageLike] = (),
        options: GenerationOptions | None = None,
    ) -> Stream:
        """The answer as text deltas (stop strings cut, stripped); they join to :meth:`generate`'s text, which is
        the stream's ``result`` at the end.

        Closing the stream early stops generation at the next token. Beam search cannot stream in
        transformers: it yields the whole answer at once.
        """
        options = options or self.options
        batch = self._prompt(prompt, images)
        return Stream(lambda stream: self._deltas(stream, batch, options))

    def _prompt(self, prompt: Conversation | ModelBatch, images: Sequence[ImageLike]) -> ModelBatch:
        if isinstance(prompt, ModelBatch):
            return prompt
        return self.processor.prepare([prompt], [list(images)], train=False)

    def _deltas(self, stream: Stream, batch: ModelBatch, options: GenerationOptions) -> Iterator[str]:
        if options.num_beams > 1:
            stream.result = self.generate(batch, options=options)
            yield stream.result.text
            return
        tokenizer = self.processor.tokenizer
        stops = [*self.processor.stop_strings(options.stop), tokenizer.eos_token, tokenizer.pad_token]
        cutter = _StopCutter([s for s in stops if isinstance(s, str)])
        cancel = threading.Event()
        streamer = _streamer(tokenizer, cancel)
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["answer"] = self.engine.generate(batch, None, options, streamer=streamer)[0]
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
        stream.result = result["answer"]
        text = stream.result.text
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
    def load(cls, source: ImageLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> ChatImage:
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
    """A prepared question: the conversation sent, its images in slot order, the model input made of them (tokenized
    once), the images newly attached to the question, the options, and how many old exchanges were left out to fit
    the context."""

    conversation: Conversation
    images: list[Any]
    batch: ModelBatch
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
        engine: ChatEngine | Engine,
        system: str | None = None,
        options: GenerationOptions | None = None,
    ) -> None:
        self.engine = engine if isinstance(engine, ChatEngine) else ChatEngine(engine, options)
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
    ) -> Chat:
        """Load a model directory (or ``llm=``, ``vision=``, ``projector=`` base parts; see
        :class:`minigpt.infer.loading.LoadSpec` for ``device``, ``dtype``, ``quantize``...) and start a session."""
        engine = load_engine(LoadSpec(model=str(model) if model is not None else None, **load_kwargs))
        return cls(ChatEngine(engine, options, max_context), system=system)

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
        answer = self.engine.generate(prompt.batch, options=prompt.options).text
        self.history.append(Exchange(question, answer, prompt.attach))
        return answer

    def stream(self, question: str, options: GenerationOptions | None = None) -> Iterator[str]:
        """Answer ``question`` as text deltas; the exchange joins the history once the stream ends."""
        prompt = self.prepare(question, options)
        pieces = []
        for delta in self.engine.stream(prompt.batch, options=prompt.options):
            pieces.append(delta)
            yield delta
        self.history.append(Exchange(question, "".join(pieces), prompt.attach))

    def prepare(self, question: str, options: GenerationOptions | None = None) -> Prompt:
        """What :meth:`ask` would send: the newest history that fits the context, then the question with
        the images not yet shown (:class:`ContextTooLong` if the question alone does not fit)."""
        options = options or self.options or self.engine.options
        text_part(question)
        kept = list(self.history)
        while True:
            shown = {id(img) for ex in kept for img in ex.images}
            attach = [img for img in self.images if id(img) not in shown]
            conv = self._conversation(kept, question, attach)
            images = [img.image for ex in kept for img in ex.images] + [img.image for img in attach]
            try:
                batch = self.engine.prepare(conv, images, options)
                break
            except ContextTooLong:
                if not kept:
                    raise
                kept = kept[1:]
        return Prompt(conv, images, batch, attach, options, len(self.history) - len(kept))

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
    "Chat",
    "ChatEngine",
    "ChatImage",
    "ContextTooLong",
    "Exchange",
    "Prompt",
    "Stream",
]
