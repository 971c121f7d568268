"""NF4 dequantization in one Triton pass: packed codes + double-quantized scales -> bf16/fp16/fp32,
or straight to float8 e4m3 codes of a per-row scale (``nf4-fp8``: :func:`nf4_to_fp8_triton`).

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


    @triton.jit
    def _nf4_to_fp8_kernel(codes_ptr, qabsmax_ptr, absmax2_ptr, offset_ptr, levels_ptr, dyn_ptr, inv_scale_ptr,
                           out_ptr, n_rows, n_cols, BYTES_PER_BLOCK: tl.constexpr, SCALE_BLOCKSIZE: tl.constexpr,
                           TRANSPOSE: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
        """One [BR, BC] tile of w' * inv_scale[row] (w' as the dequantization above), stored as [out, in]
        or, TRANSPOSE, as [in, out]; BC // 2 code bytes per tile row (n_cols even: no byte spans rows)."""
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        bytes_ = tl.program_id(1) * (BC // 2) + tl.arange(0, BC // 2)
        half = n_cols // 2
        mask = (rows < n_rows)[:, None] & (bytes_ < half)[None, :]
        offs = rows[:, None] * half + bytes_[None, :]  # [BR, BC // 2] flat byte indices
        byte = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
        blk = offs // BYTES_PER_BLOCK
        q = tl.load(qabsmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        a2 = tl.load(absmax2_ptr + blk // SCALE_BLOCKSIZE, mask=mask, other=0.0)
        absmax = tl.load(dyn_ptr + q) * a2 + tl.load(offset_ptr)
        # a multiply by the stored reciprocal (an IEEE division per value ran at half the speed: NOTES)
        inv = tl.load(inv_scale_ptr + rows, mask=rows < n_rows, other=1.0)[:, None]
        hi = (tl.load(levels_ptr + (byte >> 4)) * absmax) * inv
        lo = (tl.load(levels_ptr + (byte & 15)) * absmax) * inv
        vals = tl.interleave(hi, lo).to(out_ptr.dtype.element_ty)  # [BR, BC]: high nibble first
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        omask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
        if TRANSPOSE:
            tl.store(out_ptr + cols[None, :] * n_rows + rows[:, None], vals, mask=omask)
        else:
            tl.store(out_ptr + rows[:, None] * n_cols + cols[None, :], vals, mask=omask)


def _check_runnable(q: NF4Weight) -> None:
    if triton is None:
        raise RuntimeError("triton is not installed; use dequantize_nf4(..., backend='torch')")
    if q.codes.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"the Triton NF4 kernel needs CUDA tensors (got {q.codes.device}) or TRITON_INTERPRET=1")
    if q.blocksize % 2:
        raise ValueError(f"NF4 blocksize must be even, got {q.blocksize}")
    if q.numel >= 2**31:
        raise ValueError(f"NF4 tensor of {q.numel} values: the kernel indexes with int32 (< 2^31 values)")


def nf4_to_fp8_triton(q: NF4Weight, inv_scale: torch.Tensor, transpose: bool = False, dtype: torch.dtype | None = None,
                      block: tuple[int, int] = (128, 128), num_warps: int = 4) -> torch.Tensor:
    """NF4 [out, in] -> w' * inv_scale[:, None] as e4m3 [out, in] (``transpose``: [in, out], the layout the
    backward's GEMM takes) in one pass: 0.5 byte read, 1 written per weight. ``inv_scale`` fp32 [out];
    the tile and warps are the fastest of benchmarks/nf4_fp8_time.py on an H200 (7B shapes, both layouts);
    ``dtype`` (default e4m3) fp32 exposes the values before their rounding (the interpreter's fp8 cast is
    not the GPU's). ``in`` must be even (a code byte never spans two rows)."""
    _check_runnable(q)
    n_rows, n_cols = q.shape
    if n_cols % 2:
        raise ValueError(f"nf4_to_fp8_triton: in_features must be even, got {n_cols}")
    dtype = torch.float8_e4m3fn if dtype is None else dtype
    out = torch.empty((n_cols, n_rows) if transpose else (n_rows, n_cols), dtype=dtype, device=q.codes.device)
    levels, dyn = q.levels_and_map()
    br, bc = block
    grid = (triton.cdiv(n_rows, br), triton.cdiv(n_cols, bc))
    _nf4_to_fp8_kernel[grid](
        q.codes, q.qabsmax, q.absmax2, q.offset.to(torch.float32), levels, dyn, inv_scale, out, n_rows, n_cols,
        BYTES_PER_BLOCK=q.blocksize // 2, SCALE_BLOCKSIZE=q.scale_blocksize, TRANSPOSE=transpose, BR=br, BC=bc,
        num_warps=num_warps, enable_fp_fusion=False,
    )
    return out


def dequantize_nf4_triton(q: NF4Weight, dtype: torch.dtype = torch.bfloat16, block: int = 1024) -> torch.Tensor:
    """NF4 -> [*shape] in ``dtype`` with the Triton kernel (CUDA tensors, or CPU ones under
    ``TRITON_INTERPRET=1``)."""
    _check_runnable(q)
    dev = q.codes.device
    n, n_bytes = q.numel, q.codes.numel()
    out = torch.empty(n, dtype=dtype, device=dev)
    levels, dyn = q.levels_and_map()
    grid = (triton.cdiv(n_bytes, block),)
    _nf4_dequantize_kernel[grid](
        q.codes, q.qabsmax, q.absmax2, q.offset.to(torch.float32), levels, dyn, out, n_bytes, n,
        BYTES_PER_BLOCK=q.blocksize // 2, SCALE_BLOCKSIZE=q.scale_blocksize, BLOCK=block,
        enable_fp_fusion=False,
    )
    return out.view(q.shape)


__all__ = ["triton_available", "dequantize_nf4_triton", "nf4_to_fp8_triton"]
