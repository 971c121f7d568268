"""QLoRA's NF4 storage multiplied in float8 (``--quantize nf4-fp8``): each call turns the NF4 codes
straight into e4m3 codes (one pass: 0.5 byte read, 1 byte written per weight) and runs the fp8
GEMM of :mod:`solotune.quant.fp8`; the activations and output gradients are quantized per row as
there, by traced PyTorch ops (so Inductor fuses them into their neighbours).

Format: w' = the NF4 dequantization (fp32, :func:`solotune.quant.nf4.dequantize_nf4_torch`);
s fp32 [out] = max_j |w'_ij| / 448 and its reciprocal, computed once when the weight is stored
(:func:`nf4_row_scales`); q = w' * (1/s) in e4m3, made per call ([out, in] for the forward, [in, out]
for the backward). These are ``quantize_fp8(w')``'s codes but for the multiply by 1/s instead of a
division by s (one fp32 rounding apart: a code differs where w'/s lies within an ulp of an e4m3
rounding boundary, a few per million; tests/quant/test_fp8.py); the multiply runs the kernel at twice
the speed (benchmarks/results/frontier6-h200/run2/nf4_fp8_time.log). Nothing weight-sized outlives a
call (the e4m3 transient: 1 byte per weight of the one linear being multiplied).
"""

from __future__ import annotations

import torch

from .dequant import dequantize_nf4
from .fp8 import FP8, FP8_MAX, MIN_ABSMAX, fp8_input_grad, fp8_product
from .nf4 import NF4Weight, dequantize_nf4_torch
from .ops import nf4_weight
from .triton_nf4 import nf4_to_fp8_triton, triton_available


@torch.no_grad()
def nf4_row_scales(q: NF4Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, 1 / scale) fp32 [out]: each row's absmax of the dequantized weight / 448 (``quantize_rows``'
    rule). One fp32 transient of the whole weight, once, when the weight is stored."""
    w = dequantize_nf4(q, torch.float32)
    scale = w.abs_().amax(dim=1).clamp(min=MIN_ABSMAX) / FP8_MAX
    return scale, 1.0 / scale


def nf4_to_fp8_torch(q: NF4Weight, inv_scale: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """The PyTorch path (CPU; the Triton kernel's reference): w' * inv_scale[:, None] -> e4m3 [out, in] (or [in, out])."""
    codes = dequantize_nf4_torch(q, torch.float32) * inv_scale[:, None]
    return (codes.t().contiguous() if transpose else codes).to(FP8)


def nf4_to_fp8(q: NF4Weight, inv_scale: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """e4m3 codes of the NF4 weight times the rows' 1 / scale: the Triton kernel on CUDA (even ``in``), else PyTorch;
    the two give the same bits (tests/quant/test_quant_gpu.py)."""
    if q.codes.is_cuda and triton_available() and q.shape[1] % 2 == 0:
        return nf4_to_fp8_triton(q, inv_scale, transpose)
    return nf4_to_fp8_torch(q, inv_scale, transpose)


@torch.library.custom_op("solotune::nf4_to_fp8", mutates_args=())
def nf4_to_fp8_codes(stored: list[torch.Tensor], meta: list[int], transpose: bool) -> torch.Tensor:
    """stored = (codes, qabsmax, absmax2 bits, offset bits, row-scale bits, inverse row-scale bits), meta =
    (out, in, blocksize, scale blocksize) -> e4m3 [out, in] (``transpose``: [in, out])."""
    return nf4_to_fp8(nf4_weight(stored, meta), stored[5].view(torch.float32), transpose)


@nf4_to_fp8_codes.register_fake
def _(stored: list[torch.Tensor], meta: list[int], transpose: bool) -> torch.Tensor:
    shape = (meta[1], meta[0]) if transpose else (meta[0], meta[1])
    return stored[0].new_empty(shape, dtype=FP8)


class NF4Fp8LinearFn(torch.autograd.Function):
    """y = x @ (q * s[:, None]).T through fp8 GEMMs, q made from the NF4 storage on each call (forward:
    [out, in]; backward: [in, out]) by the ``solotune::nf4_to_fp8`` op. x [..., in] -> [..., out] bf16.
    Saves the stored tensors only (views): nothing [M, *] and nothing [out, in]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, codes: torch.Tensor, qabsmax: torch.Tensor, absmax2_bits: torch.Tensor,
                offset_bits: torch.Tensor, scale_bits: torch.Tensor, inv_scale_bits: torch.Tensor,
                meta: tuple[int, ...]) -> torch.Tensor:
        stored = [codes, qabsmax, absmax2_bits, offset_bits, scale_bits, inv_scale_bits]
        ctx.meta = meta
        ctx.save_for_backward(*stored)
        return fp8_product(x, nf4_to_fp8_codes(stored, list(meta), False), scale_bits.view(torch.float32))

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        stored = list(ctx.saved_tensors)
        q_t = nf4_to_fp8_codes(stored, list(ctx.meta), True)
        return (fp8_input_grad(grad_y, q_t, stored[4].view(torch.float32)),) + (None,) * 7


def nf4_fp8_linear(x: torch.Tensor, stored: list[torch.Tensor], meta: list[int]) -> torch.Tensor:
    """x [..., in] bf16 -> [..., out] bf16 over an NF4 weight with its row scales (``stored``, ``meta`` as
    :func:`nf4_to_fp8_codes` takes them)."""
    return NF4Fp8LinearFn.apply(x, *stored, tuple(meta))


__all__ = ["nf4_row_scales", "nf4_to_fp8_torch", "nf4_to_fp8", "nf4_to_fp8_codes", "NF4Fp8LinearFn", "nf4_fp8_linear"]
