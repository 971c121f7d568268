"""8-bit AdamW (``--optimizer adamw-8bit``): AdamW whose two moments are stored blockwise-quantized
(``blockwise.py``: a signed dynamic map for the first moment, an unsigned one for the second), so
the state is ~2.03 bytes per parameter instead of 8 (fp32) or 4 (bf16 moments).

One update of a parameter p with gradient g (decoupled weight decay, bias-corrected, as
``torch.optim.AdamW``), computed in fp32 whatever p's dtype, ``CHUNK`` elements at a time (whole
blocks), so the fp32 scratch is a few chunk-sized tensors, never p-sized::

    m, v   = deq(m8), deq(v8)
    m      = b1 m + (1 - b1) g
    v      = b2 v + (1 - b2) g^2
    p      = p (1 - lr wd) - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    m8, v8 = q(m), q(v)

``kernel``: "torch" (the reference above), "triton" (``triton_adamw8bit.py``: the same update in
one launch per tensor) or "auto" (default: Triton for CUDA tensors when it imports, else torch).

Tensors with fewer than ``min_8bit_size`` elements (norm weights of small models, biases) keep
fp32 moments: their quantization would save nothing and cost accuracy (bitsandbytes does the same
with the same default, 4096).

State per parameter (``optimizer.state[p]``): ``step`` (int) and either ``m_codes``/``m_absmax``/
``v_codes``/``v_absmax`` (uint8 [numel], fp32 [blocks]) or ``exp_avg``/``exp_avg_sq`` (fp32).
``load_state_dict`` restores every state tensor in its saved dtype, bit for bit (torch's
``Optimizer.load_state_dict`` would cast uint8 codes and fp32 scales to the parameter's dtype).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from . import blockwise

CHUNK = 1 << 22  # elements per fp32 working chunk (a multiple of blockwise.BLOCK)
MIN_8BIT_SIZE = 4096
_CODE_KEYS = ("m_codes", "m_absmax", "v_codes", "v_absmax")


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with blockwise 8-bit moments; the ``torch.optim.AdamW`` hyperparameters."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, min_8bit_size: int = MIN_8BIT_SIZE,
                 kernel: str = "auto") -> None:
        if kernel not in ("auto", "torch", "triton"):
            raise ValueError(f"AdamW8bit kernel {kernel!r}: expected auto, torch or triton")
        if lr <= 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or weight_decay < 0:
            raise ValueError(f"AdamW8bit: bad hyperparameters lr={lr} betas={betas} eps={eps} wd={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.min_8bit_size = int(min_8bit_size)
        self.kernel = kernel
        self._maps: dict[tuple[str, bool], tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ maps per device
    def _map(self, device: torch.device, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        key = (str(device), signed)
        if key not in self._maps:
            qmap = blockwise.dynamic_map(signed, device)
            self._maps[key] = (qmap, blockwise.midpoints(qmap))
        return self._maps[key]

    def quantized(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s moments are stored in 8 bits."""
        return p.numel() >= self.min_8bit_size

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        state["step"] = 0
        if self.quantized(p):
            n, nb = p.numel(), blockwise.n_blocks(p.numel())
            zero_m = int(torch.searchsorted(self._map(p.device, True)[1], torch.zeros((), device=p.device)))
            # Codes of 0 (signed: the middle of the map; unsigned: 0) with absmax 0: exact zeros.
            state["m_codes"] = torch.full((n,), zero_m, dtype=torch.uint8, device=p.device)
            state["m_absmax"] = torch.zeros(nb, dtype=torch.float32, device=p.device)
            state["v_codes"] = torch.zeros(n, dtype=torch.uint8, device=p.device)
            state["v_absmax"] = torch.zeros(nb, dtype=torch.float32, device=p.device)
        else:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        return state

    # ------------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        if p.grad.is_sparse:
            raise RuntimeError("AdamW8bit does not support sparse gradients")
        state = self.state[p] if len(self.state[p]) else self._init_state(p)
        state["step"] += 1
        t = state["step"]
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        hp = (lr, b1, b2, eps, wd, 1.0 - b1**t, (1.0 - b2**t) ** 0.5)
        if not self.quantized(p):
            _adamw_fp32(p, p.grad, state["exp_avg"], state["exp_avg_sq"], *hp)
            return
        if not p.is_contiguous():
            raise RuntimeError("AdamW8bit needs contiguous parameters")
        smap, umap = self._map(p.device, True), self._map(p.device, False)
        if self._use_triton(p):
            from .triton_adamw8bit import adamw8bit_update_triton

            adamw8bit_update_triton(p, p.grad, state, (smap, umap), hp)
            return
        pf, gf = p.view(-1), p.grad.reshape(-1)  # p is contiguous (a parameter); the grad may be a view
        mc, ma, vc, va = (state[k] for k in _CODE_KEYS)
        bs = blockwise.BLOCK
        for lo in range(0, pf.numel(), CHUNK):
            hi = min(lo + CHUNK, pf.numel())
            blo, bhi = lo // bs, blockwise.n_blocks(hi)
            m = blockwise.dequantize(mc[lo:hi], ma[blo:bhi], smap[0])
            v = blockwise.dequantize(vc[lo:hi], va[blo:bhi], umap[0])
            chunk = pf[lo:hi]
            p32 = chunk.float()
            _adamw_fp32(p32, gf[lo:hi], m, v, *hp)
            if p32.data_ptr() != chunk.data_ptr():  # 16-bit p: round the fp32 result once
                chunk.copy_(p32)
            mc[lo:hi], ma[blo:bhi] = blockwise.quantize(m, *smap)
            vc[lo:hi], va[blo:bhi] = blockwise.quantize(v, *umap)

    def _use_triton(self, p: torch.Tensor) -> bool:
        if self.kernel == "torch":
            return False
        from .triton_adamw8bit import triton_available

        if self.kernel == "triton":
            if not triton_available():
                raise RuntimeError("AdamW8bit(kernel='triton'): triton is not installed")
            return True
        return p.is_cuda and triton_available()

    # -------------------------------------------------------------------- state dicts
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loading (groups, ids), then every state value as saved: codes stay uint8 and
        scales fp32 (bit for bit), on the parameter's device."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            if i in saved:
                self.state[p] = {k: v.to(device=p.device, copy=True) if torch.is_tensor(v) else v
                                 for k, v in saved[i].items()}


def _adamw_fp32(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, lr: float, b1: float, b2: float,
                eps: float, wd: float, bc1: float, bc2_sqrt: float) -> None:
    """One AdamW update in place on fp32 ``p``, ``m``, ``v`` (same shape); ``g`` any float dtype.
    The order of operations is torch.optim.AdamW's single-tensor path."""
    g = g.float()
    if wd:
        p.mul_(1.0 - lr * wd)
    m.lerp_(g, 1.0 - b1)
    v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
    denom = (v.sqrt() / bc2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-lr / bc1)


def state_bytes(numel: int, min_8bit_size: int = MIN_8BIT_SIZE) -> int:
    """Bytes of state :class:`AdamW8bit` keeps for one parameter tensor of ``numel`` elements
    (the int ``step`` is not a tensor)."""
    if numel < min_8bit_size:
        return 2 * 4 * numel
    return 2 * blockwise.quantized_bytes(numel)


def scratch_bytes(numel: int) -> int:
    """fp32 working memory of one update of a tensor of ``numel`` elements: dequantized m, v, the
    fp32 parameter, gradient, sqrt and denominator of one chunk, plus the quantizer's int64
    indices and scaled copy (an upper bound)."""
    n = min(numel, CHUNK)
    return n * (6 * 4 + 8 + 4)
