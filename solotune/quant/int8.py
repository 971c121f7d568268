"""int8 weights with one absmax scale per output channel (the vector-wise half of LLM.int8,
Dettmers et al. 2022, without the outlier decomposition).

w [out, in] -> q int8 [out, in] = round(w / s), s fp32 [out] = max_j |w_ij| / 127; w' = q * s.
Error: |w_ij - w'_ij| <= s_i / 2 (round to nearest), so for y = w x,
|y_i - y'_i| <= s_i / 2 * ||x||_1 (tests/quant/test_int8.py checks exactly this bound).
1 byte per weight + 4 bytes per output channel.
"""

from __future__ import annotations

import torch

_CHUNK_ROWS = 4096  # rows per step: bounds the fp32 transient of a large weight


@torch.no_grad()
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] float -> (q int8 [out, in], scale fp32 [out]); a zero row gets scale 0."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_int8: expected a floating-point [out, in] weight, got {w.dtype} {list(w.shape)}")
    scale = w.abs().amax(dim=1).float() / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    for s in range(0, w.shape[0], _CHUNK_ROWS):
        rows = w[s:s + _CHUNK_ROWS].float() / safe[s:s + _CHUNK_ROWS, None]
        q[s:s + _CHUNK_ROWS] = rows.round().clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """q int8 [out, in], scale fp32 [out] -> [out, in] in ``dtype`` (product in fp32, one rounding)."""
    return (q.float() * scale[:, None]).to(dtype)


def int8_weight_bytes(out_features: int, in_features: int) -> int:
    """Bytes of an int8 weight: one per value + an fp32 scale per output channel."""
    return out_features * in_features + 4 * out_features


__all__ = ["quantize_int8", "dequantize_int8", "int8_weight_bytes"]
