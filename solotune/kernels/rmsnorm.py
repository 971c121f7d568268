"""Fused RMSNorm: one read of x and one write of y in the forward (fp32 statistics, the per-row
1/rms kept for backward), one read of x and dy and one write of dx in the backward, with the
weight gradient reduced from per-program fp32 partial sums.

Same arithmetic as :class:`solotune.model.RMSNorm` (the reference, used on CPU): ``x̂ = x·rstd``
in fp32, rounded to x's dtype, then ``weight * x̂`` in the promoted dtype of x and the weight.
Shapes: x [..., C], weight [C]; rows R = x.numel() / C.
"""

from __future__ import annotations

import torch

from ..model import RMSNorm
from ._triton import Available, kernel_available, programs, row_block, tl, triton, warps

if triton is not None:

    @triton.jit
    def _rms_norm_fwd(X, W, Y, RSTD, C, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < C
        x = tl.load(X + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / C + eps)
        xn = (x * rstd).to(X.dtype.element_ty).to(tl.float32)  # the reference's .to(dtype)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * C + cols, (w * xn).to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _rms_norm_bwd(DY, X, W, RSTD, DX, DW_PARTIAL, R, C, ROWS_PER_PROGRAM: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < C
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        start = pid.to(tl.int64) * ROWS_PER_PROGRAM
        for i in range(0, ROWS_PER_PROGRAM):  # a constexpr bound: Triton 3.6's interpreter cannot loop to a runtime scalar
            row = start + i
            m = mask & ((tl.zeros([BLOCK], dtype=tl.int64) + row) < R)  # the last program's rows may run past R
            off = row * C + cols
            x = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
            dy = tl.load(DY + off, mask=m, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + tl.minimum(row, R - 1))  # past R: x and dy are 0, so is the row
            xn = x * rstd
            dw += dy * xn.to(X.dtype.element_ty).to(tl.float32)
            dxn = dy * w
            dx = rstd * (dxn - xn * (tl.sum(dxn * xn, axis=0) / C))
            tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=m)
        tl.store(DW_PARTIAL + pid.to(tl.int64) * C + cols, dw, mask=mask)


@torch.library.custom_op("solotune::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, C] contiguous -> (y [R, C] in promote(x, weight), rstd [R] fp32)."""
    R, C = x.shape
    y = torch.empty((R, C), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(R, dtype=torch.float32, device=x.device)
    if R:
        _rms_norm_fwd[(R,)](x, weight, y, rstd, C, eps, BLOCK=row_block(C), num_warps=warps(row_block(C)))
    return y, rstd


@_rms_norm_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)),
            x.new_empty(x.shape[:1], dtype=torch.float32))


@torch.library.custom_op("solotune::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                          rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dy, x [R, C], weight [C], rstd [R] -> (dx [R, C] in x's dtype, dweight [C] in its dtype)."""
    R, C = x.shape
    dx = torch.empty_like(x)
    # rows per program a power of two (a compile-time constant: a few variants, not one per row count)
    per = triton.next_power_of_2(triton.cdiv(R, programs(R, x.device))) if R else 1
    P = triton.cdiv(R, per) if R else 1
    partial = torch.zeros((P, C), dtype=torch.float32, device=x.device)
    if R:
        _rms_norm_bwd[(P,)](dy.contiguous(), x, weight, rstd, dx, partial, R, C, ROWS_PER_PROGRAM=per,
                            BLOCK=row_block(C), num_warps=warps(row_block(C)))
    return dx, partial.sum(0).to(weight.dtype)


@_rms_norm_backward_op.register_fake
def _(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(weight)


def _setup(ctx, inputs, output) -> None:
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _backward(ctx, dy: torch.Tensor, _drstd: torch.Tensor | None):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_backward_op(dy, x, weight, rstd)
    return dx, dw if ctx.needs_input_grad[1] else None, None


_rms_norm_op.register_autograd(_backward, setup_context=_setup)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., C] -> weight * x / rms(x) (the Triton kernel; x must be where it can run)."""
    C = x.shape[-1]
    y, _ = _rms_norm_op(x.reshape(-1, C).contiguous(), weight.contiguous(), float(eps))
    return y.view(*x.shape[:-1], C)


def fused_rms_norm_forward(module: RMSNorm, x: torch.Tensor, available: Available = kernel_available) -> torch.Tensor:
    """A replacement for ``RMSNorm.forward``: the kernel where it can run, else the module's own code."""
    if available(x, module.weight):
        return rms_norm(x, module.weight, module.eps)
    return RMSNorm.forward(module, x)
