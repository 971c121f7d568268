"""The quantized linear as two ``torch.library`` custom ops, so ``torch.compile`` captures a whole
QLoRA block in one graph (a Python ``autograd.Function`` holding a module would break it) and the
eager path pays one dispatch per call instead of a Python autograd node.

* ``solotune::dequantize(kind, tensors, meta, dtype) -> W' [out, in]``
* ``solotune::quant_linear(x, kind, tensors, meta, dtype) -> x @ W'.T``, whose backward
  dequantizes again (``grad_x = grad_y @ W'``) instead of saving W': nothing of size [out, in]
  outlives the forward, else the 16-bit model would be back between forward and backward.
(QLoRA's storage multiplied in fp8 has its own op: :mod:`solotune.quant.nf4_fp8`.)

``tensors``/``meta`` are what a ``QuantizedLinear`` stores (its ``op_inputs()``); ``kind`` picks
the dequantizer (``nf4``: Triton on CUDA, PyTorch elsewhere; ``int8``). No gradient flows to the
quantized weight.
"""

from __future__ import annotations

from typing import Callable

import torch

from .dequant import dequantize_nf4
from .fp8 import FP8, dequantize_fp8
from .int8 import dequantize_int8
from .nf4 import NF4Weight, tables_on


def nf4_weight(tensors: list[torch.Tensor], meta: list[int]) -> NF4Weight:
    """An ``NF4Linear``'s op inputs (codes, qabsmax, absmax2 bits, offset bits; out, in, blocksize, scale
    blocksize) as an :class:`NF4Weight` (views)."""
    codes, qabsmax, absmax2_bits, offset_bits = tensors[:4]
    out_f, in_f, blocksize, scale_blocksize = meta
    return NF4Weight(codes, qabsmax, absmax2_bits.view(torch.float32), offset_bits.view(torch.float32),
                     torch.Size((out_f, in_f)), blocksize, scale_blocksize, tables_on(codes.device))


def _nf4(tensors: list[torch.Tensor], meta: list[int], dtype: torch.dtype) -> torch.Tensor:
    return dequantize_nf4(nf4_weight(tensors, meta), dtype)


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


__all__ = ["dequantize", "quant_linear", "nf4_weight", "DEQUANTIZERS"]
