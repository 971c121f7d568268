"""The training loss, which owns the output head.

The model stops at the final norm's hidden states [B, T, C] when it is given a ``head`` (see
``Transformer.forward``); the loss receives them together with the output projection and the
labels, and decides how the [tokens x vocab] logits come to exist: all at once in fp32 here, in
chunks or inside a fused linear-cross-entropy kernel in later implementations. The loop never
sees logits, so swapping the loss changes nothing else.

Every loss returns the fp32 (fp64 for fp64 inputs) *sum* over target tokens: the loop divides by
the accumulation window's target count, so k micro-batches equal one batch.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data import IGNORE_INDEX


class HeadLoss(Protocol):
    """``loss(hidden [B, T, C], head, labels [B, T]) -> scalar sum over target tokens``."""

    def __call__(self, hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor) -> torch.Tensor: ...


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """labels [B, T] aligned with the inputs -> targets [B, T]: position t predicts ``labels[t+1]``;
    the last position predicts nothing. Shifting the labels instead of slicing the logits avoids a
    copy of the [B, T, V] tensor."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over target positions, in fp32.

    logits [B, T, V] (any float dtype), labels [B, T] aligned with the inputs (``labels[t]`` is
    the token at position t, IGNORE_INDEX on prompt/padding).
    """
    logits = logits.flatten(0, 1)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp16/bf16 -> fp32; fp64 stays
    return F.cross_entropy(logits, shifted_targets(labels).flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def full_logits_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """The reference :class:`HeadLoss`: project every position to the vocabulary (in the forward's
    autocast dtype), then :func:`token_loss_sum` outside autocast (peak: the [B, T, V] logits in the
    compute dtype plus their fp32 copy)."""
    logits = head(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        return token_loss_sum(logits, labels)


# ===================================================================== without the full logits
CHUNK_TOKENS = 1024  # tokens per chunk: [1024 x 32000] fp32 logits = 131 MB, not 524 MB per 4096 tokens


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's (as ``nn.Linear`` would; fp64 is never
    cast by autocast), else the promotion of the two operands."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev) and torch.float64 not in (hidden.dtype, weight.dtype):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_loss_sum(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """hidden [n, C], targets [n] (already shifted) -> fp32 sum: the head in the forward's autocast
    dtype, cross-entropy outside it (as :func:`full_logits_loss`)."""
    logits = head(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                 chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """:class:`HeadLoss` over chunks of ``chunk_tokens`` tokens, each through the head and
    cross-entropy under non-reentrant checkpointing: a chunk's logits exist only while its loss is
    computed (forward) and again while its gradient is (backward, recomputed), so the transient is
    one chunk's [n, V] instead of [B*T, V]; the price is a second head matmul per chunk. Works for
    any head module (a quantized or LoRA-wrapped head too)."""
    h = hidden.flatten(0, 1)
    targets = shifted_targets(labels).flatten()
    total = None
    for s in range(0, h.shape[0], chunk_tokens):
        part = checkpoint(_chunk_loss_sum, h[s:s + chunk_tokens], head, targets[s:s + chunk_tokens],
                          use_reentrant=False)
        total = part if total is None else total + part
    return total if total is not None else h.new_zeros((), dtype=torch.float32).sum()


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_t CE(hidden[t] @ weight.T, targets[t]) with the gradients computed in the forward.

    hidden [N, C], weight [V, C], targets [N] (IGNORE_INDEX skipped). For each chunk of tokens:
    logits in ``dtype`` (the matmul), softmax statistics in ``loss_dtype`` (fp32, or fp64), then
    d loss / d logits = softmax - onehot (zero on ignored rows), cast to ``dtype`` for the two
    gradient matmuls as autograd of the reference would. The gradients are kept until backward,
    d hidden [N, C] in ``dtype`` (the matmul's output) and d weight [V, C] in ``loss_dtype`` (a sum
    over chunks; only when the weight needs one), and backward only scales them (in fp32) by
    the incoming scalar, so no [N, V] tensor outlives its chunk.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype,
                chunk_tokens: int) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss_dtype = torch.promote_types(dtype, torch.float32)
        N = hidden.shape[0]
        loss = torch.zeros((), dtype=loss_dtype, device=hidden.device)
        # d hidden comes out of a matmul in ``dtype``: kept in it (no precision to gain in fp32)
        grad_h = hidden.new_empty(hidden.shape, dtype=dtype) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=loss_dtype, device=weight.device) if need_w else None
        w = weight.to(dtype)
        for s in range(0, N, chunk_tokens):
            h = hidden[s:s + chunk_tokens].to(dtype)
            t = targets[s:s + chunk_tokens]
            valid = t != IGNORE_INDEX
            tgt = torch.where(valid, t, 0)[:, None]
            logits = (h @ w.T).to(loss_dtype)  # [n, V]: the matmul's rounding, then fp32 statistics
            picked = logits.gather(1, tgt)[:, 0]
            # logsumexp's own steps (max, exp(x - max), sum, log + max), but in place: torch.logsumexp
            # makes an [n, V] temporary for exp(x - max) (8 bytes per logit at its peak instead of 6)
            m = logits.amax(dim=-1, keepdim=True)
            m.masked_fill_(m.isinf(), 0)  # as logsumexp: a row of infinities stays inf/nan
            e = logits.sub_(m).exp_()  # exp(logits - max), in place of the logits
            total = e.sum(dim=-1, keepdim=True)
            lse = (total.log() + m)[:, 0]
            loss += torch.where(valid, lse - picked, 0).sum()
            if not (need_h or need_w):
                del logits, e
                continue
            g = e.div_(total)  # the softmax, still in place of the logits
            g.scatter_add_(1, tgt, -valid[:, None].to(loss_dtype))
            g.mul_(valid[:, None])
            g = g.to(dtype)
            if need_h:
                grad_h[s:s + chunk_tokens] = g @ w
            if need_w:
                grad_w += (g.T @ h).to(loss_dtype)
            # drop this chunk's [n, V] tensors before the next chunk's are made: kept until rebound,
            # the previous chunk's fp32 softmax and 16-bit copy doubled the loss's transient (12 B per
            # logit instead of 6: measured on the CPU, benchmarks/NOTES.md, fifth session)
            del logits, e, g
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        gh = (grad_h.to(grad_out.dtype) * grad_out).to(h_dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def fused_linear_ce_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                         chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """:class:`HeadLoss` that computes the loss and its gradients w.r.t. the hidden states and the
    head's weight (when it requires grad: full fine-tuning; a tied embedding gets it through the
    shared Parameter) chunk by chunk in the forward; the backward only scales them. No [B*T, V]
    tensor and no second head matmul. A head that is not a bias-free ``nn.Linear`` goes through
    :func:`chunked_loss`."""
    if type(head) is not nn.Linear or head.bias is not None:
        return chunked_loss(hidden, head, labels, chunk_tokens)
    dtype = compute_dtype(hidden, head.weight)
    targets = shifted_targets(labels).flatten()
    with torch.autocast(hidden.device.type, enabled=False):
        return _FusedLinearCrossEntropy.apply(hidden.flatten(0, 1), head.weight, targets, dtype, chunk_tokens)


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "full-logits": full_logits_loss,
    "chunked": chunked_loss,
    "fused-linear-ce": fused_linear_ce_loss,
}


# How many tokens' logits a loss holds at once (None: all of them); the planner sizes the logits
# transients from it (solotune/bench/dryrun.py).
LOGITS_ROWS: dict[str, int | None] = {"full-logits": None, "chunked": CHUNK_TOKENS, "fused-linear-ce": CHUNK_TOKENS}


def logits_rows(name: str, n_tokens: int) -> int:
    """Rows of the [rows, V] logits that loss ``name`` materialises at once for ``n_tokens`` tokens."""
    rows = LOGITS_ROWS[name]
    return n_tokens if rows is None else min(rows, n_tokens)


# Losses that ``get_loss(compiled=True)`` hands to ``torch.compile``: Inductor fuses the fp32 cast,
# log-softmax and the gather into the head's output and recomputes the softmax from the 16-bit
# logits in backward, so the [tokens x vocab] fp32 copy never exists (7B, 4096 tokens: 3.3 ms and
# 250 MiB instead of 4.4 ms and 1,468 MiB, benchmarks/results/frontier2-h200/run1/kernels/). The
# chunked and fused losses already hold one chunk at a time and loop in Python; they stay eager.
COMPILABLE_LOSSES = frozenset({"full-logits"})


def get_loss(name: str = "full-logits", compiled: bool = False, **compile_options: Any) -> HeadLoss:
    """The :class:`HeadLoss` called ``name``; with ``compiled`` (and ``name`` in
    :data:`COMPILABLE_LOSSES`) wrapped in ``torch.compile(**compile_options)``."""
    try:
        fn = LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}") from None
    return torch.compile(fn, **compile_options) if compiled and name in COMPILABLE_LOSSES else fn
