"""Find the records of a dataset that training would skip or learn nothing from, and write a cleaned copy.

Problem kinds (:data:`PROBLEM_KINDS`), each reported with the record's origin (``file:index``, ``file:line`` or
``shard/key``, as the readers name them):

- ``malformed``: the reader skipped the record (bad JSON, missing key, wrong type, image/placeholder mismatch, ...);
- ``outside_root``: an image path that resolves outside the image root (``../``, an absolute path, a symlink leading
  out), which training skips too (:func:`~minigpt.data.formats.outside_root`);
- ``missing_image``: an image path that is not a file;
- ``corrupt_image``: a file in a format PIL recognises whose data is broken (truncated, bad checksum), found by a full
  decode with :func:`~minigpt.data.images.load_image`, as training does;
- ``undecodable_image``: a file PIL cannot identify as an image (empty, text, unsupported format);
- ``oversized_image``: more pixels than training's ``data.max_image_pixels`` allows (read from the header);
- ``empty_answer``: an assistant turn with no text (nothing to learn; the readers skip it, as training does).

A record can have several problems; it is counted once per kind. The cleaned copy keeps the good records verbatim
(the source's own JSON objects, CSV rows or tar members), in the same format and order.
"""

from __future__ import annotations

import csv
import itertools
import json
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .conversation import Sample
from .convert import _check_out, _write_json, open_dataset, quiet_reader_warnings
from .formats import WDS_KEY_RE, SampleList, WebDatasetReader, load_json
from .images import DEFAULT_MAX_PIXELS, ImageError, ImageTooLargeError, load_image

PROBLEM_KINDS: tuple[str, ...] = (
    "malformed",
    "outside_root",
    "missing_image",
    "corrupt_image",
    "undecodable_image",
    "oversized_image",
    "empty_answer",
)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Problem:
    kind: str
    origin: str
    detail: str


@dataclass
class CheckReport:
    """The outcome of :func:`check_dataset`: ``good`` holds the origins of the records without a problem."""

    source: str
    format: str
    image_root: str | None = None
    shards: list[str] = field(default_factory=list)  # webdataset: the shards read
    records: int = 0  # records seen (good + with problems, malformed included)
    good: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems

    @property
    def bad_records(self) -> int:
        return self.records - len(self.good)

    def counts(self) -> dict[str, int]:
        """Records per problem kind (all kinds, zeros included)."""
        per_kind = Counter(kind for kind, _ in {(p.kind, p.origin) for p in self.problems})
        return {kind: per_kind.get(kind, 0) for kind in PROBLEM_KINDS}

    def examples(self, kind: str, n: int = 5) -> list[Problem]:
        return [p for p in self.problems if p.kind == kind][:n]

    def summary(self, n_examples: int = 5) -> str:
        lines = [
            f"{self.source} ({self.format}): {self.records} records, {len(self.good)} good, "
            f"{self.bad_records} with problems"
        ]
        for kind, n in self.counts().items():
            lines.append(f"  {kind:<18} {n}")
            for p in self.examples(kind, n_examples):
                lines.append(f"      {p.origin}: {p.detail}")
            if n > n_examples:
                lines.append(f"      ... and {n - n_examples} more")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "format": self.format,
            "records": self.records,
            "good": len(self.good),
            "counts": self.counts(),
            "problems": [vars(p) for p in self.problems],
        }


def _bounded_map(fn: Callable[[T], R], items: Iterable[T], workers: int, window: int = 256) -> Iterator[R]:
    """``map`` in order over ``workers`` threads, holding at most ``window`` items per worker in flight (so a
    stream of samples with their image bytes is not read into memory at once)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    it = iter(items)
    with ThreadPoolExecutor(workers) as pool:
        while block := list(itertools.islice(it, window * workers)):
            yield from pool.map(fn, block)


def _image_problem(image: Any, origin: str, max_pixels: int | None) -> Problem | None:
    if isinstance(image, (str, Path)) and not Path(image).is_file():
        what = "is not a file" if Path(image).exists() else "not found"
        return Problem("missing_image", origin, f"{image} {what}")
    try:
        load_image(image, max_pixels=max_pixels)
    except ImageTooLargeError as e:
        return Problem("oversized_image", origin, str(e))
    except ImageError as e:
        from PIL import UnidentifiedImageError

        kind = "undecodable_image" if isinstance(e.__cause__, UnidentifiedImageError) else "corrupt_image"
        return Problem(kind, origin, str(e))
    return None


def sample_problems(sample: Sample, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> list[Problem]:
    """The problems of one sample that the reader accepted (images decoded fully, up to ``max_pixels``)."""
    origin = sample.origin or f"sample {sample.id}"
    return [p for image in sample.images if (p := _image_problem(image, origin, max_pixels)) is not None]


def check_dataset(
    fmt: str,
    path: str | Path,
    image_root: str | Path | None = None,
    workers: int = 4,
    progress: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> CheckReport:
    """Read ``path`` in format ``fmt`` (see :data:`~minigpt.data.convert.SOURCE_FORMATS`) and check every record.

    ``workers`` threads decode images (PIL releases the GIL while decoding); images over ``max_pixels`` are
    reported without being decoded."""
    with quiet_reader_warnings():
        return _check(fmt, path, image_root, workers, progress, max_pixels)


def _check(
    fmt: str, path: str | Path, image_root: str | Path | None, workers: int, progress: bool, max_pixels: int | None
) -> CheckReport:
    data = open_dataset(fmt, path, image_root)
    report = CheckReport(str(path), fmt, None if image_root is None else str(image_root))
    if isinstance(data, WebDatasetReader):
        report.shards = list(data.shards)
    samples: Iterable[Sample] = data
    if progress:
        from ..console import progress_bar

        samples = progress_bar(
            samples,
            total=len(data) if isinstance(data, SampleList) else None,
            desc="check",
            unit=" samples",
            dynamic_ncols=True,
            disable=None,
        )
    for sample, problems in _bounded_map(lambda s: (s, sample_problems(s, max_pixels)), samples, workers):
        report.records += 1
        if problems:
            report.problems += problems
        else:
            report.good.append(sample.origin)
    skipped = [
        Problem(data.report.kinds.get(origin, "malformed"), origin, reason) for origin, reason in data.report.skipped
    ]
    report.records += len(skipped)
    report.problems = skipped + report.problems
    return report


# ---------------------------------------------------------------------------------------------- cleaned copy


def write_clean(report: CheckReport, out: str | Path) -> int:
    """Write the good records of a checked dataset to ``out`` in its format; returns how many.

    JSON formats: a JSON list (``.jsonl`` suffix: one record per line) of the source's records. captions_csv: the
    source's rows under its header. cc_sbu_align: ``out`` ending in ``.json`` is just the annotations file, else a
    folder with ``filter_cap.json`` and ``image`` linked to the source's image folder. webdataset: a folder with one
    shard per source shard (same names) holding the good samples' members. ``out`` must not exist (or be an empty
    folder). Image paths are copied as they are: read a JSON copy with the source's image root."""
    out, good = Path(out), set(report.good)
    _check_out(out)
    if report.format in ("llava", "minigpt4qwen", "captions_json"):
        src = Path(report.source)
        if src.suffix == ".jsonl":
            with open(src, encoding="utf-8-sig") as f:  # numbered as the reader numbers lines
                records = [json.loads(line) for n, line in enumerate(f, 1) if f"{src}:{n}" in good]
        else:
            records = [rec for i, rec in enumerate(load_json(src)) if f"{src}:{i}" in good]
        _write_json(out, records)
        return len(records)
    if report.format == "captions_csv":
        return _clean_csv(Path(report.source), out, good)
    if report.format == "cc_sbu_align":
        root = Path(report.source)
        path = root / "filter_cap.json"
        data = load_json(path)
        data["annotations"] = [rec for i, rec in enumerate(data["annotations"]) if f"{path}:{i}" in good]
        file = out if out.suffix == ".json" else out / "filter_cap.json"
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        if out.suffix != ".json":
            (out / "image").symlink_to((root / "image").resolve(), target_is_directory=True)
        return len(data["annotations"])
    if report.format == "webdataset":
        return _clean_shards(report.shards, out, good)
    raise ValueError(f"cannot write a cleaned copy of format {report.format!r}")


def _clean_csv(src: Path, out: Path, good: set[str]) -> int:
    with open(src, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows, start = [], reader.line_num + 1
        for row in reader:
            if f"{src}:{start}" in good:
                rows.append(row)
            start = reader.line_num + 1
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return len(rows)


def _clean_shards(shards: list[str], out: Path, good: set[str]) -> int:
    out.mkdir(parents=True, exist_ok=True)
    kept = 0
    for shard in shards:
        keys = {origin[len(shard) + 1 :] for origin in good if origin.startswith(shard + "/")}
        if not keys:
            continue
        name = Path(shard).name
        for suffix, plain in ((".tar.gz", ".tar"), (".tgz", ".tar")):
            name = name[: -len(suffix)] + plain if name.endswith(suffix) else name
        with tarfile.open(shard, "r|*") as src, tarfile.open(out / name, "w") as dst:
            for member in src:
                match = WDS_KEY_RE.match(member.name) if member.isfile() else None
                if match is not None and match[1] in keys:
                    dst.addfile(member, src.extractfile(member))
        kept += len(keys)
    return kept
