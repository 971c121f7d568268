"""One Triton pass of the 8-bit AdamW update (``adamw8bit.py``'s ``_update``) per parameter tensor.

Each program owns one quantization block (``blockwise.BLOCK`` = 256 elements of one row; the
state layout of ``adamw8bit.py``: blocks never cross a row, a row's last block may be partial, and
program ``row * blocks_per_row + b`` is the index of its scale in the [rows, blocks_per_row]
absmax): it loads the parameter, gradient, both moments' codes and the block's two absmax scales, dequantizes through
the maps, applies the AdamW update in fp32, writes the parameter back in its dtype, takes the new
block maxima and re-quantizes both moments to the nearest map entry (a binary search over the
255 decision boundaries, the same rule as ``torch.searchsorted`` in ``blockwise.quantize``).
The PyTorch path does the same in ~35 kernel launches per 4 M-element chunk; this is one launch
per tensor and reads/writes each byte once.

Same arithmetic as the PyTorch path (fp32, the same order; fused multiply-add off, correctly
rounded square root), so on the interpreter it agrees with it to the last bit except where a
value sits exactly on a decision boundary; on CUDA PyTorch's own kernels may contract products
into FMAs, so the tests compare within fp32 rounding (tests/optim/test_triton_adamw8bit.py on
CPU under ``TRITON_INTERPRET=1``, tests/optim/test_optim_gpu.py on CUDA).
"""

from __future__ import annotations

import torch

from .._triton import tl, triton, triton_available  # noqa: F401  (the one optional import)

from . import blockwise



if triton is not None:

    @triton.jit
    def _quantize(x, valid, mids_ptr):
        """x [BLOCK] fp32 -> (codes uint8 [BLOCK], absmax): nearest of the 256 map entries."""
        absmax = tl.max(tl.where(valid, tl.abs(x), 0.0), axis=0)
        u = x / tl.maximum(absmax, 1.1754943508222875e-38)
        lo = tl.zeros(x.shape, dtype=tl.int32)  # the number of boundaries strictly below u
        for k in tl.static_range(8):
            cand = lo + (128 >> k)
            mid = tl.load(mids_ptr + cand - 1)
            lo = tl.where(mid < u, cand, lo)
        return lo.to(tl.uint8), absmax

    @triton.jit
    def _adamw8bit_kernel(p_ptr, g_ptr, mc_ptr, ma_ptr, vc_ptr, va_ptr, smap_ptr, smid_ptr, umap_ptr, umid_ptr,
                          cols, nb, lr, one_minus_b1, b2, one_minus_b2, eps, decay, step_size, bc2_sqrt,
                          BLOCK: tl.constexpr):
        pid = tl.program_id(0)  # = row * nb + block: also the block's scale index
        row = pid // nb
        col = (pid - row * nb) * BLOCK + tl.arange(0, BLOCK)
        valid = col < cols
        offs = row.to(tl.int64) * cols + col
        p = tl.load(p_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        mcode = tl.load(mc_ptr + offs, mask=valid, other=0).to(tl.int32)
        vcode = tl.load(vc_ptr + offs, mask=valid, other=0).to(tl.int32)
        m = tl.load(smap_ptr + mcode) * tl.load(ma_ptr + pid)
        v = tl.load(umap_ptr + vcode) * tl.load(va_ptr + pid)
        p = p * decay
        m = m + one_minus_b1 * (g - m)  # torch's lerp for weight < 0.5
        v = v * b2 + one_minus_b2 * g * g
        denom = tl.sqrt_rn(v) / bc2_sqrt + eps
        p = p + step_size * (m / denom)
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=valid)
        mq, mmax = _quantize(tl.where(valid, m, 0.0), valid, smid_ptr)
        vq, vmax = _quantize(tl.where(valid, v, 0.0), valid, umid_ptr)
        tl.store(mc_ptr + offs, mq, mask=valid)
        tl.store(vc_ptr + offs, vq, mask=valid)
        tl.store(ma_ptr + pid, mmax)
        tl.store(va_ptr + pid, vmax)


def adamw8bit_update_triton(p: torch.Tensor, grad: torch.Tensor, state: dict, maps: tuple, hp: tuple) -> None:
    """In place: ``p`` (contiguous, >= 2-D: rows of cols), its 8-bit ``state`` (m_codes, v_codes
    shaped like p; m_absmax, v_absmax [rows, ceil(cols / BLOCK)]; plain local tensors);
    ``maps`` = ((signed map, boundaries), (unsigned map, boundaries)) on p's device; ``hp`` =
    (lr, b1, b2, eps, wd, 1 - b1^t, sqrt(1 - b2^t))."""
    lr, b1, b2, eps, wd, bc1, bc2_sqrt = hp
    (smap, smid), (umap, umid) = maps
    rows, cols = blockwise.row_shape(p.shape)
    nb = blockwise.n_blocks(cols)
    if tuple(state["m_absmax"].shape) != (rows, nb):
        raise ValueError(f"8-bit state scales {tuple(state['m_absmax'].shape)} for a {tuple(p.shape)} tensor")
    grid = (rows * nb,)
    _adamw8bit_kernel[grid](p, grad.reshape(-1).contiguous(), state["m_codes"], state["m_absmax"], state["v_codes"],
                            state["v_absmax"], smap, smid, umap, umid, cols, nb, lr, 1.0 - b1, b2, 1.0 - b2, eps,
                            1.0 - lr * wd, -lr / bc1, bc2_sqrt, BLOCK=blockwise.BLOCK, enable_fp_fusion=False)
