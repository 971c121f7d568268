"""Static KV cache for generation: preallocated buffers written at *tensor* slot positions.

Shapes: B batch, T new tokens, S = ``max_len`` cache slots, H query heads, Hkv key/value heads,
D head dim.

Every decode step has the same shapes whatever the position: the step writes its keys with
``index_copy_`` at ``slot + arange(T)`` (a tensor, so no Python int reaches the graph) and attends
over all S slots, the ones after the query hidden by a mask built from the same tensor. That is
what lets one decode step be captured once by ``torch.compile(mode="reduce-overhead")`` (CUDA
graphs) and replayed for every token. Slots that were never written (zeros) or hold a previous
call's keys are masked out, so buffers can be reused without clearing.

Prefill into an empty cache (``cache_pos`` the Python int 0) attends over the T fresh keys only,
so an unpadded prompt runs plain causal SDPA (flash attention on CUDA).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

CachePos = int | torch.Tensor  # slot of the first of the T new tokens: an int, or a 0-dim long tensor


def is_prefill(cache_pos: CachePos | None) -> bool:
    """True when the keys of this call are all there is: no cache, or the first write (int 0)."""
    return cache_pos is None or (isinstance(cache_pos, int) and cache_pos == 0)


class KVCache(nn.Module):
    """Keys and values of every slot: k/v [B, Hkv, max_len, D], allocated once.

    Slots are absolute indices into the (left-padded) batch; which slots a query may read is
    decided by the mask (:func:`generation_mask`), never by slicing.
    """

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None) -> None:
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def matches(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> bool:
        return (self.k.shape[0] == batch and self.max_len == max_len and self.k.dtype == dtype
                and self.k.device == torch.device(device))

    def write(self, cache_pos: CachePos, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k/v [B, Hkv, T, D] at slots [cache_pos, cache_pos + T)."""
        T = k.shape[2]
        if isinstance(cache_pos, int):
            if cache_pos + T > self.max_len:
                raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {cache_pos + T}")
            self.k[:, :, cache_pos:cache_pos + T] = k
            self.v[:, :, cache_pos:cache_pos + T] = v
            return
        slots = cache_pos + torch.arange(T, device=k.device)  # tensor slots: one graph for every position
        self.k.index_copy_(2, slots, k.to(self.k.dtype))
        self.v.index_copy_(2, slots, v.to(self.v.dtype))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_pos: CachePos,
               mask: torch.Tensor | None) -> torch.Tensor:
        """Write k/v [B, Hkv, T, D] at ``cache_pos`` and attend q [B, H, T, D] -> [B, H, T, D].

        Prefill (``cache_pos`` int 0): over the T fresh keys, ``mask`` None (plain causal) or
        [B, 1, T, T]. Otherwise over all S slots with ``mask`` [B, 1, T, S] (True = attend).
        """
        self.write(cache_pos, k, v)
        if is_prefill(cache_pos):
            return _sdpa_fresh(q, k, v, mask)
        return grouped_sdpa(q, self.k, self.v, mask)


def _sdpa_fresh(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention over the T fresh keys (GQA by repeating them: T keys, cheap)."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [B, H, T, D] over k/v [B, Hkv, S, D] with mask [B, 1, T, S] -> [B, H, T, D].

    GQA without copying the cache: the ``rep = H / Hkv`` query heads that share a KV head (heads
    j*rep .. j*rep + rep - 1, as ``repeat_interleave`` pairs them) become ``rep * T`` query rows of
    that head, each row keeping its token's mask row.
    """
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    rep = H // Hkv
    if rep == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    qg = q.reshape(B, Hkv, rep * T, D)
    mg = mask[:, :, None].expand(B, 1, rep, T, mask.shape[-1]).reshape(B, 1, rep * T, mask.shape[-1])
    return F.scaled_dot_product_attention(qg, k, v, attn_mask=mg).reshape(B, H, T, D)


def generation_mask(B: int, T: int, cache_pos: CachePos | None, key_mask: torch.Tensor | None,
                    n_slots: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean attention mask for generation (True = attend), or None when plain causal suffices.

    Prefill / no cache (:func:`is_prefill`): [B, 1, T, T] over these T tokens, None without padding
    (so SDPA may pick flash attention). Otherwise [B, 1, T, n_slots] over every cache slot: causal
    by slot index (``cache_pos + t`` for query t, a tensor or an int), ``key_mask`` [B, S' >= n_slots]
    (False = padding) applied. A padding query whose every key is masked would give NaN: it sees itself.
    """
    if is_prefill(cache_pos):
        if key_mask is None:
            return None
        q_slot = torch.arange(T, device=device)[:, None]
        S = T
    else:
        if n_slots is None:
            raise RuntimeError("cache_pos given but no KV cache: call model.setup_cache(batch, max_len) first")
        q_slot = (cache_pos + torch.arange(T, device=device))[:, None]
        S = n_slots
    k_slot = torch.arange(S, device=device)[None, :]
    m = (k_slot <= q_slot)[None, None]  # [1, 1, T, S]
    if key_mask is not None:
        m = m & key_mask[:, None, None, :S].to(device)
        m = m | (k_slot == q_slot)[None, None]
    return m.expand(B, 1, T, S)
