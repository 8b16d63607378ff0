"""What a ``minigpt quickstart`` task provides: its pictures and data files, the questions asked before and after
training, how an answer is scored, and the stages' settings (:class:`~.shapes.ShapesTask`,
:class:`~.digits.DigitsTask`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class Stage:
    steps: int
    batch_size: int
    lr: float
    train_vision: bool = False
    #: Whether the frozen LLM may run in bf16 here (``--precision``): shapes' stage 1 keeps float32, where bf16
    #: gradients into the ViT trained from scratch left it telling shapes apart less well (92% against 100%).
    bf16: bool = True


@dataclass(frozen=True)
class Question:
    """A question the quickstart asks about every held-out picture, and what its answer must name."""

    kind: str
    prompt: str
    names: str  # e.g. "the colour", for the results table


@dataclass
class TaskData:
    """A task's pictures: the four data files (stage 1 captions, stage 2 instructions, each with a held-out twin in
    the same format) under ``root``, and the held-out items (``.image`` relative to ``root``, ``.caption``)."""

    root: Path
    captions: Path
    captions_eval: Path
    instructions: Path
    instructions_eval: Path
    train_size: int
    items: list[Any]


class Task(Protocol):
    """What a quickstart task provides (:class:`~.shapes.ShapesTask`, :class:`~.digits.DigitsTask`)."""

    name: str
    questions: tuple[Question, ...]
    grid_question: str  # the kind whose answers the picture grid shows
    stage1: Stage  # with SmolLM2 (frozen)
    stage2: Stage
    train_size: int
    test_size: int

    def make_data(self, out: Path, train_size: int, test_size: int, seed: int) -> TaskData: ...

    def correct(self, kind: str, answer: str, item: Any) -> bool: ...

    def words(self) -> list[str]: ...

    def results(self, answers: dict[str, dict[str, list[str]]], items: list[Any], out: Path) -> dict[str, Any]: ...
