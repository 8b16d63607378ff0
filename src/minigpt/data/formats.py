"""Dataset readers: parse files into :class:`Sample` s (a conversation and its image references).

Readers know nothing of prompts or tokens, and do not open images (paths only; webdataset samples carry the
encoded bytes). A malformed record is skipped, logged as a warning naming its origin (logger
``minigpt.data.formats``) and counted in the reader's :class:`ReadReport`; a file without any valid record, or that is
not valid JSON, raises ``ValueError``.
Origins are ``"file:index"`` (0-based position in a JSON list), ``"file:line"`` (1-based, JSONL) or ``"shard/key"``.

Image paths are relative to the dataset's image root. One rule for every reader: a path that resolves outside the
root, by ``..`` (``../x.jpg``, ``a/../../x``), as an absolute path, or through a symlink that leads out of it, is
skipped as an :class:`OutsideRootError` unless the reader is given ``allow_outside_root=True``: a dataset file must not
make training (or ``data check``) read arbitrary files. The root itself may be a symlink (it is resolved first).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import os
import random
import re
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from braceexpand import braceexpand  # installed with webdataset

from .conversation import Conversation, Image, Sample, Text, Turn, parse_content

#: MiniGPT-4 ``prompts/alignment.txt`` instructions (stage 2, cc_sbu_align).
ALIGNMENT_INSTRUCTIONS: tuple[str, ...] = (
    "Describe this image in detail.",
    "Take a look at this image and describe what you notice.",
    "Please provide a detailed description of the picture.",
    "Could you describe the contents of this image for me?",
)
#: MiniGPT-4's image slot spelling, put before an instruction that has no placeholder.
MINIGPT4_IMAGE = "<Img><ImageHere></Img>"
LLAVA_ROLES: dict[str, str] = {"human": "user", "gpt": "assistant", "system": "system"}
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
MAX_WARNINGS = 10  # per report; the rest are summarised in one warning

log = logging.getLogger(__name__)


class RecordProblem(ValueError):
    """A record skipped for a reason of its own kind (``data check`` reports it under :attr:`kind`)."""

    kind = "malformed"


class OutsideRootError(RecordProblem):
    """An image path that resolves outside the dataset's image root, which the dataset did not allow."""

    kind = "outside_root"


class EmptyAnswerError(RecordProblem):
    """An assistant turn without text: nothing to learn from it."""

    kind = "empty_answer"


@dataclass
class ReadReport:
    """What a reader kept and skipped; ``skipped`` holds ``(origin, reason)`` pairs, ``kinds`` the
    :attr:`RecordProblem.kind` of those skipped for such a problem; ``logged``: the origins already logged (shared
    by the passes of a stream, so that a record is logged once, not every epoch)."""

    source: str
    read: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    kinds: dict[str, str] = field(default_factory=dict)
    logged: set[str] = field(default_factory=set)

    def skip(self, origin: str, reason: str, kind: str | None = None) -> None:
        self.skipped.append((origin, reason))
        if kind is not None:
            self.kinds[origin] = kind
        if len(self.skipped) <= MAX_WARNINGS and origin not in self.logged:
            self.logged.add(origin)
            log.warning("skipped %s: %s", origin, reason)

    def finish(self) -> None:
        """Summarise the warnings not shown, and fail when nothing was read."""
        if len(self.skipped) > MAX_WARNINGS:
            log.warning(
                "%s: %d more records skipped (see ReadReport.skipped)", self.source, len(self.skipped) - MAX_WARNINGS
            )
        if self.read == 0:
            first = f"; first: {self.skipped[0][0]}: {self.skipped[0][1]}" if self.skipped else ""
            raise ValueError(f"{self.source}: no valid record ({len(self.skipped)} skipped{first})")


@dataclass
class SampleList(Sequence[Sample]):
    """The samples of a file (a map-style dataset) and its report."""

    samples: list[Sample]
    report: ReadReport

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        return self.samples[index]


@dataclass(frozen=True)
class InvalidRecord:
    """A record that could not be parsed (kept so that readers report it by origin)."""

    reason: str


# ---------------------------------------------------------------------------------------------- JSON helpers


def load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def is_json_lines(path: Path) -> bool:
    """Whether ``path`` holds JSON Lines whatever its extension (POPE's ``coco_pope_random.json`` does): its first
    non-blank line is a whole JSON value and another non-blank line follows (a JSON document's first line, ``[``
    or ``{"a": [``, is never a whole value unless the document is one line)."""
    if path.suffix == ".jsonl":
        return True
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = (line for line in f if line.strip())
            first, second = next(lines, None), next(lines, None)
    except UnicodeDecodeError:
        return False
    if first is None or second is None:
        return False
    try:
        json.loads(first)
    except json.JSONDecodeError:
        return False
    return True


def read_json_any(path: Path) -> list[tuple[str, Any]] | dict[str, Any]:
    """A JSON object as is, or ``(origin, record)`` pairs for a JSON list or a JSON Lines file (detected by content,
    see :func:`is_json_lines`).

    Origins are ``file:index`` (JSON) or ``file:line`` (JSONL); a bad JSONL line becomes an
    :class:`InvalidRecord` so readers can skip it by name.
    """
    if is_json_lines(path):
        records: list[tuple[str, Any]] = []
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append((f"{path}:{lineno}", json.loads(line)))
                    except json.JSONDecodeError as e:
                        records.append(
                            (f"{path}:{lineno}", InvalidRecord(f"invalid JSON at column {e.colno}: {e.msg}"))
                        )
        return records
    data = load_json(path)
    if isinstance(data, list):
        return [(f"{path}:{i}", rec) for i, rec in enumerate(data)]
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object or list, got a JSON {type(data).__name__}")
    return data


def json_records(path: Path) -> list[tuple[str, Any]]:
    """``(origin, record)`` pairs of a JSON list or a JSONL file (see :func:`read_json_any`)."""
    data = read_json_any(path)
    if isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON list of records, got a JSON object")
    return data


def record_object(rec: Any, error: type[Exception] = ValueError) -> dict[str, Any]:
    """``rec`` if it is a JSON object; else ``error`` saying what it is (or why it could not be parsed)."""
    if isinstance(rec, InvalidRecord):
        raise error(rec.reason)
    if not isinstance(rec, dict):
        raise error(f"record is a JSON {type(rec).__name__}, not an object")
    return rec


def collect_samples(
    source: Path, records: Iterable[tuple[str, Any]], parse: Callable[[Any, int], Sample]
) -> SampleList:
    report, samples = ReadReport(str(source)), []
    for index, (origin, rec) in enumerate(records):
        try:
            sample = parse(record_object(rec), index)
            sample.check()
            check_answers(sample.conversation)
        except ValueError as e:
            report.skip(origin, str(e), e.kind if isinstance(e, RecordProblem) else None)
            continue
        sample.origin = origin
        samples.append(sample)
    report.read = len(samples)
    report.finish()
    return SampleList(samples, report)


def get_field(rec: Mapping[str, Any], key: str, kind: type | tuple[type, ...] = str) -> Any:
    if key not in rec:
        raise ValueError(f"missing key {key!r}")
    value = rec[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"{key!r} must be {names}, got {type(value).__name__}")
    return value


def resolve_image(root: Path, value: Any, allow_outside_root: bool = False) -> str:
    """``root / value``; :class:`OutsideRootError` when it resolves outside ``root`` (:func:`outside_root`), unless
    allowed."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"image must be a non-empty string, got {value!r}")
    if not allow_outside_root:
        how = outside_root(root, value)
        if how:
            raise OutsideRootError(
                f"image path {value!r} {how} the image root {root} "
                "(set allow_outside_root: true on the dataset to read it)"
            )
    return str(root / value)


def outside_root(root: str | Path, value: str) -> str | None:
    """How the image path ``value`` (relative to ``root``, or absolute) leaves ``root``: ``"leaves"`` (``..``),
    ``"is absolute, outside"``, ``"is a symlink out of"``; None when it resolves inside. A missing file is judged by
    its path (the reader does not open images)."""
    real_root = _real_dir(os.path.abspath(root))
    joined = os.path.join(real_root, value)  # an absolute value replaces the root
    if _is_under(_real_path(joined), real_root):  # resolved as the OS does (a symlink, then ``..``)
        return None
    if os.path.isabs(value):
        return "is absolute, outside"
    return "leaves" if not _is_under(os.path.normpath(joined), real_root) else "is a symlink out of"


def _is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


@functools.lru_cache(maxsize=4096)
def _real_dir(path: str) -> str:
    return os.path.realpath(path)


def _real_path(path: str) -> str:
    """``os.path.realpath`` with the folders cached (one ``lstat`` per image, not one per path component)."""
    folder, name = os.path.split(path)
    real = os.path.join(_real_dir(folder), name)
    return os.path.realpath(real) if os.path.islink(real) else real


def sample_id(rec: Mapping[str, Any]) -> str | None:
    """A dataset record's ``id`` as the sample's id (None without one)."""
    return None if rec.get("id") is None else str(rec["id"])


def check_answers(conv: Conversation) -> None:
    """:class:`EmptyAnswerError` for the first assistant turn without text (it would train on nothing)."""
    for i, turn in enumerate(conv.turns):
        if turn.role == "assistant" and not turn.num_images and not turn.text.strip():
            raise EmptyAnswerError(f"turn {i + 1} (assistant) is empty")


def _check_turns(conv: Conversation) -> None:
    conv.validate()
    if conv.turns[-1].role != "assistant":
        raise ValueError("the conversation ends with a user turn (no answer to learn)")


_BLIP_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")


def pre_caption(caption: str, max_words: int = 50) -> str:
    """MiniGPT-4's (and LAVIS's) ``blip_caption`` text processor, as its ``pre_caption``: lowercase, each of
    ``.!"()*#:;~`` -> a space, runs of whitespace -> one space, trailing newline and outer spaces stripped, then the
    first ``max_words`` words (split on spaces)."""
    caption = re.sub(r"\s{2,}", " ", _BLIP_PUNCTUATION.sub(" ", caption.lower()))
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def caption_sample(image: Any, caption: Any, id: str | None, blip_caption: int | None = None) -> Sample:
    """The sample "image -> caption"; with ``blip_caption`` (max words) the caption goes through :func:`pre_caption`
    first."""
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a non-empty string, got {caption!r}")
    if blip_caption is not None:
        caption = pre_caption(caption, blip_caption)
    if not caption.strip():
        raise EmptyAnswerError(f"caption must be a non-empty string, got {caption!r}")
    conv = Conversation([Turn("user", [Image()]), Turn("assistant", [Text(caption)])])
    return Sample(conv, [image], id=id)


def image_root_of(path: Path, image_root: str | Path | None) -> Path:
    return Path(image_root) if image_root is not None else path.parent


# ---------------------------------------------------------------------------------------------- readers


def read_llava_json(
    path: str | Path, image_root: str | Path | None = None, allow_outside_root: bool = False
) -> SampleList:
    """LLaVA JSON/JSONL: ``{"id", "image"?: str | [str], "conversations": [{"from": "human"|"gpt"|"system",
    "value"}]}``; ``<image>`` marks the image slot. Image paths are relative to ``image_root`` (default: the file's
    folder) and stay under it unless ``allow_outside_root``."""
    path = Path(path)
    root = image_root_of(path, image_root)

    def parse(rec: dict[str, Any], _: int) -> Sample:
        conv = Conversation()
        for i, turn in enumerate(get_field(rec, "conversations", list)):
            if not isinstance(turn, dict):
                raise ValueError(f"conversations[{i}] is not an object")
            role = LLAVA_ROLES.get(turn["from"]) if isinstance(turn.get("from"), str) else None
            if role is None:
                expected = ", ".join(LLAVA_ROLES)
                raise ValueError(f"conversations[{i}] has unknown role {turn.get('from')!r} (expected {expected})")
            if not isinstance(turn.get("value"), str):
                raise ValueError(f"conversations[{i}]['value'] must be a string")
            conv.add(role, turn["value"])  # type: ignore[arg-type]
        _check_turns(conv)
        images = rec.get("image")
        images = [] if images is None else [images] if isinstance(images, str) else images
        if not isinstance(images, list):
            raise ValueError(f"'image' must be a string or a list of strings, got {type(images).__name__}")
        return Sample(conv, [resolve_image(root, img, allow_outside_root) for img in images], id=sample_id(rec))

    return collect_samples(path, json_records(path), parse)


def read_minigpt4qwen_json(
    path: str | Path, image_root: str | Path | None = None, allow_outside_root: bool = False
) -> SampleList:
    """MiniGPT4Qwen JSON/JSONL: ``{"image", "instruction": str | [str], "output": str | [str]}`` (lists = turns;
    the first instruction holds ``<Img><ImageHere></Img>``)."""
    path = Path(path)
    root = image_root_of(path, image_root)

    def parse(rec: dict[str, Any], _: int) -> Sample:
        image = resolve_image(root, get_field(rec, "image"), allow_outside_root)
        questions, answers = get_field(rec, "instruction", (str, list)), get_field(rec, "output", (str, list))
        if isinstance(questions, str) != isinstance(answers, str):
            raise ValueError("'instruction' and 'output' must both be strings or both lists")
        if isinstance(questions, str):
            questions, answers = [questions], [answers]
        if len(questions) != len(answers) or not questions:
            raise ValueError(f"{len(questions)} instruction(s) but {len(answers)} output(s)")
        if not all(isinstance(t, str) for t in questions + answers):
            raise ValueError("'instruction' and 'output' lists must hold strings")
        conv = Conversation()
        for q, a in zip(questions, answers):
            conv.add("user", q).add("assistant", a)
        return Sample(conv, [image], id=sample_id(rec))

    return collect_samples(path, json_records(path), parse)


def read_captions_json(
    path: str | Path,
    image_root: str | Path | None = None,
    allow_outside_root: bool = False,
    blip_caption: int | None = None,
) -> SampleList:
    """JSON/JSONL list of ``{"image", "caption", "id"?}``: the user turn is the image alone, the answer the caption
    (cleaned as MiniGPT-4's stage 1 does with ``blip_caption``, the max words: :func:`pre_caption`)."""
    path = Path(path)
    root = image_root_of(path, image_root)

    def parse(rec: dict[str, Any], _: int) -> Sample:
        image = resolve_image(root, get_field(rec, "image"), allow_outside_root)
        return caption_sample(image, get_field(rec, "caption"), sample_id(rec), blip_caption)

    return collect_samples(path, json_records(path), parse)


def read_cc_sbu_align(
    root: str | Path,
    instructions: Sequence[str] = ALIGNMENT_INSTRUCTIONS,
    mode: str = "instructions",
    seed: int = 0,
    allow_outside_root: bool = False,
    blip_caption: int | None = None,
) -> SampleList:
    """MiniGPT-4 stage-2 data: ``root/filter_cap.json`` (``{"annotations": [{"image_id", "caption"}]}``) and
    ``root/image/{image_id}.jpg``. Mode ``"instructions"``: the user turn is the image and an instruction chosen per
    record index from ``instructions`` with ``seed`` (``<Img><ImageHere></Img> `` is put first when the instruction
    has no placeholder); ``"captions"``: the image alone. The caption is the raw answer (as MiniGPT-4 uses
    cc_sbu_align), or with ``blip_caption`` (max words) cleaned by :func:`pre_caption`."""
    if mode not in ("instructions", "captions"):
        raise ValueError(f"mode must be 'instructions' or 'captions', got {mode!r}")
    if mode == "instructions" and not instructions:
        raise ValueError("instructions mode needs at least one instruction")
    root = Path(root)
    path = root / "filter_cap.json"
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f'{path}: expected {{"annotations": [...]}}')

    def parse(rec: dict[str, Any], index: int) -> Sample:
        image_id = str(get_field(rec, "image_id", (str, int)))
        image = resolve_image(root / "image", f"{image_id}.jpg", allow_outside_root)
        sample = caption_sample(image, get_field(rec, "caption"), image_id, blip_caption)
        if mode == "instructions":
            text = random.Random(f"{seed}:{index}").choice(instructions)
            parts = parse_content(text)
            if not any(isinstance(p, Image) for p in parts):
                parts = parse_content(f"{MINIGPT4_IMAGE} {text}")
            sample.conversation.turns[0] = Turn("user", parts)
        return sample

    return collect_samples(path, ((f"{path}:{i}", rec) for i, rec in enumerate(data["annotations"])), parse)


WDS_KEY_RE = re.compile(r"^((?:.*/)?[^./]+)\.([^/]+)$")  # webdataset: key = path up to the first dot of the name


class WebDatasetReader(torch.utils.data.IterableDataset):
    """Caption samples streamed from img2dataset-style tar shards (``key.jpg`` + ``key.json["caption"]`` and/or
    ``key.txt``; json wins, as in MiniGPT-4). Images stay encoded bytes. With DataLoader workers each worker reads
    every ``num_workers``-th shard; ``report`` covers the last pass in this process, :attr:`skipped_total` all.

    A malformed sample (no image, no caption, bad JSON, empty caption) is skipped and named ``shard/key``; a shard
    that is cut short (it lacks tar's end-of-archive blocks, or breaks off inside a member) or unreadable is
    reported once, naming the shard and the last sample read, whose members may be incomplete and which is dropped."""

    def __init__(self, urls_or_dir: str | Path | Sequence[str | Path], blip_caption: int | None = None) -> None:
        self.blip_caption = blip_caption
        items = [urls_or_dir] if isinstance(urls_or_dir, (str, Path)) else list(urls_or_dir)
        self.shards: list[str] = []
        for item in items:
            if Path(item).is_dir():
                found = sorted(str(p) for p in Path(item).iterdir() if p.name.endswith((".tar", ".tar.gz", ".tgz")))
                if not found:
                    raise ValueError(f"no .tar shards in {item}")
                self.shards += found
            else:
                self.shards += braceexpand(str(item))
        if not self.shards:
            raise ValueError("no webdataset shards given")
        for shard in self.shards:
            if not Path(shard).is_file():
                raise FileNotFoundError(f"webdataset shard not found: {shard}")
        self.report = ReadReport(", ".join(self.shards) if len(self.shards) <= 3 else f"{len(self.shards)} shards")
        self.skipped_total = 0

    def __iter__(self) -> Iterator[Sample]:
        info = torch.utils.data.get_worker_info()
        shards = self.shards if info is None else self.shards[info.id :: info.num_workers]
        self.report = ReadReport(self.report.source, logged=self.report.logged)
        for shard in shards:
            for sample in self._read_shard(shard):
                self.report.read += 1
                yield sample
        if shards:
            self.report.finish()

    def _read_shard(self, shard: str) -> Iterator[Sample]:
        key, group = None, {}
        try:
            with tarfile.open(shard, "r|*") as tar:
                for member in tar:
                    match = WDS_KEY_RE.match(member.name) if member.isfile() else None
                    if match is None:
                        continue
                    if match[1] != key:
                        if key is not None:
                            yield from self._sample(shard, key, group)
                        key, group = match[1], {}
                    group[match[2].lower()] = tar.extractfile(member).read()  # type: ignore[union-attr]
                if not tar.fileobj.read(tarfile.BLOCKSIZE):  # type: ignore[union-attr]
                    # tarfile ends quietly at a cut between (or inside) headers; a whole archive ends with two
                    # zero blocks, of which tarfile has read the first.
                    raise tarfile.ReadError("unexpected end of data: no end-of-archive blocks")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            where = f"in sample {key} (dropped)" if key else "at the start"
            self._skip(shard, f"truncated or unreadable tar {where}: {e}")
            return
        if key is not None:
            yield from self._sample(shard, key, group)

    def _sample(self, shard: str, key: str, group: dict[str, bytes]) -> Iterator[Sample]:
        origin = f"{shard}/{key}"
        try:
            image = next((group[ext] for ext in IMAGE_EXTENSIONS if ext in group), None)
            if image is None:
                raise ValueError(f"no image member ({', '.join(IMAGE_EXTENSIONS)})")
            caption = None
            if "json" in group:
                meta = json.loads(group["json"])
                caption = meta.get("caption") if isinstance(meta, dict) else None
            if caption is None and "txt" in group:
                caption = group["txt"].decode("utf-8")
            if caption is None:
                raise ValueError("no caption (key.json 'caption' or key.txt)")
            sample = caption_sample(image, caption, key, self.blip_caption)
        except ValueError as e:  # includes JSONDecodeError and UnicodeDecodeError
            self._skip(origin, str(e), e.kind if isinstance(e, RecordProblem) else None)
            return
        sample.origin = origin
        yield sample

    def _skip(self, origin: str, reason: str, kind: str | None = None) -> None:
        self.report.skip(origin, reason, kind)
        self.skipped_total += 1


def read_webdataset(
    urls_or_dir: str | Path | Sequence[str | Path], blip_caption: int | None = None
) -> WebDatasetReader:
    """Tar shards: a folder (all ``*.tar``), a path, a brace pattern ``"shards/{00000..00009}.tar"`` or a list;
    ``blip_caption`` (max words): captions cleaned by :func:`pre_caption`, as MiniGPT-4's stage 1 does."""
    return WebDatasetReader(urls_or_dir, blip_caption)


# ---------------------------------------------------------------------------------------------- dispatch and mixing


@dataclass(frozen=True)
class DatasetFormat:
    """One dataset format, as every tool knows it: its training reader (None: ``minigpt data`` reads it, training
    does not), whether ``minigpt data convert`` writes it, and whether its image paths are relative to an image
    root (the others fix their own layout)."""

    name: str
    description: str
    reader: Callable[..., SampleList | WebDatasetReader] | None
    writable: bool
    rooted: bool


#: The dataset formats, in the order the tools list them; the training config, the readers, ``minigpt data``'s
#: help and its converter are all driven by this table.
DATASET_FORMATS: dict[str, DatasetFormat] = {
    f.name: f
    for f in (
        DatasetFormat("llava", "LLaVA conversations JSON", read_llava_json, writable=True, rooted=True),
        DatasetFormat("minigpt4qwen", "MiniGPT4Qwen JSON", read_minigpt4qwen_json, writable=True, rooted=True),
        DatasetFormat("cc_sbu_align", "cc_sbu_align folder", read_cc_sbu_align, writable=True, rooted=False),
        DatasetFormat("captions_json", "[{image, caption}] JSON", read_captions_json, writable=True, rooted=True),
        DatasetFormat("captions_csv", "image,caption CSV", None, writable=False, rooted=True),
        DatasetFormat("webdataset", "img2dataset .tar shards", read_webdataset, writable=True, rooted=False),
    )
}
#: The training readers by format name.
READERS: dict[str, Callable[..., SampleList | WebDatasetReader]] = {
    name: f.reader for name, f in DATASET_FORMATS.items() if f.reader is not None
}
#: The formats a training config can name (``data.datasets[].format``).
TRAIN_FORMATS: tuple[str, ...] = tuple(READERS)


def format_names(names: Iterable[str] = DATASET_FORMATS) -> str:
    """``a, b or c``: format names for help texts."""
    names = list(names)
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else "".join(names)


def read_dataset(spec: Mapping[str, Any]) -> SampleList | WebDatasetReader:
    """Read ``{"format": name, **reader keyword arguments}`` (a ``"ratio"`` key, for :func:`read_mixture`, is
    ignored), e.g. ``{"format": "llava", "path": "llava.json", "image_root": "coco/train2017"}``."""
    kwargs = {k: v for k, v in spec.items() if k not in ("format", "ratio")}
    reader = READERS.get(spec.get("format"))  # type: ignore[arg-type]
    if reader is None:
        raise ValueError(f"unknown dataset format {spec.get('format')!r}; expected one of {', '.join(READERS)}")
    try:
        inspect.signature(reader).bind(**kwargs)
    except TypeError as e:
        accepted = ", ".join(inspect.signature(reader).parameters)
        raise ValueError(f"dataset spec for format {spec['format']!r}: {e} (accepted keys: {accepted})") from None
    return reader(**kwargs)


def _weights(ratios: Sequence[float], n: int) -> np.ndarray:
    w = np.asarray(ratios, dtype=np.float64)
    if len(w) != n or n == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"need one non-negative ratio per dataset ({n}), not all zero; got {list(ratios)}")
    return w / w.sum()


class MixedDataset(torch.utils.data.Dataset):
    """Map-style datasets mixed by ratio: index ``i`` maps to a (dataset, position) pair fixed by ``seed`` and the
    epoch (:meth:`set_epoch`). An epoch has ``length`` samples (default: the sum of the lengths); dataset ``k`` gets
    exactly its share (largest remainder), read in a seeded random order that restarts reshuffled when exhausted, so
    a small dataset with a big ratio repeats and a big one with a small ratio is subsampled. ``ratios=None`` weights
    by size."""

    def __init__(
        self,
        datasets: Sequence[Sequence[Sample]],
        ratios: Sequence[float] | None = None,
        seed: int = 0,
        length: int | None = None,
    ) -> None:
        self.datasets = list(datasets)
        sizes = [len(d) for d in self.datasets]
        if not self.datasets or min(sizes) == 0:
            raise ValueError(f"MixedDataset needs non-empty datasets, got sizes {sizes}")
        self.weights = _weights(sizes if ratios is None else ratios, len(sizes))
        self.seed, self.length = seed, sum(sizes) if length is None else length
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw the mix of ``epoch`` (a different subsample / repetition order per epoch, same for all ranks)."""
        rng = np.random.default_rng([self.seed, epoch])
        exact = self.weights * self.length
        counts = np.floor(exact).astype(np.int64)
        counts[np.argsort(counts - exact, kind="stable")[: self.length - counts.sum()]] += 1
        which = np.repeat(np.arange(len(self.datasets)), counts)
        rng.shuffle(which)
        position = np.empty(self.length, dtype=np.int64)
        for k, size in enumerate(len(d) for d in self.datasets):
            slots = np.flatnonzero(which == k)
            order = [rng.permutation(size) for _ in range(math.ceil(len(slots) / size))]
            position[slots] = np.concatenate(order)[: len(slots)] if order else []
        self._plan = np.stack([which, position], axis=1)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Sample:
        k, i = self._plan[index]
        return self.datasets[k][int(i)]


class MixedStream(torch.utils.data.IterableDataset):
    """Endless mix of iterable datasets (e.g. webdataset shards): each step draws a source by ratio from a
    ``random.Random`` seeded with ``seed`` (and the DataLoader worker id); an exhausted source restarts, as LAVIS's
    MultiIterLoader does for MiniGPT-4's laion + cc_sbu stage 1."""

    def __init__(self, datasets: Sequence[Iterable[Sample]], ratios: Sequence[float], seed: int = 0) -> None:
        self.datasets = list(datasets)
        self.weights = _weights(ratios, len(self.datasets)).tolist()
        self.seed = seed

    def __iter__(self) -> Iterator[Sample]:
        info = torch.utils.data.get_worker_info()
        rng = random.Random(f"{self.seed}:{0 if info is None else info.id}")
        iterators = [iter(d) for d in self.datasets]
        while True:
            k = rng.choices(range(len(self.datasets)), weights=self.weights)[0]
            try:
                yield next(iterators[k])
            except StopIteration:
                iterators[k] = iter(self.datasets[k])
                sample = next(iterators[k], None)
                if sample is None:
                    raise ValueError(f"mixed dataset {k} yields no sample") from None
                yield sample


def read_mixture(specs: Sequence[Mapping[str, Any]], seed: int = 0) -> Any:
    """Read several specs (each with an optional ``"ratio"``, default 1) and mix them: one spec gives its dataset,
    map-style ones a :class:`MixedDataset`, any streamed one a :class:`MixedStream`."""
    datasets = [read_dataset(spec) for spec in specs]
    if len(datasets) == 1:
        return datasets[0]
    ratios = [float(spec.get("ratio", 1.0)) for spec in specs]
    if all(isinstance(d, SampleList) for d in datasets):
        return MixedDataset(datasets, ratios, seed)  # type: ignore[arg-type]
    return MixedStream(datasets, ratios, seed)
