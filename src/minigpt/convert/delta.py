"""Working weights from a base model and a published delta (Vicuna v0/v1.1: LLaMA + ``vicuna-*-delta-*``).

``target = base + delta`` tensor by tensor, as FastChat's ``fastchat.model.apply_delta`` does, but one output
shard at a time: tensors are read lazily (safetensors ``safe_open``, or torch ``.bin`` shards memory-mapped with
``weights_only=True``), summed, collected into an output shard of at most ``max_shard_size`` and written before
the next one starts. Peak memory is therefore about one output shard plus one tensor pair, whatever the model
size (FastChat's default path holds base, delta and target at once, ~60 GB for 13B; its ``--low-cpu-mem`` path
first re-splits the base into small files on disk).

Vocabulary: Vicuna v0 deltas have 32001 rows in ``embed_tokens`` / ``lm_head`` (FastChat added a pad token),
LLaMA 32000. As FastChat does (``param[:base_rows, :base_cols] += base``), the rows of the added tokens are the
delta's own values; the report says so and names the tokens. Any other shape difference (another model size, a
delta for another base) is an error listing the tensors. The delta's config and tokenizer are copied (they
describe the working model), written next to safetensors shards and ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..files import atomic_directory, save_safetensors
from .lavis import ConversionReport

log = logging.getLogger(__name__)

__all__ = ["ShardedWeights", "DeltaResult", "apply_delta", "parse_size"]

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
#: Files of the delta folder that describe the working model and are copied as they are.
COPY_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
#: Buffers older transformers saved with LLaMA weights (recomputed today); dropped from base and delta.
DROPPED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """``"2GB"`` -> 2_000_000_000 (decimal units as transformers; KiB/MiB/GiB binary); ints pass through."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if m is None or m[2] not in _UNITS:
        raise ValueError(f"size {size!r}: use e.g. 2GB, 500MB or 4GiB")
    value = int(float(m[1]) * _UNITS[m[2]])
    if value <= 0:
        raise ValueError(f"size {size!r} must be positive")
    return value


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


class ShardedWeights:
    """The weights of a transformers folder (safetensors or torch ``.bin`` shards), indexed by name from the
    file headers and read one tensor at a time with :meth:`get` (nothing else is kept in memory)."""

    def __init__(self, directory: str | Path, role: str = "model") -> None:
        self.directory, self.role = Path(directory), role
        if not self.directory.is_dir():
            raise FileNotFoundError(f"--{role} {directory}: no such folder")
        self.files, self.format = self._find_files()
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            for name, shape, dtype in self._scan(file):
                self.tensors[name] = TensorInfo(tuple(shape), dtype, file)

    def _find_files(self) -> tuple[list[Path], str]:
        d = self.directory
        for index, fmt, pattern in ((SAFE_INDEX, "safetensors", "*.safetensors"), (BIN_INDEX, "bin", "*.bin")):
            if (d / index).is_file():
                weight_map = json.loads((d / index).read_text())["weight_map"]
                files = [d / f for f in dict.fromkeys(weight_map.values())]
                missing = [f.name for f in files if not f.is_file()]
                if missing:
                    raise FileNotFoundError(f"--{self.role} {d}: {index} lists missing file(s) {', '.join(missing)}")
                return files, fmt
            files = sorted(p for p in d.glob(pattern) if p.is_file())
            if files:
                return files, fmt
        if list(d.glob("consolidated.*.pth")) or (d / "params.json").is_file():
            raise ValueError(
                f"--{self.role} {d}: this is an original Meta LLaMA checkpoint (consolidated.*.pth); convert it to "
                "the transformers format first (transformers' models/llama/convert_llama_weights_to_hf.py)"
            )
        raise FileNotFoundError(f"--{self.role} {d}: no weights (*.safetensors or pytorch_model*.bin) in it")

    def _scan(self, file: Path) -> Iterator[tuple[str, list[int], torch.dtype]]:
        if file.suffix == ".safetensors":
            with safe_open(file, "pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    dtype = sl.get_dtype()
                    if dtype not in SAFETENSORS_DTYPES:
                        raise ValueError(f"{file}: tensor {name} has unsupported dtype {dtype}")
                    yield name, sl.get_shape(), SAFETENSORS_DTYPES[dtype]
        else:
            state = self._load_bin(file)
            for name, value in state.items():
                yield name, list(value.shape), value.dtype

    def _load_bin(self, file: Path) -> dict[str, torch.Tensor]:
        from ..files import refuse_unsafe_pickle
        from ..safe_load import unwrap

        with refuse_unsafe_pickle(file):
            try:
                obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:  # the legacy (pre torch 1.6) format cannot be memory-mapped
                if "mmap" not in str(err):
                    raise
                log.warning("%s cannot be memory-mapped (old torch format): it is read whole", file.name)
                obj = torch.load(file, map_location="cpu", weights_only=True)
        return unwrap(obj, str(file))

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (safetensors: just its bytes; .bin: a view of the memory-mapped file)."""
        info = self.tensors[name]
        if info.file.suffix == ".safetensors":
            with safe_open(info.file, "pt") as f:
                return f.get_tensor(name)
        # Mapped anew for each tensor (only its pickle is parsed): the other tensors of the file are not kept,
        # and the mapping goes with the returned tensor, so resident file pages stay at one tensor too.
        return self._load_bin(info.file)[name]

    def config(self) -> dict[str, Any] | None:
        path = self.directory / "config.json"
        return json.loads(path.read_text()) if path.is_file() else None


@dataclass
class DeltaResult:
    directory: Path
    shards: list[str]
    tensors: int
    total_bytes: int
    #: (base rows, delta rows) of the embedding-like tensors when the delta adds tokens, else None.
    vocab: tuple[int, int] | None = None
    added_tokens: list[str] = field(default_factory=list)
    report: ConversionReport = field(default_factory=ConversionReport)


def _check(base: ShardedWeights, delta: ShardedWeights) -> tuple[list[str], dict[str, tuple[int, int]], list[str]]:
    """Tensor names to write (delta order), the tensors whose rows grow (name -> (base, delta) rows) and the
    dropped buffer names; raises one ValueError describing every mismatch."""
    dropped = sorted({n for n in base.names() + delta.names() if DROPPED.search(n)})
    names = [n for n in delta.names() if not DROPPED.search(n)]
    base_names = {n for n in base.names() if not DROPPED.search(n)}
    only_delta, only_base = sorted(set(names) - base_names), sorted(base_names - set(names))
    problems = []
    if only_delta:
        problems.append(f"{len(only_delta)} tensor(s) of the delta are not in the base: {', '.join(only_delta[:5])}")
    if only_base:
        problems.append(f"{len(only_base)} tensor(s) of the base are not in the delta: {', '.join(only_base[:5])}")
    grown: dict[str, tuple[int, int]] = {}
    shapes = []
    for name in names:
        if name not in base_names:
            continue
        b, d = base.tensors[name].shape, delta.tensors[name].shape
        if b == d:
            continue
        if len(b) == len(d) >= 1 and b[1:] == d[1:] and d[0] > b[0]:
            grown[name] = (b[0], d[0])
        elif len(b) == len(d) >= 1 and b[1:] == d[1:]:
            shapes.append(
                f"{name}: the delta has fewer rows ({d[0]}) than the base ({b[0]}), so it was made for another base"
            )
        else:
            shapes.append(f"{name}: base {list(b)}, delta {list(d)}")
    if shapes:
        problems.append(f"{len(shapes)} tensor(s) differ in shape: " + "; ".join(shapes[:5]))
    if len(set(grown.values())) > 1:
        problems.append(
            "the added rows differ between tensors: " + "; ".join(f"{n}: {b} -> {d}" for n, (b, d) in grown.items())
        )
    if problems:
        hint = (
            "--base must be the original LLaMA of the same size as the delta (e.g. LLaMA-7B for "
            "vicuna-7b-delta-v0) in the transformers format, and --delta the delta itself"
        )
        raise ValueError("the base and the delta do not match:\n  " + "\n  ".join(problems) + f"\n{hint}")
    return names, grown, dropped


def _plan(names: list[str], delta: ShardedWeights, dtype: torch.dtype | None, limit: int) -> list[list[str]]:
    """Output shards (lists of names, in order), each at most ``limit`` bytes unless one tensor is larger."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        info = delta.tensors[name]
        written = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
        nbytes = info.nbytes // info.dtype.itemsize * written.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _add(base: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``delta + base`` (float sums in float32, then ``dtype``); rows beyond the base's are the delta's."""
    if not delta.dtype.is_floating_point:
        out = delta.clone()
        out[: base.shape[0]] += base.to(out.dtype)
        return out
    out = delta.to(torch.float32, copy=True)
    out[: base.shape[0]].add_(base)  # promoted to float32 element by element, no float32 copy of the base
    return out.to(dtype)


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_safetensors(tensors, path, metadata={"format": "pt"})


def _added_tokens(delta_dir: Path, start: int, stop: int) -> list[str]:
    """Names of the token ids ``start..stop-1`` from the delta's tokenizer files (best effort)."""
    found: dict[int, str] = {}
    added = delta_dir / "added_tokens.json"
    if added.is_file():
        found.update({int(i): t for t, i in json.loads(added.read_text()).items()})
    tok_json = delta_dir / "tokenizer.json"
    if tok_json.is_file():
        for entry in json.loads(tok_json.read_text()).get("added_tokens", []):
            found.setdefault(int(entry["id"]), entry["content"])
    tok_cfg = delta_dir / "tokenizer_config.json"
    if tok_cfg.is_file():
        for i, entry in json.loads(tok_cfg.read_text()).get("added_tokens_decoder", {}).items():
            found.setdefault(int(i), entry.get("content", "?"))
    return [found.get(i, f"<id {i}>") for i in range(start, stop)]


def _copy_files(
    base: Path, delta: Path, out: Path, rows: int | None, dtype: torch.dtype | None, report: ConversionReport
) -> None:
    copied = []
    for name in COPY_PATTERNS:
        if (delta / name).is_file():
            shutil.copy2(delta / name, out / name)
            copied.append(name)
    if not (out / "config.json").is_file():
        if not (base / "config.json").is_file():
            raise FileNotFoundError(f"neither --delta {delta} nor --base {base} has a config.json")
        shutil.copy2(base / "config.json", out / "config.json")
        report.notes.append("the delta has no config.json: the base's was copied")
    if not any((out / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
        for name in COPY_PATTERNS[2:]:
            if (base / name).is_file():
                shutil.copy2(base / name, out / name)
        report.notes.append(
            "the delta has no tokenizer: the base's was copied"
            + (" (it lacks the delta's added tokens: add them before use)" if rows else "")
        )
    config = json.loads((out / "config.json").read_text())
    changed = False
    if rows is not None and config.get("vocab_size") != rows:
        report.notes.append(f"config.json vocab_size {config.get('vocab_size')} -> {rows} (the delta's rows)")
        config["vocab_size"], changed = rows, True
    if dtype is not None:
        for key in ("torch_dtype", "dtype"):
            if key in config or key == "dtype":
                config[key] = str(dtype).removeprefix("torch.")
        changed = True
    if changed:
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if copied:
        report.notes.append(f"copied from the delta: {', '.join(copied)}")


def apply_delta(
    base: str | Path,
    delta: str | Path,
    target: str | Path,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "2GB",
) -> DeltaResult:
    """Write ``target`` = ``base`` + ``delta`` (transformers folders) shard by shard; see the module doc.

    ``dtype``: of the written weights (default: each delta tensor's, float16 for Vicuna). ``target`` must not
    exist or be empty; it is written in a hidden sibling folder and renamed into place when complete."""
    from ..device import parse_dtype

    out_dtype = parse_dtype(dtype) if dtype else None
    limit = parse_size(max_shard_size)
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"--target {target} exists and is not empty; choose a new folder")
    base_w, delta_w = ShardedWeights(base, "base"), ShardedWeights(delta, "delta")
    names, grown, dropped = _check(base_w, delta_w)
    report = ConversionReport()
    vocab = next(iter(grown.values()), None)
    added: list[str] = []
    if vocab is not None:
        added = _added_tokens(delta_w.directory, *vocab)
        rows = f"row {vocab[0]}" if vocab[1] - vocab[0] == 1 else f"rows {vocab[0]}..{vocab[1] - 1}"
        report.notes.append(
            f"vocabulary: the base has {vocab[0]} tokens, the delta {vocab[1]} (it adds {', '.join(added)}); as "
            f"FastChat does, {rows} of {' and '.join(grown)} are the delta's own values (there is no base row to "
            f"add) and the result has {vocab[1]} tokens, with the delta's tokenizer and config"
        )
    if dropped:
        report.ignored.extend(dropped)
        report.notes.append("rotary_emb.inv_freq buffers of older transformers are dropped (recomputed on load)")

    shards = _plan(names, delta_w, out_dtype, limit)
    count = len(shards)
    files = (
        ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    )
    weight_map: dict[str, str] = {}
    total = 0
    with atomic_directory(target) as tmp:
        for i, (shard, file) in enumerate(zip(shards, files)):
            tensors: dict[str, torch.Tensor] = {}
            for name in shard:
                d = delta_w.get(name)
                b = base_w.get(name)
                tensors[name] = _add(b, d, out_dtype or d.dtype)
                del b, d
                total += tensors[name].numel() * tensors[name].element_size()
                weight_map[name] = file
            _save_shard(tensors, tmp / file)
            del tensors
            log.info("wrote %s (%d/%d)", file, i + 1, count)
        if count > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        _copy_files(base_w.directory, delta_w.directory, tmp, vocab[1] if vocab else None, out_dtype, report)
    return DeltaResult(target, files, len(names), total, vocab, added, report)
