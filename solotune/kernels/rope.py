"""Fused RoPE on the adjacent-pair layout of :func:`solotune.model.apply_rope` (dims 2i, 2i+1 of
each head rotate together): one read of x and one write of the result, where the eager path
unbinds, multiplies, stacks and flattens (four [B, T, H, D]-sized intermediates). The backward is
the same kernel rotating by the opposite angle; nothing but cos/sin (shared by every layer) is
saved.

Same arithmetic as the reference: each product rounded to the output dtype (the promotion of x's
and the angles' dtypes), then the sum rounded; fp-fusion is off so fp32 matches bit for bit.
Shapes: x [B, T, H, D] contiguous, cos/sin [B, T, 1, D/2].
"""

from __future__ import annotations

import torch

from ..model import apply_rope
from ._triton import Available, kernel_available, row_block, tl, triton, warps

if triton is not None:

    @triton.jit
    def _rope_kernel(X, COS, SIN, Y, HD, D, sign, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # one (b, t) position: its H heads x D dims
        e = tl.arange(0, BLOCK)
        mask = e < HD
        pair = (e % D) // 2
        odd = (e % 2) == 1
        x = tl.load(X + row * HD + e, mask=mask, other=0.0).to(tl.float32)
        xp = tl.load(X + row * HD + (e ^ 1), mask=mask, other=0.0).to(tl.float32)  # the partner in its pair
        c = tl.load(COS + row * (D // 2) + pair, mask=mask, other=0.0).to(tl.float32)
        s = sign * tl.load(SIN + row * (D // 2) + pair, mask=mask, other=0.0).to(tl.float32)
        out_t = Y.dtype.element_ty
        xc = (x * c).to(out_t).to(tl.float32)
        ps = (xp * s).to(out_t).to(tl.float32)
        # even: x0 cos - x1 sin; odd: x0 sin + x1 cos
        y = tl.where(odd, ps + xc, xc - ps)
        tl.store(Y + row * HD + e, y.to(out_t), mask=mask)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype: torch.dtype, sign: float) -> torch.Tensor:
    B, T, H, D = x.shape
    y = torch.empty((B, T, H, D), dtype=out_dtype, device=x.device)
    if x.numel():
        cs = (cos.expand(B, T, 1, D // 2).contiguous(), sin.expand(B, T, 1, D // 2).contiguous())
        block = row_block(H * D)
        _rope_kernel[(B * T,)](x, cs[0], cs[1], y, H * D, D, sign, BLOCK=block, num_warps=warps(block),
                               enable_fp_fusion=False)
    return y


@torch.library.custom_op("solotune::rope", mutates_args=())
def _rope_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] contiguous, cos/sin [B, T, 1, D/2] -> rotated [B, T, H, D] in promote(x, cos)."""
    return _launch(x, cos, sin, torch.promote_types(x.dtype, cos.dtype), 1.0)


@_rope_op.register_fake
def _(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, cos.dtype))


@torch.library.custom_op("solotune::rope_backward", mutates_args=())
def _rope_backward_op(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, x_dtype: torch.dtype) -> torch.Tensor:
    """The rotation is orthogonal: d x = the rotation of d y by the opposite angle."""
    return _launch(dy.contiguous(), cos, sin, x_dtype, -1.0)


@_rope_backward_op.register_fake
def _(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, x_dtype: torch.dtype) -> torch.Tensor:
    return dy.new_empty(dy.shape, dtype=x_dtype)


def _setup(ctx, inputs, output) -> None:
    x, cos, sin = inputs
    ctx.save_for_backward(cos, sin)
    ctx.x_dtype = x.dtype


def _backward(ctx, dy: torch.Tensor):
    cos, sin = ctx.saved_tensors
    return _rope_backward_op(dy, cos, sin, ctx.x_dtype), None, None  # the angles are not trained


_rope_op.register_autograd(_backward, setup_context=_setup)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, available: Available = kernel_available) -> torch.Tensor:
    """:func:`solotune.model.apply_rope` with the Triton kernel where it can run (the reference
    otherwise, and whenever the angles need a gradient)."""
    if not available(x, cos, sin) or cos.requires_grad or sin.requires_grad:
        return apply_rope(x, cos, sin)
    return _rope_op(x.contiguous(), cos, sin)
