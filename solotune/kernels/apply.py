"""Swap the fused kernels into a built model, per module instance (no class is patched, so other
models in the process are untouched): each ``RMSNorm.forward``, each ``FeedForward.forward``
(``silu(w1 x) * w3 x`` through one kernel) and each ``Attention.rope`` (the hook model.py's
attention calls for RoPE). Every replacement falls back to the reference where the kernel cannot
run (CPU tensors, the planner's fake tensors), so the swap is always safe.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch.nn as nn

from ..model import Attention, FeedForward, RMSNorm


def use_fused_kernels(model: nn.Module, available: Callable[..., bool] | None = None) -> dict[str, int]:
    """Route ``model``'s RMSNorm, SwiGLU and RoPE through the Triton kernels; returns how many
    modules of each kind were swapped. Idempotent. ``available(*tensors)``: whether the kernels
    take these tensors (default ``_triton.kernel_available``: CUDA, or the interpreter)."""
    # Imported here: Triton's import (~0.6 s) and the custom-op registration happen only for a
    # run that asks for the kernels.
    from .rmsnorm import fused_rms_norm_forward
    from .rope import rope
    from .swiglu import fused_feed_forward
    from ._triton import kernel_available

    available = available or kernel_available

    counts = {"rmsnorm": 0, "swiglu": 0, "rope": 0}
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.forward = functools.partial(fused_rms_norm_forward, m, available=available)
            counts["rmsnorm"] += 1
        elif isinstance(m, FeedForward):
            m.forward = functools.partial(fused_feed_forward, m, available=available)
            counts["swiglu"] += 1
        elif isinstance(m, Attention):
            m.rope = functools.partial(rope, available=available)
            counts["rope"] += 1
    return counts


def _no_kernels(model: nn.Module, available: Callable[..., bool] | None = None) -> dict[str, int]:
    return {}


# TrainConfig.kernels -> what it does to the model (train/config.py's KERNELS names these).
KERNEL_SETS: dict[str, Callable[..., dict[str, int]]] = {"off": _no_kernels, "triton": use_fused_kernels}


def apply_kernels(model: nn.Module, kind: str, available: Callable[..., bool] | None = None) -> dict[str, int]:
    """``KERNEL_SETS[kind](model, available)``."""
    try:
        fn = KERNEL_SETS[kind]
    except KeyError:
        raise ValueError(f"unknown kernel set {kind!r}; choose from {', '.join(KERNEL_SETS)}") from None
    return fn(model, available)
