"""What a command prints: logging set-up (rank 0 only under torchrun), third-party noise silenced, errors as one
line (pydantic's included), progress bars that stay visible and logs that print above them.

:func:`setup_logging` is called once by the command-line entry, before the heavy libraries are imported: it sets the
environment variables and logger filters that quiet transformers' weight-loading bars and info lines, DeepSpeed's
accelerator line, bitsandbytes' kernel notice and ``FutureWarning`` s (errors stay visible; ``--verbose`` keeps
everything).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
#: Environment variables set (unless the user set them) to quiet third-party libraries.
QUIET_ENV: dict[str, str] = {
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
#: Third-party loggers shown from this level up only (their info lines and notices are noise to a user).
QUIET_LOGGERS: dict[str, int] = {
    "DeepSpeed": logging.ERROR,
    "bitsandbytes": logging.ERROR,
    "transformers": logging.ERROR,
    "huggingface_hub": logging.ERROR,
    "torch.distributed": logging.WARNING,
    "httpx": logging.WARNING,
}
#: A terminal narrower than this (or one that reports 0 rows) gets a fixed-size bar (:func:`progress_bar`).
MIN_COLUMNS = 20


def process_rank() -> int:
    """This process's rank under torchrun (``RANK``), 0 when started alone."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class _BelowLevel(logging.Filter):
    """Drops records under a level (a filter survives a library that resets its logger's level at import)."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


def quiet_third_party() -> None:
    """Silence third-party info lines, progress bars and ``FutureWarning`` s; errors stay visible."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name, level in QUIET_LOGGERS.items():
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(isinstance(f, _BelowLevel) for f in logger.filters):
            logger.addFilter(_BelowLevel(level))
    warnings.filterwarnings("ignore", category=FutureWarning)


def setup_logging(verbose: bool = False) -> None:
    """The commands' logging on stderr, above the progress bars: INFO lines as ``LEVEL logger: message`` (DEBUG
    with ``verbose``); under torchrun, ranks other than 0 show warnings and errors only; third-party noise is
    silenced unless ``verbose``."""
    level = logging.DEBUG if verbose else logging.INFO if process_rank() == 0 else logging.WARNING
    # Records print above any progress bar (tqdm.write), not on its line.
    logging.basicConfig(level=level, format=LOG_FORMAT, handlers=[logging.StreamHandler(_AboveBars(sys.stderr))])
    if not verbose:
        quiet_third_party()


# ---------------------------------------------------------------------------------------------- errors


def error_key(error: Mapping[str, Any]) -> str:
    """The dotted key of a pydantic error (``run.batch_size``), without the union members pydantic tried."""

    def union_tag(part: Any) -> bool:  # "str", "list[str]", "function-after[...]"
        return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "dict", "list"))

    return ".".join(str(p) for p in error["loc"] if not union_tag(p)) or "(top level)"


def describe_error(error: Mapping[str, Any], fields: Sequence[str] = ()) -> str:
    """One pydantic error as ``key: problem (got VALUE)``; ``fields``: the valid keys, named for an unknown one."""
    key = error_key(error)
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key" + (f" (valid keys here: {', '.join(fields)})" if fields else "")
    if error["type"] == "missing":
        return f"{key}: missing (required)"
    msg = error["msg"].removeprefix("Value error, ")
    shown = error.get("input")
    got = f" (got {shown!r})" if not isinstance(shown, (dict, list)) and repr(shown) not in msg else ""
    return f"{key}: {msg}{got}"


def error_text(err: BaseException) -> str:
    """An error as a command prints it: a pydantic validation error as its problems (no URL, no pydantic types)."""
    errors = getattr(err, "errors", None)
    if type(err).__name__ == "ValidationError" and callable(errors):
        return f"invalid {getattr(err, 'title', 'value')}: " + "; ".join(describe_error(e) for e in errors())
    return str(err)


# ---------------------------------------------------------------------------------------------- progress


def progress_bar(iterable: Any = None, **kwargs: Any) -> Any:
    """A ``tqdm`` bar on stderr that stays visible: a terminal that reports 0 columns or 0 rows (tqdm then shows
    nothing) gets a fixed 80-column bar instead of a dynamic one."""
    from tqdm.auto import tqdm

    try:
        size = os.get_terminal_size(sys.stderr.fileno())
        columns, rows = size.columns, size.lines
    except (AttributeError, ValueError, OSError):
        columns, rows = shutil.get_terminal_size()
    if kwargs.get("dynamic_ncols") and (columns < MIN_COLUMNS or rows < 1):
        kwargs.update(dynamic_ncols=False, ncols=80, nrows=24)
    return tqdm(iterable, **kwargs)


class _AboveBars:
    """A console stream whose writes go above the progress bars (``tqdm.write``) instead of after them."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        from tqdm import tqdm

        tqdm.write(text, file=self.stream, end="")

    def flush(self) -> None:
        self.stream.flush()


def console_handlers() -> list[logging.StreamHandler]:
    """The root logger's handlers that print to the terminal (stdout/stderr, directly or above the bars)."""
    return [
        h
        for h in logging.root.handlers
        if isinstance(h, logging.StreamHandler)
        and (h.stream if not isinstance(h.stream, _AboveBars) else h.stream.stream) in (sys.stdout, sys.stderr)
    ]


@contextmanager
def logs_above_bars() -> Iterator[None]:
    """Within the block, the root logger's console handlers (stdout/stderr) print above the progress bars, each
    record on its own line, keeping their levels, formats and filters; other handlers (files) are left alone."""
    handlers = [h for h in console_handlers() if not isinstance(h.stream, _AboveBars)]  # the others already do
    streams = [h.setStream(_AboveBars(h.stream)) for h in handlers]
    try:
        yield
    finally:
        for handler, stream in zip(handlers, streams):
            handler.setStream(stream)
