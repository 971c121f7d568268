"""A frozen float8 (e4m3) weight computed in float8: both matmuls of a LoRA base on Hopper's fp8
tensor cores (about twice the bf16 rate) instead of 16-bit ones.

Format: w [out, in] -> q = w / s in ``float8_e4m3fn`` (3 mantissa bits, max 448), s fp32 [out] =
max_j |w_ij| / 448, one scale per output channel; w' = q * s. The activations are quantized the
same way per row on every call (``quantize_rows``): x [M, in] -> (x / a) in e4m3, a fp32 [M, 1].

Forward  y = (xq @ q.T) * a * s.T               [M, out]   one fp8 GEMM, K = in
Backward dx = ((dy * s.T)q @ q) * b              [M, in]    one fp8 GEMM, K = out
The output-channel scale lies along the backward's contraction, so it is folded into dy before
dy is quantized per row (b). cuBLAS's fp8 GEMM takes K-major operands only ("TN"), so the weight
is kept twice, as q [out, in] for the forward and q.T contiguous [in, out] for the backward: 2
bytes per weight, a 16-bit model's memory (``fp8``: the gain is speed, not bytes) — or once, with
the backward transposing q into a transient (``fp8-lean``: 1 byte per weight, one extra read and
write of each weight per backward). Nothing of the
activations is saved for backward (the weight is frozen: only dx is needed).

Error: e4m3 rounds to nearest with a relative step of at most 2^-3, so per element
|x - x'| <= 2^-4 |x| + 2^-10 a (the last term for subnormals) and likewise for w with s; the
product's error follows term by term (tests/quant/test_fp8.py checks that bound). On Gaussian
data the output is off by ~3-4% of its RMS (bf16: ~0.3%; NF4 ~10% per weight).

``torch._scaled_mm`` (rowwise scales, bf16 output) runs the GEMMs on CUDA GPUs of compute
capability >= 8.9; elsewhere (CPU, older GPUs, other dtypes, dims not multiples of 16) the same
quantized values are multiplied in fp32 (the reference path: the same formula; a CPU's row
quantization may round an odd element differently from the GPU's, so the two agree to the
quantization error, not bit for bit).
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(float8_e4m3fn).max
MIN_ABSMAX = 1e-12  # an all-zero row's absmax becomes this (its codes are all zero either way)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] float -> (codes e4m3 [..., K], scale fp32 [..., 1]) with x ~= codes * scale,
    one absmax scale per row (the last dim)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 (fp64 stays fp64: the reference tests)
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=MIN_ABSMAX) / FP8_MAX
    return (xf / scale).to(FP8), scale.float()


@torch.no_grad()
def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] float -> (q e4m3 [out, in], scale fp32 [out])."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_fp8: expected a floating-point [out, in] weight, got {w.dtype} {list(w.shape)}")
    q, scale = quantize_rows(w)
    return q, scale.squeeze(1)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """q e4m3 [out, in], scale fp32 [out] -> [out, in] in ``dtype`` (product in fp32, one rounding)."""
    return (q.float() * scale[:, None]).to(dtype)


def fp8_weight_bytes(out_features: int, in_features: int, transposed: bool = True) -> int:
    """Bytes of an fp8 base: the codes (twice with the transposed layout kept) + an fp32 scale per output channel."""
    return (2 if transposed else 1) * out_features * in_features + 4 * out_features


def scaled_mm_available(a: torch.Tensor, b_t: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Can ``torch._scaled_mm`` multiply a [M, K] by b_t.T (b_t [N, K]) with rowwise scales here?
    CUDA with compute capability >= 8.9, a bf16 output, K and N multiples of 16."""
    if a.device.type != "cuda" or out_dtype != torch.bfloat16 or not hasattr(torch, "_scaled_mm"):
        return False
    if a.shape[-1] % 16 or b_t.shape[0] % 16:
        return False
    return torch.cuda.get_device_capability(a.device) >= (8, 9)


def scaled_matmul(a: torch.Tensor, a_scale: torch.Tensor, b_t: torch.Tensor, b_scale: torch.Tensor,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """(a * a_scale) @ (b_t * b_scale[:, None]).T -> [M, N] in ``out_dtype``.

    a e4m3 [M, K] with a_scale fp32 [M, 1]; b_t e4m3 [N, K] (K contiguous) with b_scale fp32 [N]."""
    if scaled_mm_available(a, b_t, out_dtype):
        return torch._scaled_mm(a, b_t.t(), scale_a=a_scale, scale_b=b_scale.view(1, -1), out_dtype=out_dtype)
    acc = torch.float64 if out_dtype == torch.float64 else torch.float32
    with torch.autocast(a.device.type, enabled=False):  # the reference product stays in fp32 under autocast
        return ((a.to(acc) @ b_t.to(acc).t()) * a_scale.to(acc) * b_scale.to(acc)).to(out_dtype)


def fp8_product(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The forward: x [..., in] quantized per row, times (q * scale[:, None]).T -> [..., out] in x's dtype."""
    xq, xs = quantize_rows(x.reshape(-1, x.shape[-1]))
    return scaled_matmul(xq, xs, q, scale, x.dtype).view(*x.shape[:-1], q.shape[0])


def fp8_input_grad(grad_y: torch.Tensor, q_t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The backward's grad_x [..., in] from grad_y [..., out]: the output-channel scale folded into grad_y
    before it is quantized per row (fp32 or wider), times q (q_t = q.T contiguous [in, out])."""
    gq, gs = quantize_rows(grad_y.reshape(-1, grad_y.shape[-1]) * scale)
    ones = torch.ones(q_t.shape[0], dtype=torch.float32, device=q_t.device)
    return scaled_matmul(gq, gs, q_t, ones, grad_y.dtype).view(*grad_y.shape[:-1], q_t.shape[0])


class Fp8LinearFn(torch.autograd.Function):
    """y = x @ w'.T through fp8 GEMMs; x [..., in] -> [..., out] in x's dtype. Traceable by dynamo
    (tensors only), so Inductor fuses the per-row quantization of x and dy into their neighbours."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor, q_t: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
        ctx.transpose = q_t is None  # the lean layout: the backward makes q.T itself
        ctx.save_for_backward(q if q_t is None else q_t, scale)  # the stored weight only: nothing [M, *] is kept
        return fp8_product(x, q, scale)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        q_t, scale = ctx.saved_tensors
        if ctx.transpose:  # one [in, out] fp8 transient (1 byte per weight) for this matmul
            q_t = q_t.t().contiguous()
        return fp8_input_grad(grad_y, q_t, scale), None, None, None


def fp8_linear(x: torch.Tensor, q: torch.Tensor, q_t: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """x [..., in] -> [..., out] = x @ (q * scale[:, None]).T with x (and, in backward, dy) in fp8.
    q e4m3 [out, in], q_t = q.T contiguous [in, out] (None: the backward transposes q), scale fp32 [out]."""
    return Fp8LinearFn.apply(x, q, q_t, scale)


__all__ = ["FP8", "FP8_MAX", "MIN_ABSMAX", "quantize_rows", "quantize_fp8", "dequantize_fp8", "fp8_weight_bytes",
           "scaled_mm_available", "scaled_matmul", "fp8_product", "fp8_input_grad", "fp8_linear"]
