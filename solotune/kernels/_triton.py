"""Where the fused kernels may run: Triton imported, and CUDA tensors (or CPU ones under
``TRITON_INTERPRET=1``, which the tests use). Every kernel's public function falls back to the
PyTorch reference (model.py's code) otherwise, so a CPU run with ``kernels="triton"`` is the
reference run."""

from __future__ import annotations

import os
from typing import Callable

import torch

from .._triton import tl, triton, triton_available  # noqa: F401  (the one optional import)



def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# (*tensors) -> whether the kernels take them; the planner's dry run passes one that always says
# yes, so its fake tensors go through the ops' fake implementations as CUDA tensors would.
Available = Callable[..., bool]


def kernel_available(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernels can take these tensors: CUDA ones, or CPU ones under the
    interpreter (anything else, fake CPU tensors of a torch.compile trace included, takes the
    reference path)."""
    if triton is None:
        return False
    return all(t.is_cuda or (interpreting() and t.device.type == "cpu") for t in tensors)


def row_block(n: int) -> int:
    """The power-of-two block that holds a whole row of ``n`` elements."""
    return triton.next_power_of_2(n)


def warps(block: int) -> int:
    """Warps for a program that holds ``block`` elements (a whole row): 8-16 elements per thread."""
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def programs(n_rows: int, device: torch.device) -> int:
    """How many persistent programs reduce over rows (the weight gradient's partial sums): a few
    per SM on CUDA, a handful in the interpreter."""
    if device.type == "cuda":
        return max(1, min(n_rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(n_rows, 4))


__all__ = ["Available", "triton", "tl", "triton_available", "interpreting", "kernel_available", "row_block", "warps", "programs"]
