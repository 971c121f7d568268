"""NF4 dequantization: the Triton kernel on CUDA when Triton is installed, else the PyTorch path
(the two give the same bits; tests/quant/test_triton_nf4.py, test_quant_gpu.py)."""

from __future__ import annotations

import torch

from .nf4 import NF4Weight, dequantize_nf4_torch
from .triton_nf4 import dequantize_nf4_triton, triton_available


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype = torch.bfloat16, backend: str = "auto") -> torch.Tensor:
    """NF4 -> [*shape] in ``dtype``. ``backend``: ``torch``, ``triton`` (CUDA tensors, needs
    Triton) or ``auto`` (Triton on CUDA when it is installed, else PyTorch). Both give the same
    bits (tests/quant/test_triton_nf4.py)."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"NF4 dequantize backend {backend!r}: expected auto, torch or triton")
    if backend != "torch" and q.codes.is_cuda:
        if triton_available():
            return dequantize_nf4_triton(q, dtype)
        if backend == "triton":
            raise RuntimeError("NF4 backend 'triton' asked for, but triton is not importable")
    elif backend == "triton" and not q.codes.is_cuda:
        return dequantize_nf4_triton(q, dtype)  # CPU tensors: only under TRITON_INTERPRET=1
    return dequantize_nf4_torch(q, dtype)


__all__ = ["dequantize_nf4"]
