"""File helpers every layer uses: writing files and folders atomically (readers see the old one or the finished
new one, never a half), writing weights with the umask's mode, and refusing pickled files that would run code."""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary folder beside ``target``; when the block succeeds it takes ``target``'s
    place in one rename (an existing ``target`` is replaced), when it fails it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def umask() -> int:
    """The process umask (read from ``/proc`` where it is available, else by setting and restoring it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    current = os.umask(0o022)
    os.umask(current)
    return current


def respect_umask(*paths: str | Path) -> None:
    """Give files (for a folder: every file under it) the mode a plain ``open`` gives them, 0666 less the umask.
    safetensors writes 0600 whatever the umask; ``torch.save`` and ``config.json`` get 0644 under umask 022, and a
    shared model folder needs its weights as readable as its config."""
    mode = 0o666 & ~umask()
    for path in map(Path, paths):
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file() and not file.is_symlink():
                file.chmod(mode)


def save_safetensors(tensors: dict[str, Any], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with the file's mode following the umask (:func:`respect_umask`)."""
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)
    respect_umask(path)


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary path beside the file ``target`` (``.NAME.PID.tmp``) for a writer that takes a path;
    when the block succeeds it replaces ``target`` in one rename, when it fails it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(target: str | Path) -> Iterator[IO[str]]:
    """A UTF-8 text file written in place of ``target`` atomically (:func:`atomic_path`)."""
    with atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8") as f:
        yield f


def atomic_write_text(target: str | Path, text: str) -> None:
    """Replace ``target``'s content with ``text`` (UTF-8) atomically."""
    with atomic_open(target) as f:
        f.write(text)


#: What a refusal suggests by default.
RESAVE_ADVICE = "Re-save its state dict from a trusted environment as safetensors."
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class UnsafeCheckpointError(ValueError):
    """A pickled file holds objects other than tensors and plain containers: refused, never executed."""


def unsafe_global(err: BaseException) -> str:
    """The global that a ``torch.load(weights_only=True)`` refusal names (e.g. ``posix.system``)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err)) or re.search(r"Unsupported global: ([^\s]+)", str(err))
    return found[1] if found else "an object beyond tensors and plain containers"


def pickled_file(path: str | Path) -> Path:
    """``path``, or for a folder with exactly one pickled weights file (``*.bin``, ``*.pt``...) that file."""
    path = Path(path)
    found = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES) if path.is_dir() else []
    return found[0] if len(found) == 1 else path


@contextlib.contextmanager
def refuse_unsafe_pickle(path: str | Path, advice: str = RESAVE_ADVICE) -> Iterator[None]:
    """Turn a ``weights_only`` unpickling failure inside the block (``torch.load``, transformers, peft) into one
    :class:`UnsafeCheckpointError` line naming the file and the refused global, instead of torch's traceback and
    its advice to load with ``weights_only=False``."""
    try:
        yield
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{pickled_file(path)}: refusing to load, it needs unsafe unpickling ({unsafe_global(err)}). {advice}"
        ) from None
