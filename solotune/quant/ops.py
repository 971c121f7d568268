"""The quantized linear as two ``torch.library`` custom ops, so ``torch.compile`` captures a whole
QLoRA block in one graph (a Python ``autograd.Function`` holding a module would break it) and the
eager path pays one dispatch per call instead of a Python autograd node.

* ``solotune::dequantize(kind, tensors, meta, dtype) -> W' [out, in]``
* ``solotune::quant_linear(x, kind, tensors, meta, dtype) -> x @ W'.T``, whose backward
  dequantizes again (``grad_x = grad_y @ W'``) instead of saving W': nothing of size [out, in]
  outlives the forward, else the 16-bit model would be back between forward and backward.
* ``solotune::quant_linear_fp8(x, kind, tensors, meta)``: the same in fp8 GEMMs (W' re-quantized
  per output row to e4m3, x and grad_y per row): QLoRA's storage at the fp8 tensor cores' rate.

``tensors``/``meta`` are what a ``QuantizedLinear`` stores (its ``op_inputs()``); ``kind`` picks
the dequantizer (``nf4``: Triton on CUDA, PyTorch elsewhere; ``int8``). No gradient flows to the
quantized weight.
"""

from __future__ import annotations

from typing import Callable

import torch

from .dequant import dequantize_nf4
from .fp8 import FP8, dequantize_fp8, fp8_input_grad, fp8_product, quantize_fp8
from .int8 import dequantize_int8
from .nf4 import NF4Weight, tables_on


def _nf4(tensors: list[torch.Tensor], meta: list[int], dtype: torch.dtype) -> torch.Tensor:
    codes, qabsmax, absmax2_bits, offset_bits = tensors
    out_f, in_f, blocksize, scale_blocksize = meta
    q = NF4Weight(codes, qabsmax, absmax2_bits.view(torch.float32), offset_bits.view(torch.float32),
                  torch.Size((out_f, in_f)), blocksize, scale_blocksize, tables_on(codes.device))
    return dequantize_nf4(q, dtype)


def _int8(tensors: list[torch.Tensor], meta: list[int], dtype: torch.dtype) -> torch.Tensor:
    qweight, scale_bits = tensors
    return dequantize_int8(qweight, scale_bits.view(torch.float32), dtype)


def _fp8(tensors: list[torch.Tensor], meta: list[int], dtype: torch.dtype) -> torch.Tensor:
    qweight_bits, scale_bits = tensors
    return dequantize_fp8(qweight_bits.view(FP8), scale_bits.view(torch.float32), dtype)


DEQUANTIZERS: dict[str, Callable[[list[torch.Tensor], list[int], torch.dtype], torch.Tensor]] = {
    "nf4": _nf4, "int8": _int8, "fp8": _fp8}


@torch.library.custom_op("solotune::dequantize", mutates_args=())
def dequantize(kind: str, tensors: list[torch.Tensor], meta: list[int], dtype: torch.dtype) -> torch.Tensor:
    return DEQUANTIZERS[kind](tensors, meta, dtype)


@dequantize.register_fake
def _(kind: str, tensors: list[torch.Tensor], meta: list[int], dtype: torch.dtype) -> torch.Tensor:
    return tensors[0].new_empty((meta[0], meta[1]), dtype=dtype)


@torch.library.custom_op("solotune::quant_linear", mutates_args=())
def quant_linear(x: torch.Tensor, kind: str, tensors: list[torch.Tensor], meta: list[int],
                 dtype: torch.dtype) -> torch.Tensor:
    """x [..., in] (in ``dtype``) -> [..., out] in ``dtype``."""
    return torch.nn.functional.linear(x, DEQUANTIZERS[kind](tensors, meta, dtype))


@quant_linear.register_fake
def _(x: torch.Tensor, kind: str, tensors: list[torch.Tensor], meta: list[int], dtype: torch.dtype) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], meta[0]), dtype=dtype)


def _setup_context(ctx, inputs, output) -> None:
    _, ctx.kind, tensors, ctx.meta, ctx.dtype = inputs
    ctx.save_for_backward(*tensors)  # the quantized storage only (views, no copies)


def _backward(ctx, grad_y: torch.Tensor):
    tensors = list(ctx.saved_tensors)  # unpacked once (checkpointing allows one unpack per tensor)
    w = dequantize(ctx.kind, tensors, ctx.meta, ctx.dtype)
    # One gradient per input, lists matched element by element (the quantized storage gets none).
    return grad_y.to(w.dtype).matmul(w), None, [None] * len(tensors), None, None


quant_linear.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------- multiplied in fp8 (nf4-fp8)
def _fp8_weight(kind: str, tensors: list[torch.Tensor], meta: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored weight dequantized (bf16 transient; the custom op, so a traced backward sees one
    opaque call) and re-quantized per output row to e4m3 -> (q, scale)."""
    return quantize_fp8(dequantize(kind, tensors, meta, torch.bfloat16))


@torch.library.custom_op("solotune::quant_linear_fp8", mutates_args=())
def quant_linear_fp8(x: torch.Tensor, kind: str, tensors: list[torch.Tensor], meta: list[int]) -> torch.Tensor:
    """x [..., in] (bf16) -> [..., out] bf16: the stored weight dequantized, re-quantized to fp8 per output
    row, multiplied in fp8 with x quantized per row (:mod:`solotune.quant.fp8`). The backward does the same
    for grad_x; nothing [out, in] outlives either."""
    q, scale = _fp8_weight(kind, tensors, meta)
    return fp8_product(x, q, scale)


@quant_linear_fp8.register_fake
def _(x: torch.Tensor, kind: str, tensors: list[torch.Tensor], meta: list[int]) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], meta[0]))


def _setup_context_fp8(ctx, inputs, output) -> None:
    _, ctx.kind, tensors, ctx.meta = inputs
    ctx.save_for_backward(*tensors)


def _backward_fp8(ctx, grad_y: torch.Tensor):
    tensors = list(ctx.saved_tensors)  # unpacked once (checkpointing allows one unpack per tensor)
    q, scale = _fp8_weight(ctx.kind, tensors, ctx.meta)
    return fp8_input_grad(grad_y, q.t().contiguous(), scale), None, [None] * len(tensors), None


quant_linear_fp8.register_autograd(_backward_fp8, setup_context=_setup_context_fp8)

__all__ = ["dequantize", "quant_linear", "quant_linear_fp8", "DEQUANTIZERS"]
