"""The one internal representation of text: a conversation of turns made of text and image parts.

Every source (dataset readers, chat session, web UI, server, eval) builds a :class:`Conversation`;
templates render it, nothing else builds prompts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")

#: Placeholders recognised in raw text (MiniGPT-4, MiniGPT4Qwen and LLaVA spellings), longest first.
IMAGE_PLACEHOLDERS: tuple[str, ...] = ("<Img><ImageHere></Img>", "<ImageHere>", "<image>")
_PLACEHOLDER_RE = re.compile("|".join(re.escape(p) for p in IMAGE_PLACEHOLDERS))


@dataclass(frozen=True)
class Text:
    """Verbatim text: templates concatenate parts exactly, without adding separators."""

    text: str


@dataclass(frozen=True)
class Image:
    """The slot of the next image of the sample (images are matched to slots in order)."""


Part = Union[Text, Image]


@dataclass
class Turn:
    role: Role
    parts: list[Part]

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; expected one of {', '.join(ROLES)}")
        if isinstance(self.parts, str):
            self.parts = parse_content(self.parts)

    @property
    def text(self) -> str:
        """The turn's text with images shown as ``<ImageHere>`` (for display and search)."""
        return "".join(p.text if isinstance(p, Text) else "<ImageHere>" for p in self.parts)

    @property
    def num_images(self) -> int:
        return sum(isinstance(p, Image) for p in self.parts)


@dataclass
class Conversation:
    turns: list[Turn] = field(default_factory=list)

    def add(self, role: Role, content: str | list[Part]) -> Conversation:
        self.turns.append(Turn(role, parse_content(content) if isinstance(content, str) else list(content)))
        return self

    @property
    def num_images(self) -> int:
        return sum(t.num_images for t in self.turns)

    @property
    def system(self) -> str | None:
        return self.turns[0].text if self.turns and self.turns[0].role == "system" else None

    def with_system(self, prompt: str | None) -> Conversation:
        """This conversation with ``prompt`` as its system turn where it has none (itself when ``prompt`` is None)."""
        if prompt is None or self.system is not None:
            return self
        return Conversation([Turn("system", [Text(prompt)] if prompt else []), *self.turns])

    def messages(self) -> list[Turn]:
        """Turns without the system turn."""
        return [t for t in self.turns if t.role != "system"]

    def validate(self, prompt: bool = False) -> list[Turn]:
        """Check the turn order: optional system, then user/assistant alternating, starting with user (and, for a
        generation ``prompt``, ending with user); the turns without the system turn."""
        msgs = self.messages()
        if any(t.role == "system" for t in self.turns[1:]):
            raise ValueError("a system turn may only come first")
        if not msgs:
            raise ValueError("conversation has no user turn")
        for i, turn in enumerate(msgs):
            expected = "user" if i % 2 == 0 else "assistant"
            if turn.role != expected:
                raise ValueError(f"turn {i + 1} is {turn.role!r}, expected {expected!r} (user and assistant alternate)")
        if prompt and msgs[-1].role != "user":
            raise ValueError("a generation prompt must end with a user turn")
        return msgs

    @classmethod
    def single(cls, question: str, answer: str | None = None, system: str | None = None) -> Conversation:
        """One exchange: ``Conversation.single("<image> What is this?", "A cat.")``."""
        conv = cls()
        if system is not None:
            conv.add("system", system)
        conv.add("user", question)
        if answer is not None:
            conv.add("assistant", answer)
        return conv

    @classmethod
    def from_messages(cls, messages: list[dict[str, Any]]) -> Conversation:
        """From ``[{"role": ..., "content": str}]`` (OpenAI/HF style, text content)."""
        conv = cls()
        for i, m in enumerate(messages):
            if "role" not in m or "content" not in m:
                raise ValueError(f"message {i} needs 'role' and 'content', got keys {sorted(m)}")
            conv.add(m["role"], m["content"])
        return conv


def parse_content(text: str) -> list[Part]:
    """Split raw text at image placeholders into parts, keeping the text between them verbatim."""
    parts: list[Part] = []
    pos = 0
    for match in _PLACEHOLDER_RE.finditer(text):
        if match.start() > pos:
            parts.append(Text(text[pos : match.start()]))
        parts.append(Image())
        pos = match.end()
    if pos < len(text):
        parts.append(Text(text[pos:]))
    return parts


ImageLike = Union[str, Path, Any]  # a path, a PIL image, a numpy array or a CHW tensor


@dataclass
class Sample:
    """A conversation with its images, as every dataset reader produces it."""

    conversation: Conversation
    images: list[ImageLike] = field(default_factory=list)
    id: str | None = None
    origin: str | None = None  # "file:line" or "shard/key", used in warnings and errors

    def check(self) -> None:
        """Raise a clear error when the images do not match the image slots."""
        slots, n = self.conversation.num_images, len(self.images)
        where = f" ({self.origin})" if self.origin else ""
        if n > slots:
            if slots == 0:
                raise ValueError(
                    f"sample{where} has {n} image(s) but its text has no image placeholder "
                    f"(write one of {', '.join(IMAGE_PLACEHOLDERS)} where the image goes)"
                )
            raise ValueError(f"sample{where} has {n} images but only {slots} image placeholder(s): too many images")
        if n < slots:
            raise ValueError(f"sample{where} has {slots} image placeholder(s) but only {n} image(s)")
