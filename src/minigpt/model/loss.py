"""The LM head's cross-entropy on the supervised positions, without all their logits in float32 at once.

:func:`linear_cross_entropy` computes ``mean_i CE(softcap(scale * rows_i @ W.T), targets_i)`` (``rows``: the hidden
states whose next token is supervised; ``scale``: the config's ``logit_scale``; ``softcap``: its
``final_logit_softcapping``) with one of these implementations (``loss_impl``):

- ``plain``: the head module on all rows, then ``F.cross_entropy`` on float32 logits (``[rows, vocab]`` float32 live
  from forward to backward);
- ``chunked``: :class:`ChunkedLinearCrossEntropy`: the rows in chunks of ``CHUNK_LOGITS // vocab``; each chunk's float32
  logits give its loss and, when gradients are wanted, its gradients for the rows (and the head weight when it trains)
  at once, so one chunk's logits live at a time and backward only scales. Plain torch ops, any device, no host sync;
- ``liger``: Liger-Kernel's fused linear cross-entropy (Triton; CUDA only, optional ``liger-kernel`` package). It
  reads the number of targets with one ``.item()`` (a host sync) per call;
- ``auto``: ``liger`` where it runs (CUDA and the package importable), else ``plain`` up to ``CHUNK_LOGITS`` logits
  (one chunk: chunking would save nothing) and ``chunked`` above.

``chunked`` and ``liger`` read the head's weight directly, so they need a plain ``nn.Linear`` head without bias whose
weight is not partitioned (DeepSpeed ZeRO-3) or quantized; ``auto`` falls back to ``plain`` otherwise.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..device import runs_triton

LOSS_IMPLS = ("auto", "plain", "chunked", "liger")
#: Logits per chunk of ``chunked`` (2**25 float32 = 128 MiB), and the most ``auto`` computes in one piece.
CHUNK_LOGITS = 2**25


@functools.cache
def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def fused_head_problem(head: nn.Module) -> str | None:
    """Why ``chunked``/``liger`` cannot use ``head``'s weight directly, or None when they can."""
    if not isinstance(head, nn.Linear):
        return f"the LM head is a {type(head).__name__}, not a torch.nn.Linear"
    if head.bias is not None:
        return "the LM head has a bias"
    if not head.weight.is_floating_point():
        return "the LM head's weight is quantized"
    if hasattr(head.weight, "ds_shape"):
        return "the LM head's weight is partitioned (DeepSpeed ZeRO-3)"
    return None


def resolve_loss_impl(impl: str, head: nn.Module, rows: int, device: torch.device) -> str:
    """The implementation that ``impl`` means for ``rows`` supervised positions on ``device`` (see the module doc);
    ``ValueError`` when an explicitly chosen one cannot run here."""
    if impl not in LOSS_IMPLS:
        raise ValueError(f"unknown loss implementation {impl!r}; use one of {', '.join(LOSS_IMPLS)}")
    problem = fused_head_problem(head)
    if impl == "auto":
        if problem is not None:
            return "plain"
        if liger_installed() and runs_triton(device):
            return "liger"
        return "chunked" if rows * head.weight.shape[0] > CHUNK_LOGITS else "plain"
    if impl != "plain" and problem is not None:
        raise ValueError(f"loss_impl {impl} cannot be used: {problem}; use plain or auto")
    if impl == "liger" and not (liger_installed() and runs_triton(device)):
        raise ValueError(
            f"loss_impl liger needs the liger-kernel package and a CUDA device (here: {device}, "
            f"liger-kernel {'installed' if liger_installed() else 'not installed'}); use auto or chunked"
        )
    return impl


def linear_cross_entropy(
    rows: torch.Tensor,
    head: nn.Module,
    targets: torch.Tensor,
    impl: str = "auto",
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``softcap(scale * head(rows))`` against ``targets`` (``rows`` ``[N, D]``, N > 0)."""
    impl = resolve_loss_impl(impl, head, rows.shape[0], rows.device)
    if impl == "plain":
        logits = head(rows)
        if scale:
            logits = logits * scale
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits.float(), targets)
    if impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy(
            rows * scale if scale else rows, head.weight, targets, softcap=softcap or None
        )
    return chunked_linear_cross_entropy(rows, head.weight, targets, scale, softcap)


def chunked_linear_cross_entropy(
    rows: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    scale: float | None = None,
    softcap: float | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """The ``chunked`` implementation (``chunk_rows``: default ``CHUNK_LOGITS // vocab``)."""
    chunk = chunk_rows or max(1, CHUNK_LOGITS // weight.shape[0])
    if torch.is_grad_enabled() and (rows.requires_grad or weight.requires_grad):
        return ChunkedLinearCrossEntropy.apply(rows, weight, targets, scale, softcap, chunk)
    return _chunked(rows, weight, targets, scale, softcap, chunk, False, False)[0]


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss and gradients chunk by chunk in forward (see the module doc); backward scales the stored gradients."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        rows: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        scale: float | None,
        softcap: float | None,
        chunk_rows: int,
    ) -> torch.Tensor:
        loss, grad_rows, grad_weight = _chunked(
            rows, weight, targets, scale, softcap, chunk_rows, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        ctx.save_for_backward(grad_rows, grad_weight)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_rows, grad_weight = ctx.saved_tensors
        return (
            grad_rows * grad_loss.to(grad_rows.dtype) if grad_rows is not None else None,
            grad_weight * grad_loss if grad_weight is not None else None,
            None,
            None,
            None,
            None,
        )


def _chunked(
    rows: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    scale: float | None,
    softcap: float | None,
    chunk_rows: int,
    grad_rows: bool,
    grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Mean loss and, as asked, its gradients for ``rows`` (their dtype) and ``weight`` (its dtype)."""
    n = rows.shape[0]
    total = torch.zeros((), dtype=torch.float32, device=rows.device)
    d_rows = torch.empty_like(rows) if grad_rows else None
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_weight else None
    for start in range(0, n, chunk_rows):
        x, t = rows[start : start + chunk_rows], targets[start : start + chunk_rows, None]
        raw = F.linear(x, weight)  # the matmul in the autocast / model dtype, as the plain head
        logits = raw.float()
        if scale:
            logits = logits * scale
        if softcap:
            capped = torch.tanh(logits / softcap)
            logits = capped * softcap
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        total += (lse - logits.gather(1, t)).sum()
        if d_rows is None and d_weight is None:
            continue
        grad = logits.sub_(lse).exp_()  # softmax, in place of the logits
        grad.scatter_add_(1, t, torch.full_like(t, -1, dtype=grad.dtype))
        if softcap:
            grad.mul_(1 - capped * capped)
        grad.mul_((scale or 1.0) / n)
        grad = grad.to(raw.dtype)
        if d_rows is not None:
            d_rows[start : start + chunk_rows] = grad @ weight
        if d_weight is not None:
            d_weight += (grad.t() @ x).float()
    return total / n, d_rows, d_weight.to(weight.dtype) if d_weight is not None else None


__all__ = [
    "LOSS_IMPLS",
    "CHUNK_LOGITS",
    "linear_cross_entropy",
    "chunked_linear_cross_entropy",
    "ChunkedLinearCrossEntropy",
    "resolve_loss_impl",
    "fused_head_problem",
    "liger_installed",
]
