"""Attention forms for training batches, chosen from the batch by ``Transformer.forward``.

* one document per row: plain causal SDPA (``mask=None`` in the blocks; flash attention on CUDA);
* several documents per row (packing), on CUDA with ``torch.nn.attention.varlen``: :class:`Varlen`,
  flash attention over the flattened [B * T] tokens with the documents' boundaries — no mask;
* several documents per row elsewhere: the exact dense block-diagonal mask (``model.document_mask``),
  [B, 1, T, T] bool, through SDPA (CPU, old torch).

Shapes: B rows, T tokens per row, H query heads, Hkv key/value heads, D head dim.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_FLASH_DTYPES = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def _varlen_fn():
    """torch's public varlen flash attention and how this version spells causal, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.9
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        return varlen_attn, {"window_size": (-1, 0)}
    if "is_causal" in params:
        return varlen_attn, {"is_causal": True}
    return None


def varlen_available(device: torch.device) -> bool:
    """Varlen flash attention runs here: a CUDA device and a torch that has it."""
    return device.type == "cuda" and _varlen_fn() is not None


def block_causal_mask(doc: torch.Tensor) -> torch.Tensor:
    """doc [B, T] (each token's document index within its row) -> [B, 1, T, T] bool: a token
    attends to earlier tokens of its own document only."""
    T = doc.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def pad_segments(cu_seqlens: torch.Tensor, min_len: int = 8) -> torch.Tensor:
    """cu_seqlens int32 [N + 1] -> the same boundaries with empty segments appended (the total
    repeated) up to the next power of two >= max(N + 1, min_len) entries: the document count changes
    from micro-batch to micro-batch, and a few bucketed lengths keep the compiled blocks' shapes
    (and any CUDA graphs recorded for them) to a few instead of one per count."""
    n = cu_seqlens.numel()
    size = max(min_len, 1 << (n - 1).bit_length())
    return torch.cat([cu_seqlens, cu_seqlens[-1:].expand(size - n)]) if size > n else cu_seqlens


@dataclass(frozen=True)
class Varlen:
    """Block-diagonal causal attention over the flattened rows of a packed batch.

    cu_seqlens: int32 [N + 1] on the device: cumulative document lengths over the B * T tokens, a
        row's trailing padding being one more segment (``Batch.cu_seqlens``), possibly followed by
        empty segments (:func:`pad_segments`).
    max_len: an upper bound of the longest segment (T: a segment never crosses a row).
    """

    cu_seqlens: torch.Tensor
    max_len: int

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, T, H, D], k/v [B, T, Hkv, D] (Hkv already repeated to H) -> [B, T, H, D]."""
        B, T, H, D = q.shape
        if q.dtype not in _FLASH_DTYPES:
            dev = q.device.type
            if not torch.is_autocast_enabled(dev):
                return self._dense(q, k, v)  # fp32/fp64 weights without autocast: flash cannot
            dtype = torch.get_autocast_dtype(dev)  # as SDPA would under autocast
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        fn, causal = _varlen_fn()
        y = fn(q.reshape(B * T, H, D), k.reshape(B * T, -1, D), v.reshape(B * T, -1, D),
               self.cu_seqlens, self.cu_seqlens, self.max_len, self.max_len, **causal)
        return y.view(B, T, H, D)

    def _dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The same attention through SDPA with the block-diagonal causal mask [B, 1, T, T]."""
        B, T = q.shape[:2]
        token = torch.arange(B * T, device=q.device)
        mask = block_causal_mask(torch.searchsorted(self.cu_seqlens[1:].long(), token, right=True).view(B, T))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return y.transpose(1, 2)


__all__ = ["Varlen", "block_causal_mask", "pad_segments", "varlen_available"]
