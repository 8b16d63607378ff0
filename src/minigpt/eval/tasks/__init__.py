"""Eval tasks: one module per task (caption, vqa, mcq, pope), each with its readers, prompt and scoring.

A module of this package that defines ``TASK`` (a :class:`~minigpt.eval.tasks.base.Task`) is a task: adding a task
means adding one file. :func:`load_task` reads an eval set into :class:`EvalRecord` s; the task's ``score`` turns
predictions into metrics. Several ``data`` files are concatenated, their ids prefixed with the file name.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Sequence
from pathlib import Path

from .base import EvalRecord, ReadOptions, Scores, Task, TaskData, build_prompt, load_any

__all__ = [
    "REGISTRY",
    "TASKS",
    "EvalRecord",
    "Scores",
    "Task",
    "TaskData",
    "apply_limit",
    "build_prompt",
    "get_task",
    "load_task",
]


def _discover() -> dict[str, Task]:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        task = getattr(importlib.import_module(f"{__name__}.{info.name}"), "TASK", None)
        if isinstance(task, Task):
            found[task.name] = task
    return found


#: Task name -> task, for every module of this package that defines ``TASK``.
REGISTRY: dict[str, Task] = _discover()
TASKS: tuple[str, ...] = tuple(sorted(REGISTRY))


def get_task(name: str) -> Task:
    """The task called ``name``; ``ValueError`` naming the tasks when there is none."""
    if name not in REGISTRY:
        raise ValueError(f"unknown task {name!r}; tasks are {', '.join(TASKS)}")
    return REGISTRY[name]


def load_task(
    task: str,
    data: str | Path | Sequence[str | Path],
    images: str | Path | None = None,
    *,
    annotations: str | Path | None = None,
    split: str | None = None,
    prompt: str | None = None,
    circular: bool = False,
) -> TaskData:
    """Read an eval set. ``images``: folder the image paths are relative to (default: each data file's folder).
    ``prompt``: replaces the task's instruction (caption: the whole prompt). ``split``: Karpathy/ScienceQA split
    (default ``test``; ``all`` keeps every split). ``circular``: MMBench CircularEval rotations (mcq).
    ``annotations``: the VQAv2 annotations file (vqa)."""
    t = get_task(task)
    paths = [Path(p) for p in ([data] if isinstance(data, (str, Path)) else data)]
    if not paths:
        raise ValueError("no data file given")
    for p in [*paths, *([Path(annotations)] if annotations else [])]:
        if not p.is_file():
            raise FileNotFoundError(f"data file not found: {p}")
    options = ReadOptions(
        t.prompt if prompt is None else prompt,
        Path(images) if images is not None else None,
        split,
        circular,
        Path(annotations) if annotations else None,
    )
    return t.read([(p, load_any(p)) for p in paths], options)


def apply_limit(records: Sequence[EvalRecord], limit: int | None) -> list[EvalRecord]:
    """The records of the first ``limit`` questions (all rotations of a circular question count as one)."""
    if limit is None:
        return list(records)
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    keep: set[str] = set()
    for r in records:
        if len(keep) >= limit:
            break
        keep.add(r.group)
    return [r for r in records if r.group in keep]
