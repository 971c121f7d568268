"""Fused Triton kernels (RMSNorm, SwiGLU, RoPE) with the PyTorch references of ``solotune.model``
as their CPU path; ``apply.use_fused_kernels(model)`` swaps them into a built model. Each kernel is
a ``torch.library.custom_op`` (with its autograd and fake implementations) so ``torch.compile``
keeps it as one opaque op instead of breaking the graph."""

from .apply import KERNEL_SETS, apply_kernels, use_fused_kernels
from .rmsnorm import rms_norm
from .rope import rope
from .swiglu import swiglu
from ._triton import kernel_available, triton_available

__all__ = ["KERNEL_SETS", "apply_kernels", "use_fused_kernels", "rms_norm", "rope", "swiglu",
           "kernel_available", "triton_available"]
