"""NF4 dequantization in one Triton pass: packed codes + double-quantized scales -> bf16/fp16/fp32.

Each program reads ``BLOCK`` code bytes, their blocks' 8-bit absmax codes and second-level
scales, rebuilds each absmax (``DYN[q] * absmax2 + offset``) and writes ``2 * BLOCK`` values
(high nibble first). The reference is :func:`solotune.quant.nf4.dequantize_nf4_torch`; the two
give the same bits because every product is fp32 and fused multiply-add is switched off
(``enable_fp_fusion=False``: an FMA would round ``DYN[q] * absmax2 + offset`` once, PyTorch twice).
On CPU tensors the kernel runs only under ``TRITON_INTERPRET=1`` (the tests use that).
"""

from __future__ import annotations

import os

import torch

from .._triton import tl, triton, triton_available  # noqa: F401  (the one optional import)

from .nf4 import NF4Weight



if triton is not None:

    @triton.jit
    def _nf4_dequantize_kernel(codes_ptr, qabsmax_ptr, absmax2_ptr, offset_ptr, levels_ptr, dyn_ptr, out_ptr,
                               n_bytes, n_out,
                               BYTES_PER_BLOCK: tl.constexpr, SCALE_BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)  # byte indices
        mask = offs < n_bytes
        byte = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
        blk = offs // BYTES_PER_BLOCK  # the absmax block of both values of this byte
        q = tl.load(qabsmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        a2 = tl.load(absmax2_ptr + blk // SCALE_BLOCKSIZE, mask=mask, other=0.0)
        absmax = tl.load(dyn_ptr + q) * a2 + tl.load(offset_ptr)
        hi = tl.load(levels_ptr + (byte >> 4)) * absmax
        lo = tl.load(levels_ptr + (byte & 15)) * absmax
        vals = tl.interleave(hi, lo)  # [2 * BLOCK]: value 2i from the high nibble, 2i+1 from the low
        out_offs = 2 * pid * BLOCK + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + out_offs, vals.to(out_ptr.dtype.element_ty), mask=out_offs < n_out)


def dequantize_nf4_triton(q: NF4Weight, dtype: torch.dtype = torch.bfloat16, block: int = 1024) -> torch.Tensor:
    """NF4 -> [*shape] in ``dtype`` with the Triton kernel (CUDA tensors, or CPU ones under
    ``TRITON_INTERPRET=1``)."""
    if triton is None:
        raise RuntimeError("triton is not installed; use dequantize_nf4(..., backend='torch')")
    dev = q.codes.device
    if dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"the Triton NF4 kernel needs CUDA tensors (got {dev}) or TRITON_INTERPRET=1")
    if q.blocksize % 2:
        raise ValueError(f"NF4 blocksize must be even, got {q.blocksize}")
    n, n_bytes = q.numel, q.codes.numel()
    if 2 * n_bytes >= 2**31:
        raise ValueError(f"NF4 tensor of {n} values: the kernel indexes with int32 (< 2^31 values)")
    out = torch.empty(n, dtype=dtype, device=dev)
    levels, dyn = q.levels_and_map()
    grid = (triton.cdiv(n_bytes, block),)
    _nf4_dequantize_kernel[grid](
        q.codes, q.qabsmax, q.absmax2, q.offset.to(torch.float32), levels, dyn, out, n_bytes, n,
        BYTES_PER_BLOCK=q.blocksize // 2, SCALE_BLOCKSIZE=q.scale_blocksize, BLOCK=block,
        enable_fp_fusion=False,
    )
    return out.view(q.shape)


__all__ = ["triton_available", "dequantize_nf4_triton"]
