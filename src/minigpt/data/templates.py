"""Prompt templates: render a :class:`Conversation` into chunks, each tokenized on its own.

A chunk is text (which may contain :data:`IMAGE_SLOT` where an image's embeddings go) or literal
token ids, plus whether it is supervised. Which tokens carry a loss is decided here, once, for
training and eval alike; :mod:`minigpt.data.tokenize` only turns chunks into ids. Chunk boundaries
follow the original code's separate tokenizer calls, so ids match the originals token for token
(checked against ``shared/fixtures/templates``).

Templates (``get_template(name)``):

- ``caption``: MiniGPT-4 stage 1, ``[BOS][image][caption + "\\n"]``.
- ``vicuna0``: MiniGPT-4 stage 2 ``###Human: {} ###Assistant: `` + answer + ``###`` for training; the
  April-2023 demo conversation (system sentence, ``###`` glued) for chat.
- ``vicuna0_head``: the same with the current MiniGPT-4 demo roles (``Assistant: `` with a space).
- ``llama2``: MiniGPT-4 LLaMA-2, ``[INST] {} [/INST] `` + answer + ``</s>``.
- ``chatml``: MiniGPT4Qwen ChatML; every ``<|im_start|>``, every ``<|im_end|>\\n`` and the answers are
  supervised, roles and user/system text are not.
- ``hf``: the LLM tokenizer's own ``chat_template``; assistant contents and the text closing the turn
  are supervised.
- ``blip2``: BLIP-2 as transformers' ``Blip2Processor`` lays it out: ``[images][tokenizer's own start tokens]
  [text]`` (what ``convert import-hf`` picks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .conversation import Conversation, Image, Part, Text, Turn

#: Marks where an image's embeddings are spliced in rendered text.
IMAGE_SLOT = "<ImageHere>"

MINIGPT4_SYSTEM = (
    "Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I "
    "provide it to you. Please answer my questions."
)
CHATML_SYSTEM = "You are a helpful assistant."


@dataclass(frozen=True)
class Chunk:
    """Text tokenized on its own (``add_special_tokens=False``), or literal ``ids``."""

    text: str = ""
    supervised: bool = False
    ids: tuple[int, ...] | None = None


def _bos(tokenizer: Any) -> Chunk:
    if tokenizer.bos_token_id is None:
        raise ValueError("this template needs a BOS token but the tokenizer has none")
    return Chunk(ids=(tokenizer.bos_token_id,))


class Template:
    """Base class. Subclasses implement :meth:`render_train` and :meth:`render_prompt`."""

    name: str = ""
    image_prefix: str = "<Img>"
    image_suffix: str = "</Img>"
    #: "answer": each answer is cut to max_len tokens (MiniGPT-4); "total": the sequence is (MiniGPT4Qwen).
    truncation: Literal["answer", "total"] = "answer"
    #: Text that ends an answer at generation time.
    stop_strings: tuple[str, ...] = ()
    #: What the chat session puts between the image and the first question.
    image_separator: str = " "
    default_system: str | None = None

    def content(self, turn: Turn) -> str:
        """A turn's parts as text, each image written as ``prefix + IMAGE_SLOT + suffix``."""
        return "".join(
            p.text if isinstance(p, Text) else f"{self.image_prefix}{IMAGE_SLOT}{self.image_suffix}"
            for p in turn.parts
            if isinstance(p, (Text, Image))
        )

    def render_train(self, conv: Conversation, tokenizer: Any) -> list[Chunk]:
        """Chunks of a whole conversation, answers supervised."""
        raise NotImplementedError

    def render_prompt(self, conv: Conversation, tokenizer: Any) -> list[Chunk]:
        """Chunks of a conversation whose last turn is the user's, ending where the answer starts."""
        raise NotImplementedError

    def stop_token_ids(self, tokenizer: Any) -> list[list[int]]:
        """Token sequences that end an answer (the originals' ``stop_words_ids``)."""
        out: list[list[int]] = []
        for s in self.stop_strings:
            alone = tokenizer.encode(s, add_special_tokens=False)
            glued_prefix = tokenizer.encode("a", add_special_tokens=False)
            glued = tokenizer.encode("a" + s, add_special_tokens=False)[len(glued_prefix) :]
            for ids in (alone, glued):
                if ids and ids not in out:
                    out.append(ids)
        return out

    def postprocess(self, text: str) -> str:
        """Cut a generated text at the first stop string and strip it."""
        for s in self.stop_strings:
            text = text.split(s, 1)[0]
        return text.strip()


class CaptionTemplate(Template):
    """MiniGPT-4 stage 1: no prompt, the image then the caption followed by ``end_sym``."""

    name = "caption"
    image_prefix = ""
    image_suffix = ""
    end_sym = "\n"
    stop_strings = ("\n",)

    def render_train(self, conv: Conversation, tokenizer: Any) -> list[Chunk]:
        conv.validate()
        chunks = [_bos(tokenizer)]
        for turn in conv.messages():
            if turn.role == "user":
                chunks.append(Chunk(self.content(turn)))
            else:
                chunks.append(Chunk(self.content(turn) + self.end_sym, supervised=True))
        return chunks

    def render_prompt(self, conv: Conversation, tokenizer: Any) -> list[Chunk]:
        msgs = conv.validate(prompt=True)
        chunks = [_bos(tokenizer)]
        for turn in msgs:
            chunks.append(Chunk(self.content(turn) + (self.end_sym if turn.role == "assistant" else "")))
        return chunks


def special_prefix(tokenizer: Any) -> tuple[int, ...]:
    """The ids the tokenizer itself puts before a text (``tokenizer(text)``): BOS for LLaMA and OPT, none for Qwen."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return tuple(full[:start])
    return ()


class Blip2Template(Template):
    """BLIP-2 as transformers' ``Blip2Processor`` (and LAVIS' ``blip2_opt``) feeds it: every image first, then the
    tokenizer's own start tokens (:func:`special_prefix`), then the text of the turns as one string (the text's
    leading spaces dropped). Training appends ``"\\n"`` to each answer, as LAVIS does; generation stops at EOS only,
    as transformers' ``generate`` does."""

    name = "blip2"
    image_prefix = ""
    image_suffix = ""
    end_sym = "\n"
    image_separator = ""

    def _start(self, turns: list[Turn], tokenizer: Any) -> list[Chunk]:
        images = sum(isinstance(p, Image) for t in turns for p in t.parts)
        prefix = special_prefix(tokenizer)
        return [Chunk(IMAGE_SLOT * images)] * bool(images) + [Chunk(ids=prefix)] * bool(prefix)

    @staticmethod
    def _text(turn: Turn) -> str:
        return "".join(p.text for p in turn.parts if isinstance(p, Text))

    def render_train(self, conv: Conversation, tokenizer: Any) -> list[Chunk]:
        conv.validate()
        turns = conv.messages()
        chunks, text = self._start(turns, tokenizer), ""
        for i, turn in enumerate(turns):
            if turn.role == "user":
                text += self._text(turn)
                continue
            text = text.lstrip() if i == 1 else text
            chunks += [Chunk(text)] * bool(text) + [Chunk(self._text(turn) + self.end_sym, supervised=True)]
            text = ""
        return chunks + [Chunk(text)] * bool(text)

    def render_prompt(self, conv: Conversation, tokenizer: Any) -> list[Chunk]:
        msgs = conv.validate(prompt=True)
        text = "".join(self._text(t) + (self.end_sym if t.role == "assistant" else "") for t in msgs).lstrip()
        return self._start(msgs, tokenizer) + [Chunk(text)] * bool(text)


class InstructTemplate(Template):
    """MiniGPT-4 stage-2 style: ``[BOS] user_format.format(question)`` + answer + ``end_sym`` per turn.

    Chat prompts follow the original demo's conversation object (``system + sep``, then
    ``role + message + sep`` per turn, the open assistant role last).
    """

    user_format = "###Human: {} ###Assistant: "
    end_sym = "###"
    chat_roles = ("Human: ", "Assistant: ")
    #: The open assistant role a chat prompt ends with (None: ``chat_roles[1]``).
    open_role: str | None = None
    chat_sep = "###"
    default_system = MINIGPT4_SYSTEM

    def render_train(self, conv: Conversation, tokenizer: Any) -> list[Chunk]:
        conv.validate()
        chunks = [_bos(tokenizer)]
        if conv.system:
            chunks.append(Chunk(conv.system))
        for turn in conv.messages():
            if turn.role == "user":
                chunks.append(Chunk(self.user_format.format(self.content(turn))))
            else:
                chunks.append(Chunk(self.content(turn) + self.end_sym, supervised=True))
        return chunks

    def render_prompt(self, conv: Conversation, tokenizer: Any) -> list[Chunk]:
        msgs = conv.validate(prompt=True)
        system = conv.system if conv.system is not None else self.default_system or ""
        text = system + self.chat_sep
        for turn in msgs:
            role = self.chat_roles[0] if turn.role == "user" else self.chat_roles[1]
            text += role + self.content(turn) + self.chat_sep
        text += self.chat_roles[1] if self.open_role is None else self.open_role
        return [_bos(tokenizer), Chunk(text)]


class Vicuna0Template(InstructTemplate):
    """April-2023 MiniGPT-4 (Vicuna v0): chat roles ``Human: `` / ``Assistant:`` (no trailing space)."""

    name = "vicuna0"
    stop_strings = ("###",)
    open_role = "Assistant:"


class Vicuna0HeadTemplate(InstructTemplate):
    """Current MiniGPT-4 code (Vicuna v0): chat prompt ends ``Assistant: `` with a space."""

    name = "vicuna0_head"
    stop_strings = ("###",)


class Llama2Template(InstructTemplate):
    """MiniGPT-4 LLaMA-2: ``[INST] {} [/INST] `` + answer + ``</s>``; demo chat writes ``<s>[INST] ``."""

    name = "llama2"
    user_format = "[INST] {} [/INST] "
    end_sym = "</s>"
    chat_roles = ("<s>[INST] ", " [/INST] ")
    chat_sep = ""
    stop_strings = ("###", "</s>")

    def render_prompt(self, conv: Conversation, tokenizer: Any) -> list[Chunk]:
        # The original's slow SentencePiece tokenizer encodes the text after a literal "<s>" as a new
        # piece (with its leading "▁"): split there so fast tokenizers give the same ids.
        bos, body = super().render_prompt(conv, tokenizer)
        chunks = [bos]
        for i, piece in enumerate(body.text.split("<s>")):
            if i:
                chunks.append(bos)
            if piece:
                chunks.append(Chunk(piece))
        return chunks


class ChatMLTemplate(Template):
    """MiniGPT4Qwen ChatML, masking as its ``preprocess``; chat context as Qwen's ``make_context``."""

    name = "chatml"
    truncation = "total"
    stop_strings = ("<|im_end|>", "<|im_start|>")
    image_separator = ""
    default_system = CHATML_SYSTEM

    def _turn(self, role: str, content: str, answer: bool, close: bool = True) -> list[Chunk]:
        chunks = [Chunk("<|im_start|>", supervised=True), Chunk(role), Chunk("\n")]
        if close:
            chunks += [Chunk(content, supervised=answer), Chunk("<|im_end|>", True), Chunk("\n", True)]
        return chunks

    def _render(self, conv: Conversation, msgs: list[Turn]) -> list[Chunk]:
        system = conv.system if conv.system is not None else self.default_system or ""
        chunks = self._turn("system", system, answer=False)
        for turn in msgs:
            chunks += self._turn(turn.role, self.content(turn), answer=turn.role == "assistant")
        return chunks

    def render_train(self, conv: Conversation, tokenizer: Any) -> list[Chunk]:
        conv.validate()
        return self._render(conv, conv.messages())

    def render_prompt(self, conv: Conversation, tokenizer: Any) -> list[Chunk]:
        msgs = conv.validate(prompt=True)
        chunks = self._render(conv, msgs) + self._turn("assistant", "", answer=False, close=False)
        return [Chunk(c.text, False, c.ids) for c in chunks]

    def stop_token_ids(self, tokenizer: Any) -> list[list[int]]:
        return [tokenizer.encode(s, add_special_tokens=False) for s in self.stop_strings]


class HFChatTemplate(Template):
    """The LLM's own ``tokenizer.chat_template``.

    Each turn's text is the difference between renderings of successive prefixes of the
    conversation; in an assistant turn, the content and everything after it up to the next turn
    (end-of-turn tokens) is supervised, the header is not.
    """

    name = "hf"

    def _messages(self, conv: Conversation, turns: list[Turn]) -> list[dict[str, str]]:
        return [{"role": t.role, "content": self.content(t)} for t in turns]

    def _render_text(self, tokenizer: Any, messages: list[dict[str, str]], generation: bool) -> str:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'hf' needs a tokenizer with a chat_template; pick another template")
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    def render_train(self, conv: Conversation, tokenizer: Any) -> list[Chunk]:
        conv.validate()
        messages = self._messages(conv, conv.turns)
        chunks: list[Chunk] = []
        previous = ""
        for i, message in enumerate(messages):
            text = self._render_text(tokenizer, messages[: i + 1], generation=False)
            if not text.startswith(previous):
                raise ValueError(
                    "the tokenizer's chat_template does not render conversations incrementally; "
                    "use another template (vicuna0, llama2, chatml)"
                )
            delta = text[len(previous) :]
            previous = text
            if message["role"] != "assistant":
                chunks.append(Chunk(delta))
                continue
            content = message["content"].strip()
            start = delta.find(content) if content else len(delta.rstrip())
            if start < 0:
                raise ValueError("the chat_template changed an assistant message; cannot locate the answer")
            chunks += [Chunk(delta[:start]), Chunk(delta[start:], supervised=True)]
        return [c for c in chunks if c.text]

    def render_prompt(self, conv: Conversation, tokenizer: Any) -> list[Chunk]:
        conv.validate(prompt=True)
        return [Chunk(self._render_text(tokenizer, self._messages(conv, conv.turns), generation=True))]

    def stop_token_ids(self, tokenizer: Any) -> list[list[int]]:
        return [[tokenizer.eos_token_id]] if tokenizer.eos_token_id is not None else []


TEMPLATES: dict[str, type[Template]] = {
    t.name: t
    for t in (
        CaptionTemplate,
        Vicuna0Template,
        Vicuna0HeadTemplate,
        Llama2Template,
        ChatMLTemplate,
        HFChatTemplate,
        Blip2Template,
    )
}


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]()
    except KeyError:
        raise ValueError(f"unknown template {name!r}; available: {', '.join(sorted(TEMPLATES))}") from None


# ---------------------------------------------------------------------------------------------- user turns
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
