"""Fused Triton kernels (RMSNorm ``rmsnorm.py``, SwiGLU ``swiglu.py``, RoPE ``rope.py``) with the
PyTorch references of ``solotune.model`` as their CPU path; :func:`use_fused_kernels` swaps them
into a built model. Each kernel is a ``torch.library.custom_op`` (with its autograd and fake
implementations) so ``torch.compile`` keeps it as one opaque op instead of breaking the graph.
Importing this package does not import Triton; the kernel modules do."""

from .apply import KERNEL_SETS, apply_kernels, use_fused_kernels

__all__ = ["KERNEL_SETS", "apply_kernels", "use_fused_kernels"]
