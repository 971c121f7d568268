"""Fused SwiGLU gate ``silu(a) * b``: the forward reads a and b once and writes the product (the
eager path also writes and re-reads silu(a)); the backward recomputes silu(a) instead of keeping
it, so a and b are all that is saved.

Same arithmetic as the reference ``F.silu(a) * b`` of :class:`solotune.model.FeedForward`: silu in
fp32 (``a / (1 + exp(-a))``), rounded to a's dtype, times b, rounded to the promoted dtype.
Shapes: a, b [..., H] (H the feed-forward width).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model import FeedForward
from ._triton import Available, kernel_available, tl, triton

BLOCK = 1024

if triton is not None:

    @triton.jit
    def _swiglu_fwd(A, B, Y, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
        s = (a / (1.0 + tl.exp(-a))).to(A.dtype.element_ty).to(tl.float32)
        tl.store(Y + offs, (s * b).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd(DY, A, B, DA, DB, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-a))
        s = (a * sig).to(A.dtype.element_ty).to(tl.float32)
        ds = (dy * b).to(A.dtype.element_ty).to(tl.float32)  # d silu(a), in silu's dtype as autograd has it
        tl.store(DB + offs, (dy * s).to(DB.dtype.element_ty), mask=mask)
        tl.store(DA + offs, (ds * sig * (1.0 + a * (1.0 - sig))).to(DA.dtype.element_ty), mask=mask)


@torch.library.custom_op("solotune::swiglu", mutates_args=())
def _swiglu_op(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a, b [N] contiguous, same shape -> silu(a) * b [N] in promote(a, b)."""
    y = torch.empty(a.shape, dtype=torch.promote_types(a.dtype, b.dtype), device=a.device)
    n = a.numel()
    if n:
        _swiglu_fwd[(triton.cdiv(n, BLOCK),)](a, b, y, n, BLOCK=BLOCK)
    return y


@_swiglu_op.register_fake
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.new_empty(a.shape, dtype=torch.promote_types(a.dtype, b.dtype))


@torch.library.custom_op("solotune::swiglu_backward", mutates_args=())
def _swiglu_backward_op(dy: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    da, db = torch.empty_like(a), torch.empty_like(b)
    n = a.numel()
    if n:
        _swiglu_bwd[(triton.cdiv(n, BLOCK),)](dy.contiguous(), a, b, da, db, n, BLOCK=BLOCK)
    return da, db


@_swiglu_backward_op.register_fake
def _(dy: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(a), torch.empty_like(b)


def _setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy: torch.Tensor):
    a, b = ctx.saved_tensors
    return _swiglu_backward_op(dy, a, b)


_swiglu_op.register_autograd(_backward, setup_context=_setup)


def swiglu(a: torch.Tensor, b: torch.Tensor, available: Available = kernel_available) -> torch.Tensor:
    """silu(a) * b for a, b [..., H] of one shape (the Triton kernel where it can run, else the
    reference)."""
    if a.shape != b.shape or not available(a, b):
        return F.silu(a) * b
    return _swiglu_op(a.contiguous().view(-1), b.contiguous().view(-1)).view(a.shape)


def fused_feed_forward(module: FeedForward, x: torch.Tensor, available: Available = kernel_available) -> torch.Tensor:
    """A replacement for ``FeedForward.forward``: ``w2(swiglu(w1 x, w3 x))`` (the projections are
    the module's own, LoRA-wrapped or quantized as they are)."""
    return module.w2(swiglu(module.w1(x), module.w3(x), available))
