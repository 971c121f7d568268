"""Shared by the CPU (interpreter) and GPU kernel tests: each kernel and its reference on the same
inputs, the values and the gradients of both, and the worst relative error (max |diff| / max |ref|)
of each output. Shapes are small on CPU; the GPU tests pass 7B-sized ones."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from solotune.kernels.rmsnorm import rms_norm
from solotune.kernels.rope import rope
from solotune.kernels.swiglu import swiglu
from solotune.model import RMSNorm, apply_rope, rope_cos_sin


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref64, got64 = ref.double(), got.double()
    return float((got64 - ref64).abs().max() / ref64.abs().max().clamp_min(1e-30))


def _compare(fn_kernel, fn_ref, inputs: list[torch.Tensor], grad_out_seed: int = 7) -> dict[str, float]:
    """Run both on leaf copies of ``inputs``; backward from one shared random grad_out."""
    outs, grads = [], []
    for fn in (fn_kernel, fn_ref):
        xs = [t.detach().clone().requires_grad_(t.is_floating_point() and t.requires_grad) for t in inputs]
        y = fn(*xs)
        g = torch.Generator(device=y.device).manual_seed(grad_out_seed)
        dy = torch.randn(y.shape, generator=g, device=y.device, dtype=torch.float32).to(y.dtype)
        y.backward(dy)
        outs.append(y.detach())
        grads.append([x.grad for x in xs if x.requires_grad])
    res = {"y": _rel(outs[0], outs[1]), "y_dtype_ok": float(outs[0].dtype == outs[1].dtype)}
    for i, (gk, gr) in enumerate(zip(grads[0], grads[1])):
        res[f"grad{i}"] = _rel(gk, gr)
        res[f"grad{i}_dtype_ok"] = float(gk.dtype == gr.dtype)
    return res


def rmsnorm_case(rows: int, dim: int, x_dtype: torch.dtype, w_dtype: torch.dtype, device: str) -> dict[str, float]:
    g = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(rows, dim, generator=g, device=device) * 3).to(x_dtype).requires_grad_(True)
    w = (1 + 0.1 * torch.randn(dim, generator=g, device=device)).to(w_dtype).requires_grad_(True)
    return _compare(lambda x, w: rms_norm(x.view(2, -1, dim), w, 1e-5).view(rows, dim),
                    lambda x, w: _ref_rms(x, w, 1e-5), [x, w])


def _ref_rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """model.RMSNorm.forward with a given weight tensor (the module's code on a stand-in)."""
    m = RMSNorm.__new__(RMSNorm)
    torch.nn.Module.__init__(m)
    m.eps = eps
    m.weight = w  # a plain attribute on the stand-in: the reference's arithmetic, autograd through w
    return RMSNorm.forward(m, x)


def swiglu_case(n: int, hidden: int, dtype: torch.dtype, device: str) -> dict[str, float]:
    g = torch.Generator(device=device).manual_seed(1)
    a = (torch.randn(n, hidden, generator=g, device=device) * 2).to(dtype).requires_grad_(True)
    b = torch.randn(n, hidden, generator=g, device=device).to(dtype).requires_grad_(True)
    return _compare(swiglu, lambda a, b: F.silu(a) * b, [a, b])


def rope_case(B: int, T: int, H: int, D: int, x_dtype: torch.dtype, angle_dtype: torch.dtype,
              device: str) -> dict[str, float]:
    g = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(B, T, H, D, generator=g, device=device).to(x_dtype).requires_grad_(True)
    positions = torch.randint(0, 4096, (B, T), generator=g, device=device)
    cos, sin = rope_cos_sin(positions, D, 10000.0, angle_dtype)
    return _compare(lambda x: rope(x, cos, sin), lambda x: apply_rope(x, cos, sin), [x])
