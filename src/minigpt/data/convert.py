"""Convert datasets between LLaVA JSON, MiniGPT4Qwen JSON, cc_sbu_align, caption lists and webdataset shards.

Every source is read with the readers of :mod:`minigpt.data.formats` (plus :func:`read_captions_csv`) into
:class:`Sample` s, and written back by a per-format writer, so a conversion keeps exactly what training sees: reading
the output gives the same conversations (``Turn`` roles and parts) as reading the source, except the text a caption
target does not store (below).

What each target holds, and what happens to a sample it cannot hold (skipped, counted in
:attr:`ConvertReport.skipped`, never silently changed):

- ``llava``: anything (system turn, several or no images, many turns). ``<image>`` marks each image slot.
- ``minigpt4qwen``: one image, user/assistant pairs, no system turn (``<Img><ImageHere></Img>`` marks the slot;
  one exchange is written as strings, several as lists).
- ``cc_sbu_align`` (folder with ``filter_cap.json`` + ``image/{image_id}.jpg``), ``captions_json``
  (``[{"image", "caption", "id"}]``) and ``webdataset`` (img2dataset tar shards ``00000.tar`` with ``key.jpg``,
  ``key.txt``, ``key.json``): one image and one caption, i.e. a single user/assistant exchange whose answer is
  text. The user turn's text and a system turn are not stored (cc_sbu_align's reader draws an alignment
  instruction again, the others have none): samples where that drops text other than a MiniGPT-4 alignment
  instruction are kept and counted in :attr:`ConvertReport.notes`.

Images: JSON targets store paths, written relative to ``out_image_root`` (default: the source's image root, so the
strings stay as they were; read the output with that ``--image-root``). cc_sbu_align gets hard links to the source
images (copies across file systems; a symlink would lead out of the image root, which readers refuse) or copies
(``copy_images``), named ``image/{image_id}.jpg`` whatever their format (PIL reads by
content; non-JPEG ones are counted in the notes). Webdataset shards get the image bytes unchanged with the matching
extension (jpg/png/webp; other formats are re-encoded as PNG). Images that are only bytes (a webdataset source) are
written next to a JSON output in ``{stem}_images/``. The cc_sbu_align and webdataset targets skip a sample whose
image is missing or not recognisable as an image (header only; ``minigpt data check`` decodes fully). An existing
``out`` is never overwritten (an empty folder is fine).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import re
import shutil
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..files import atomic_open, atomic_write_text
from . import formats
from .conversation import Sample, Text
from .formats import (
    ALIGNMENT_INSTRUCTIONS,
    DATASET_FORMATS,
    MINIGPT4_IMAGE,
    SampleList,
    WebDatasetReader,
    caption_sample,
    collect_samples,
    get_field,
    image_root_of,
    read_captions_json,
    read_cc_sbu_align,
    read_llava_json,
    read_minigpt4qwen_json,
    read_webdataset,
    resolve_image,
    sample_id,
)

#: Formats that can be read (``--format`` / ``--from``).
SOURCE_FORMATS: tuple[str, ...] = tuple(DATASET_FORMATS)
#: Formats that can be written (``--to``).
TARGET_FORMATS: tuple[str, ...] = tuple(n for n, f in DATASET_FORMATS.items() if f.writable)
#: Formats whose images live under a given root (``--image-root``); the others fix their own layout.
ROOTED_FORMATS: tuple[str, ...] = tuple(n for n, f in DATASET_FORMATS.items() if f.rooted)
DEFAULT_SHARD_SIZE = 10_000  # img2dataset's number_sample_per_shard
LLAVA_IMAGE = "<image>"
_PIL_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # what read_webdataset accepts
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")


# ---------------------------------------------------------------------------------------------- reading


def read_captions_csv(
    path: str | Path, image_root: str | Path | None = None, allow_outside_root: bool = False
) -> SampleList:
    """CSV with a header holding ``image`` and ``caption`` columns (``id`` optional, others ignored); origins are
    ``file:line`` (1-based line where the record starts). Image paths are relative to ``image_root`` (default: the
    file's folder)."""
    path = Path(path)
    root = image_root_of(path, image_root)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            missing = [c for c in ("image", "caption") if c not in columns]
            if missing:
                raise ValueError(
                    f"{path}: CSV needs the columns image and caption (missing: {', '.join(missing)}; "
                    f"header: {', '.join(columns) or 'none'})"
                )
            records, start = [], reader.line_num + 1
            for row in reader:
                records.append((f"{path}:{start}", row))
                start = reader.line_num + 1
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    except csv.Error as e:
        raise ValueError(f"{path}: invalid CSV: {e}") from None

    def parse(rec: dict[str, Any], _: int) -> Sample:
        if None in rec:
            raise ValueError(f"{len(rec[None])} more field(s) than the header has")
        image = resolve_image(root, get_field(rec, "image"), allow_outside_root)
        return caption_sample(image, rec.get("caption"), sample_id(rec) or None)

    return collect_samples(path, records, parse)


def open_dataset(fmt: str, path: str | Path, image_root: str | Path | None = None) -> SampleList | WebDatasetReader:
    """Read ``path`` in format ``fmt`` (one of :data:`SOURCE_FORMATS`): a JSON/JSONL/CSV file, a cc_sbu_align folder,
    or webdataset shards (a folder of ``.tar``, a shard, or a brace pattern)."""
    if fmt not in SOURCE_FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; expected one of {', '.join(SOURCE_FORMATS)}")
    if image_root is not None and fmt not in ROOTED_FORMATS:
        layout = "DATASET/image/{image_id}.jpg" if fmt == "cc_sbu_align" else "inside the shards"
        raise ValueError(f"--image-root does not apply to {fmt} (its images are {layout})")
    if fmt == "webdataset":
        return read_webdataset(str(path))
    if fmt == "cc_sbu_align":
        if not Path(path).is_dir():
            raise FileNotFoundError(f"cc_sbu_align dataset must be a folder with filter_cap.json and image/: {path}")
        return read_cc_sbu_align(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    reader: Callable[..., SampleList] = {
        "llava": read_llava_json,
        "minigpt4qwen": read_minigpt4qwen_json,
        "captions_json": read_captions_json,
        "captions_csv": read_captions_csv,
    }[fmt]
    return reader(path, image_root=image_root)


def source_image_root(fmt: str, path: str | Path, image_root: str | Path | None = None) -> Path | None:
    """The folder a source's image paths are relative to (None for webdataset, whose images are bytes)."""
    if fmt == "webdataset":
        return None
    if fmt == "cc_sbu_align":
        return Path(path)
    return image_root_of(Path(path), image_root)


@contextlib.contextmanager
def quiet_reader_warnings() -> Iterator[None]:
    """Silence the readers' per-record skip messages (callers report ``.report.skipped`` instead)."""
    logger = logging.getLogger(formats.__name__)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# ---------------------------------------------------------------------------------------------- report


@dataclass
class ConvertReport:
    """What a conversion read, wrote, skipped (reason -> count, with the first origins) and changed (notes)."""

    source: str
    source_format: str
    out: str
    target_format: str
    read: int = 0
    written: int = 0
    reader_skipped: list[tuple[str, str]] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    image_root: str | None = None  # the root the output's image paths are relative to (JSON targets)

    def skip(self, origin: str, reason: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(origin)

    def summary(self) -> str:
        lines = [
            f"read {self.read} samples from {self.source} ({self.source_format}); "
            f"wrote {self.written} to {self.out} ({self.target_format})"
        ]
        if self.reader_skipped:
            origin, reason = self.reader_skipped[0]
            lines.append(
                f"warning: {len(self.reader_skipped)} malformed record(s) skipped by the reader "
                f"(first: {origin}: {reason})"
            )
        for reason, n in self.skipped.most_common():
            lines.append(f"warning: {n} sample(s) skipped: {reason} (e.g. {', '.join(self.examples[reason])})")
        for note, n in self.notes.most_common():
            lines.append(f"note: {n} sample(s): {note}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "source_format": self.source_format,
            "out": self.out,
            "target_format": self.target_format,
            "read": self.read,
            "written": self.written,
            "reader_skipped": len(self.reader_skipped),
            "skipped": dict(self.skipped),
            "notes": dict(self.notes),
            "image_root": self.image_root,
        }


class CannotHold(ValueError):
    """The target format cannot hold this sample (it is skipped and counted)."""


# ---------------------------------------------------------------------------------------------- helpers


def _turn_text(parts: list[Any], image: str) -> str:
    return "".join(p.text if isinstance(p, Text) else image for p in parts)


def _exchange(sample: Sample, what: str) -> tuple[str, list[str]]:
    """``(caption, dropped texts)`` of a one-image single-exchange sample, else :class:`CannotHold`."""
    msgs = sample.conversation.messages()
    if len(msgs) != 2:
        raise CannotHold(f"multi-turn conversation; {what} holds one caption")
    if len(sample.images) != 1:
        raise CannotHold(f"{len(sample.images)} images; {what} holds exactly one")
    user, answer = msgs
    if answer.num_images:
        raise CannotHold(f"an image inside the answer; {what} holds one caption")
    dropped = [user.text.replace("<ImageHere>", "").strip()]
    if sample.conversation.system is not None:
        dropped.append(sample.conversation.system)
    return answer.text, [t for t in dropped if t and t not in ALIGNMENT_INSTRUCTIONS]


def _relative(path: str, root: Path) -> str:
    """``path`` relative to ``root`` (absolute when it is not below it)."""
    try:
        return Path(os.path.relpath(Path(path).absolute(), root.absolute())).as_posix()
    except ValueError:  # another drive (Windows)
        return str(Path(path).absolute())


def _image_bytes(image: Any) -> bytes:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    path = Path(image)
    if not path.is_file():
        raise CannotHold("image not found")
    return path.read_bytes()


def _sniff(data: bytes) -> tuple[str | None, tuple[int, int]]:
    """``(PIL format, size)`` from the header only; :class:`CannotHold` when PIL cannot identify it."""
    from PIL import Image as PILImage

    try:
        with PILImage.open(io.BytesIO(data)) as img:
            return img.format, img.size
    except (OSError, SyntaxError, ValueError):
        raise CannotHold("not an image PIL can identify") from None


def _name(candidate: str | None, index: int, used: set[str]) -> str:
    """A unique file-name stem: the sample's id when it is a safe file name, else its index (``_1``, ``_2``, ...
    appended on a clash)."""
    name = candidate if candidate and _SAFE_NAME.match(candidate) else str(index)
    base, k = name, 1
    while name in used:
        name, k = f"{base}_{k}", k + 1
    used.add(name)
    return name


def _check_out(out: Path) -> None:
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise FileExistsError(f"output already exists: {out} (remove it or choose another path)")


def _write_json(path: Path, records: list[Any]) -> None:
    """A JSON list (``.jsonl``: one record per line), written atomically."""
    with atomic_open(path) as f:
        if path.suffix == ".jsonl":
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        else:
            json.dump(records, f, ensure_ascii=False, indent=1)
            f.write("\n")


# ---------------------------------------------------------------------------------------------- writers


class _JsonWriter:
    """LLaVA / MiniGPT4Qwen / captions JSON: image paths relative to ``root``; bytes images go to ``{stem}_images``."""

    def __init__(self, fmt: str, out: Path, root: Path | None, report: ConvertReport) -> None:
        self.fmt, self.out, self.report = fmt, out, report
        self.root = root if root is not None else out.parent
        self.records: list[dict[str, Any]] = []
        self.names: set[str] = set()

    def _path(self, image: Any, sample: Sample, index: int) -> str:
        if isinstance(image, (str, Path)):
            return _relative(str(image), self.root)
        data = _image_bytes(image)
        fmt, _ = _sniff(data)
        folder = self.out.parent / f"{self.out.stem}_images"
        folder.mkdir(parents=True, exist_ok=True)
        stem = _name(sample.id, index, self.names)
        file = folder / f"{stem}.{_PIL_EXTENSIONS.get(fmt or '', 'img')}"
        file.write_bytes(data)
        return _relative(str(file), self.root)

    def add(self, sample: Sample, index: int) -> None:
        conv, sid = sample.conversation, sample.id
        if self.fmt == "llava":
            turns = [
                {
                    "from": {"user": "human", "assistant": "gpt", "system": "system"}[t.role],
                    "value": _turn_text(t.parts, LLAVA_IMAGE),
                }
                for t in conv.turns
            ]
            rec: dict[str, Any] = {"id": sid if sid is not None else str(index)}
            images = [self._path(img, sample, index) for img in sample.images]
            if images:
                rec["image"] = images[0] if len(images) == 1 else images
            rec["conversations"] = turns
        elif self.fmt == "minigpt4qwen":
            if conv.system is not None:
                raise CannotHold("a system turn; minigpt4qwen has none")
            if len(sample.images) != 1:
                raise CannotHold(f"{len(sample.images)} images; minigpt4qwen holds exactly one")
            msgs = conv.messages()
            questions = [_turn_text(t.parts, MINIGPT4_IMAGE) for t in msgs[0::2]]
            answers = [_turn_text(t.parts, MINIGPT4_IMAGE) for t in msgs[1::2]]
            rec = {"image": self._path(sample.images[0], sample, index)}
            if len(questions) == 1:
                rec.update(instruction=questions[0], output=answers[0])
            else:
                rec.update(instruction=questions, output=answers)
            if sid is not None:
                rec["id"] = sid
        else:  # captions_json
            caption, dropped = _exchange(sample, "captions_json")
            rec = {"image": self._path(sample.images[0], sample, index), "caption": caption}
            if sid is not None:
                rec["id"] = sid
            if dropped:
                self.report.notes["instruction/system text not stored (captions_json holds image + caption)"] += 1
        self.records.append(rec)

    def close(self) -> list[str]:
        _write_json(self.out, self.records)
        return [str(self.out)]


class _CcSbuWriter:
    """``out/filter_cap.json`` + ``out/image/{image_id}.jpg`` (hard links to the sources where the file system allows,
    else copies)."""

    def __init__(self, out: Path, copy_images: bool, report: ConvertReport) -> None:
        self.out, self.copy, self.report = out, copy_images, report
        self.annotations: list[dict[str, str]] = []
        self.names: set[str] = set()
        (out / "image").mkdir(parents=True, exist_ok=True)

    def add(self, sample: Sample, index: int) -> None:
        caption, dropped = _exchange(sample, "cc_sbu_align")
        image = sample.images[0]
        data = _image_bytes(image) if not isinstance(image, (str, Path)) else None
        if data is None:
            if not Path(image).is_file():
                raise CannotHold("image not found")
            with open(image, "rb") as f:
                fmt, _ = _sniff(f.read(1 << 16) or b"")  # a header is enough; PIL reads lazily
        else:
            fmt, _ = _sniff(data)
        image_id = _name(sample.id, index, self.names)
        target = self.out / "image" / f"{image_id}.jpg"
        if data is not None:
            target.write_bytes(data)
        elif self.copy:
            shutil.copyfile(image, target)
        else:
            try:
                os.link(Path(image).resolve(), target)
            except OSError:  # another file system, or links not allowed
                shutil.copyfile(image, target)
                self.report.notes["image copied (a hard link was not possible)"] += 1
        if fmt != "JPEG":
            self.report.notes["non-JPEG image stored as image/<id>.jpg (PIL reads it by content)"] += 1
        if dropped:
            self.report.notes["instruction/system text not stored (cc_sbu_align draws an alignment instruction)"] += 1
        self.annotations.append({"image_id": image_id, "caption": caption})

    def close(self) -> list[str]:
        path = self.out / "filter_cap.json"
        atomic_write_text(path, json.dumps({"annotations": self.annotations}, ensure_ascii=False, indent=1) + "\n")
        return [str(path), str(self.out / "image")]


class _WebDatasetWriter:
    """img2dataset layout: ``out/00000.tar`` ... holding ``{key}.jpg|png|webp``, ``{key}.txt``, ``{key}.json``.

    Keys are ``{shard:05d}{index in shard:04d}`` (wider when a shard holds more than 10,000); members are
    written with a fixed mtime, so the same input gives the same bytes."""

    def __init__(self, out: Path, shard_size: int, report: ConvertReport) -> None:
        if shard_size < 1:
            raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
        self.out, self.shard_size, self.report = out, shard_size, report
        self.width = max(4, len(str(shard_size - 1)))
        self.tar: tarfile.TarFile | None = None
        self.shard, self.in_shard = -1, shard_size
        self.files: list[str] = []
        out.mkdir(parents=True, exist_ok=True)

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self.tar.addfile(info, io.BytesIO(data))  # type: ignore[union-attr]

    def add(self, sample: Sample, index: int) -> None:
        caption, dropped = _exchange(sample, "webdataset")
        data = _image_bytes(sample.images[0])
        fmt, (width, height) = _sniff(data)
        ext = _PIL_EXTENSIONS.get(fmt or "")
        if ext is None:
            from .images import load_image

            buf = io.BytesIO()
            load_image(data).save(buf, "PNG")
            data, ext = buf.getvalue(), "png"
            self.report.notes["image re-encoded as PNG (webdataset readers take jpg/png/webp)"] += 1
        if dropped:
            self.report.notes["instruction/system text not stored (webdataset holds image + caption)"] += 1
        if self.in_shard >= self.shard_size:
            self._next_shard()
        key = f"{self.shard:05d}{self.in_shard:0{self.width}d}"
        self.in_shard += 1
        meta: dict[str, Any] = {"key": key, "caption": caption, "width": width, "height": height}
        if sample.id is not None:
            meta["id"] = sample.id
        if isinstance(sample.images[0], (str, Path)):
            meta["source"] = str(sample.images[0])
        self._member(f"{key}.{ext}", data)
        self._member(f"{key}.txt", caption.encode("utf-8"))
        self._member(f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))

    def _next_shard(self) -> None:
        if self.tar is not None:
            self.tar.close()
        self.shard, self.in_shard = self.shard + 1, 0
        path = self.out / f"{self.shard:05d}.tar"
        self.tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
        self.files.append(str(path))

    def close(self) -> list[str]:
        if self.tar is not None:
            self.tar.close()
        return self.files


# ---------------------------------------------------------------------------------------------- convert


@dataclass(frozen=True)
class ConvertOptions:
    """How :func:`convert_dataset` writes its target: ``out_image_root`` (JSON targets: the folder image paths are
    written relative to; None: the source's image root), ``copy_images`` (cc_sbu_align: copies instead of hard
    links) and ``shard_size`` (webdataset: samples per tar shard)."""

    out_image_root: str | Path | None = None
    copy_images: bool = False
    shard_size: int = DEFAULT_SHARD_SIZE


def convert_dataset(
    src: str | Path,
    source_format: str,
    out: str | Path,
    target_format: str,
    image_root: str | Path | None = None,
    options: ConvertOptions = ConvertOptions(),
    progress: bool = False,
) -> ConvertReport:
    """Convert ``src`` (``source_format``) to ``out`` (``target_format``); see the module docstring for what each
    target holds. ``out`` must not exist (or be an empty folder). Returns the :class:`ConvertReport`."""
    if target_format not in TARGET_FORMATS:
        raise ValueError(f"cannot write format {target_format!r}; expected one of {', '.join(TARGET_FORMATS)}")
    if options.out_image_root is not None and target_format not in ("llava", "minigpt4qwen", "captions_json"):
        raise ValueError(f"--out-image-root applies to JSON targets only, not {target_format}")
    out = Path(out)
    _check_out(out)
    with quiet_reader_warnings():
        return _convert(src, source_format, out, target_format, image_root, options, progress)


def _convert(
    src: str | Path,
    source_format: str,
    out: Path,
    target_format: str,
    image_root: str | Path | None,
    options: ConvertOptions,
    progress: bool,
) -> ConvertReport:
    data = open_dataset(source_format, src, image_root)
    report = ConvertReport(str(src), source_format, str(out), target_format)
    writer: Any
    if target_format in ("llava", "minigpt4qwen", "captions_json"):
        root = (
            Path(options.out_image_root)
            if options.out_image_root is not None
            else source_image_root(source_format, src, image_root)
        )
        writer = _JsonWriter(target_format, out, root, report)
        report.image_root = str(writer.root)
    elif target_format == "cc_sbu_align":
        writer = _CcSbuWriter(out, options.copy_images, report)
    else:
        writer = _WebDatasetWriter(out, options.shard_size, report)
    samples: Iterable[Sample] = data
    if progress:
        from ..console import progress_bar

        samples = progress_bar(
            samples,
            total=len(data) if isinstance(data, SampleList) else None,
            desc="convert",
            unit=" samples",
            dynamic_ncols=True,
            disable=None,
        )
    for index, sample in enumerate(samples):
        report.read += 1
        try:
            writer.add(sample, index)
        except CannotHold as e:
            report.skip(sample.origin or f"sample {index}", str(e))
            continue
        report.written += 1
    report.reader_skipped = list(data.report.skipped)
    if report.written == 0:
        for folder in (out / "image", out):  # remove the empty folders a folder target made
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise ValueError(
            f"nothing written to {out}: none of the {report.read} samples fits {target_format} "
            f"({', '.join(f'{n} x {r}' for r, n in report.skipped.most_common())})"
        )
    report.files = writer.close()
    return report
