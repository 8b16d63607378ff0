"""Token-length distribution of a dataset, counted exactly as training encodes it.

As MPP-Qwen's ``tokenize_analysis.py`` did to choose ``max_txt_len`` (256 for pretraining, 512 for SFT), but with
our templates, so the counts are those of :func:`~minigpt.data.tokenize.encode_conversation` (training encoding,
image slots included). Per sample:

- ``prompt``: positions without a loss (template text, questions, system prompt, ``image_tokens`` per image);
- ``answer``: positions with a loss (answers and what the template supervises with them, e.g. ``###`` / ``</s>`` /
  ChatML's ``<|im_start|>`` and ``<|im_end|>\\n``);
- ``total``: the whole sequence (``prompt + answer``);
- ``txt_len``: what ``max_txt_len`` limits, so a sample is truncated exactly when ``txt_len > max_txt_len``. For
  templates with ``truncation="answer"`` (MiniGPT-4: vicuna0, vicuna0_head, llama2, caption, hf) it is the longest
  answer piece (each is cut on its own); for ``truncation="total"`` (chatml, MiniGPT4Qwen) the whole sequence.

Percentiles are nearest-rank (the smallest observed value that at least ``p`` % of the samples do not exceed), so
they are integers. The recommended ``max_txt_len`` is the smallest multiple of 32 not below the 99th percentile of
``txt_len``: at most 1 % of the samples are truncated with it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .conversation import Sample
from .templates import IMAGE_SLOT, Template, get_template

PERCENTILES: tuple[int, ...] = (50, 90, 95, 99)
LENGTH_KINDS: tuple[str, ...] = ("prompt", "answer", "total", "txt_len")
#: max_txt_len values whose truncation is always reported (MPP-Qwen's pretraining and SFT choices).
REFERENCE_MAX_LENS: tuple[int, ...] = (256, 512)
COVERAGE = 0.99
MULTIPLE = 32


@dataclass(frozen=True)
class SampleLengths:
    origin: str
    prompt: int
    answer: int
    total: int
    txt_len: int
    images: int


@dataclass(frozen=True)
class Rejected:
    """A sample the template cannot render (training would skip it)."""

    origin: str
    reason: str


def percentile(values: Sequence[int] | np.ndarray, p: float) -> int:
    """Nearest-rank percentile: the smallest value ``v`` of ``values`` with at least ``p`` % of them ``<= v``."""
    x = np.sort(np.asarray(values))
    if x.size == 0:
        raise ValueError("percentile of no values")
    rank = max(1, math.ceil(p / 100 * x.size - 1e-9))
    return int(x[rank - 1])


def length_stats(values: Sequence[int] | np.ndarray) -> dict[str, float | int]:
    """``count, mean, min, p50, p90, p95, p99, max`` (percentiles nearest-rank)."""
    x = np.asarray(values)
    if x.size == 0:
        return {"count": 0}
    stats: dict[str, float | int] = {"count": int(x.size), "mean": round(float(x.mean()), 2), "min": int(x.min())}
    stats.update({f"p{p}": percentile(x, p) for p in PERCENTILES})
    stats["max"] = int(x.max())
    return stats


def recommend_max_len(values: Sequence[int] | np.ndarray, coverage: float = COVERAGE, multiple: int = MULTIPLE) -> int:
    """The smallest multiple of ``multiple`` (at least one) covering ``coverage`` of ``values`` (nearest rank)."""
    p = percentile(values, coverage * 100)
    return max(multiple, math.ceil(p / multiple) * multiple)


def truncated_fraction(values: Sequence[int] | np.ndarray, max_len: int) -> float:
    """Fraction of samples whose ``txt_len`` exceeds ``max_len``."""
    x = np.asarray(values)
    return float((x > max_len).mean()) if x.size else 0.0


def measure(
    samples: Iterable[Sample],
    template: Template,
    tokenizer: Any,
    image_tokens: int,
    batch_size: int = 256,
) -> Iterator[SampleLengths | Rejected]:
    """Lengths of each sample's training encoding (see the module docstring), in order.

    Text is tokenized in batches (one tokenizer call per ``batch_size`` samples), each chunk piece on its own as
    :func:`~minigpt.data.tokenize.encode_chunks` does, so the counts equal ``encode_conversation``'s."""
    block: list[Sample] = []
    for sample in samples:
        block.append(sample)
        if len(block) >= batch_size:
            yield from _measure_block(block, template, tokenizer, image_tokens)
            block = []
    if block:
        yield from _measure_block(block, template, tokenizer, image_tokens)


def _measure_block(block: list[Sample], template: Template, tokenizer: Any, image_tokens: int):
    plans: list[tuple[Sample, int, int, list[tuple[int, bool]]] | Rejected] = []
    texts: list[str] = []
    for i, sample in enumerate(block):
        origin = sample.origin or f"sample {sample.id if sample.id is not None else i}"
        try:
            sample.check()
            chunks = template.render_train(sample.conversation, tokenizer)
        except ValueError as e:
            plans.append(Rejected(origin, str(e)))
            continue
        fixed_prompt = fixed_answer = 0
        pieces: list[tuple[int, bool]] = []  # (index into texts, supervised)
        for chunk in chunks:
            if chunk.ids is not None:
                if chunk.supervised:
                    fixed_answer += len(chunk.ids)
                else:
                    fixed_prompt += len(chunk.ids)
                continue
            for k, piece in enumerate(chunk.text.split(IMAGE_SLOT)):
                if k:
                    fixed_prompt += image_tokens
                if piece:
                    pieces.append((len(texts), chunk.supervised))
                    texts.append(piece)
        plans.append((sample, fixed_prompt, fixed_answer, pieces))
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    for plan in plans:
        if isinstance(plan, Rejected):
            yield plan
            continue
        sample, prompt, answer, pieces = plan
        longest = 0
        for index, supervised in pieces:
            n = lengths[index]
            if supervised:
                answer += n
                longest = max(longest, n)
            else:
                prompt += n
        total = prompt + answer
        yield SampleLengths(
            origin=sample.origin or "",
            prompt=prompt,
            answer=answer,
            total=total,
            txt_len=total if template.truncation == "total" else longest,
            images=len(sample.images),
        )


@dataclass
class AnalysisReport:
    """Token lengths of a dataset under a template; :meth:`to_dict` is the JSON report."""

    dataset: str
    format: str
    template: str
    truncation: str
    image_tokens: int
    tokenizer: str = ""
    lengths: dict[str, np.ndarray] = field(default_factory=dict)  # kind -> per-sample lengths
    reader_skipped: list[tuple[str, str]] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    max_len: int | None = None

    @property
    def samples(self) -> int:
        return int(self.lengths["total"].size) if "total" in self.lengths else 0

    @property
    def recommended_max_len(self) -> int | None:
        return recommend_max_len(self.lengths["txt_len"]) if self.samples else None

    def truncation_table(self) -> dict[int, dict[str, float | int]]:
        """``max_len -> {"samples": n truncated, "fraction": n / samples}`` for ``max_len`` (when given), 256, 512
        and the recommended length."""
        candidates = set(REFERENCE_MAX_LENS)
        if self.max_len is not None:
            candidates.add(self.max_len)
        if self.recommended_max_len is not None:
            candidates.add(self.recommended_max_len)
        x = self.lengths.get("txt_len", np.zeros(0, dtype=np.int64))
        return {n: {"samples": int((x > n).sum()), "fraction": truncated_fraction(x, n)} for n in sorted(candidates)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "format": self.format,
            "tokenizer": self.tokenizer,
            "template": self.template,
            "truncation": self.truncation,
            "image_tokens": self.image_tokens,
            "samples": self.samples,
            "reader_skipped": {
                "count": len(self.reader_skipped),
                "first": [{"origin": o, "reason": r} for o, r in self.reader_skipped[:20]],
            },
            "template_rejected": {
                "count": len(self.rejected),
                "first": [{"origin": r.origin, "reason": r.reason} for r in self.rejected[:20]],
            },
            "lengths": {kind: length_stats(self.lengths[kind]) for kind in LENGTH_KINDS if kind in self.lengths},
            "max_len": self.max_len,
            "truncated_fraction": (
                truncated_fraction(self.lengths["txt_len"], self.max_len)
                if self.max_len is not None and self.samples
                else None
            ),
            "truncated": {str(n): v for n, v in self.truncation_table().items()},
            "recommended_max_len": self.recommended_max_len,
            "recommendation": f"smallest multiple of {MULTIPLE} covering {COVERAGE:.0%} of txt_len (nearest rank)",
        }

    def summary(self) -> str:
        cut = "each answer" if self.truncation == "answer" else "the whole sequence"
        lines = [
            f"{self.dataset} ({self.format}): {self.samples} samples"
            + (f", {len(self.reader_skipped)} malformed records skipped" if self.reader_skipped else "")
            + (f", {len(self.rejected)} rejected by the template" if self.rejected else ""),
            f"template {self.template} (max_txt_len cuts {cut}), {self.image_tokens} tokens per image",
            f"{'tokens':<10}{'mean':>9}" + "".join(f"{'p' + str(p):>7}" for p in PERCENTILES) + f"{'max':>7}",
        ]
        for kind in LENGTH_KINDS:
            s = length_stats(self.lengths.get(kind, []))
            if s["count"]:
                lines.append(
                    f"{kind:<10}{s['mean']:>9.1f}" + "".join(f"{s[f'p{p}']:>7}" for p in PERCENTILES) + f"{s['max']:>7}"
                )
        for n, t in self.truncation_table().items():
            mark = " (--max-len)" if n == self.max_len else " (recommended)" if n == self.recommended_max_len else ""
            lines.append(f"max_txt_len {n}{mark}: truncates {t['samples']} samples ({t['fraction']:.2%})")
        if self.recommended_max_len is not None:
            lines.append(
                f"recommended max_txt_len: {self.recommended_max_len} "
                f"(smallest multiple of {MULTIPLE} covering {COVERAGE:.0%})"
            )
        if self.rejected:
            lines.append(f"first rejected: {self.rejected[0].origin}: {self.rejected[0].reason}")
        return "\n".join(lines)


def analyze_samples(
    samples: Iterable[Sample],
    tokenizer: Any,
    template: str | Template = "vicuna0",
    image_tokens: int = 32,
    max_len: int | None = None,
    progress: bool | int | None = False,
    dataset: str = "",
    fmt: str = "",
) -> AnalysisReport:
    """Measure ``samples`` under ``template`` (take the first N with ``itertools.islice``); ``progress`` shows a
    tqdm bar (``total`` when it is an int)."""
    tpl = get_template(template) if isinstance(template, str) else template
    if image_tokens < 0:
        raise ValueError(f"image_tokens must be >= 0, got {image_tokens}")
    if max_len is not None and max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    report = AnalysisReport(
        dataset,
        fmt,
        tpl.name,
        tpl.truncation,
        image_tokens,
        max_len=max_len,
        tokenizer=str(getattr(tokenizer, "name_or_path", "")),
    )
    it: Iterable[Sample] = samples
    if progress:
        from ..console import progress_bar

        total = progress if isinstance(progress, int) and not isinstance(progress, bool) else None
        it = progress_bar(it, total=total, desc="tokenize", unit=" samples", dynamic_ncols=True, disable=None)
    columns: dict[str, list[int]] = {kind: [] for kind in LENGTH_KINDS}
    for item in measure(it, tpl, tokenizer, image_tokens):
        if isinstance(item, Rejected):
            report.rejected.append(item)
            continue
        for kind in LENGTH_KINDS:
            columns[kind].append(getattr(item, kind))
    if not columns["total"]:
        first = f"; first: {report.rejected[0].origin}: {report.rejected[0].reason}" if report.rejected else ""
        raise ValueError(f"no sample could be measured ({len(report.rejected)} rejected by template {tpl.name}{first})")
    report.lengths = {kind: np.asarray(v, dtype=np.int64) for kind, v in columns.items()}
    return report


def plot_histogram(report: AnalysisReport, path: str | Path) -> Path:
    """A PNG with one histogram per length kind; the ``txt_len`` panel marks ``max_len`` and the recommendation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    titles = {
        "prompt": "prompt (no loss, image slots included)",
        "answer": "answer (loss tokens)",
        "total": "total sequence",
        "txt_len": f"txt_len (what max_txt_len cuts: {report.truncation})",
    }
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, kind in zip(axes.flat, LENGTH_KINDS):
        x = report.lengths[kind]
        bins = min(60, max(1, int(x.max() - x.min()) + 1))
        ax.hist(x, bins=bins, color="#4c72b0")
        ax.set_title(titles[kind], fontsize=10)
        ax.set_xlabel("tokens")
        ax.set_ylabel("samples")
        ax.axvline(percentile(x, 99), color="gray", linestyle=":", label=f"p99 = {percentile(x, 99)}")
        if kind == "txt_len":
            if report.recommended_max_len is not None:
                ax.axvline(
                    report.recommended_max_len,
                    color="green",
                    linestyle="--",
                    label=f"recommended {report.recommended_max_len}",
                )
            if report.max_len is not None:
                frac = truncated_fraction(x, report.max_len)
                ax.axvline(report.max_len, color="red", label=f"max_len {report.max_len} ({frac:.1%} cut)")
        ax.legend(fontsize=8)
    fig.suptitle(
        f"{Path(report.dataset).name or report.dataset}: {report.samples} samples, template "
        f"{report.template}, {report.image_tokens} tokens/image",
        fontsize=11,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(report: AnalysisReport, out: str | Path) -> dict[str, Path]:
    """``out/report.json`` and ``out/lengths.png``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_histogram(report, out / "lengths.png")
    data = report.to_dict()
    data["histogram"] = png.name
    (out / "report.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return {"report": out / "report.json", "histogram": png}
