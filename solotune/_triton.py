"""Triton, when it is installed: the one place that imports it. Every kernel in the package
(``quant/triton_nf4.py``, ``optim/triton_adamw8bit.py``, ``kernels/``) has a PyTorch path that
covers CPU and machines without Triton, so the import is optional."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None


def triton_available() -> bool:
    """Triton imports (its kernels also need CUDA tensors, or ``TRITON_INTERPRET=1`` on CPU)."""
    return triton is not None


__all__ = ["triton", "tl", "triton_available"]
