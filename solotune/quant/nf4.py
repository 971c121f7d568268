"""NF4: blockwise 4-bit NormalFloat with double-quantized scales (QLoRA, Dettmers et al. 2023).

The format, byte for byte as bitsandbytes stores it (``quantize_4bit(w, blocksize=64,
quant_type="nf4", compress_statistics=True)``), so the two can be compared on the same input:

- ``w`` [out, in] is read flat (row-major) in blocks of 64 values; each block keeps its absmax
  ``a_b`` (fp32) and every value becomes the index of the NF4 level nearest to ``w / a_b``.
- Two 4-bit codes per byte, the *first* value of a pair in the *high* nibble:
  ``byte[i] = code[2i] << 4 | code[2i+1]`` -> ``codes`` uint8 [ceil(n/2)].
- Double quantization: the absmax values minus their mean ``offset`` are quantized again, in
  blocks of 256, with the signed 8-bit *dynamic* map (:func:`dynamic_map`) and one fp32 absmax
  per 256 blocks: ``qabsmax`` uint8 [n/64], ``absmax2`` fp32 [ceil(n/64/256)], ``offset`` fp32.
- Dequantization (:func:`dequantize_nf4_torch` here, the Triton kernel in :mod:`.triton_nf4`,
  the choice between them in :func:`solotune.quant.dequant.dequantize_nf4`):
  ``a_b' = DYN[qabsmax[b]] * absmax2[b // 256] + offset`` and
  ``w' = NF4[code] * a_b'``, both products in fp32, rounded once to the output dtype.

Storage: 4 bits + 8/64 + 32/(64*256) bits per weight (+ 4 bytes of offset per tensor):
~0.127 bits of scales per weight instead of 32/64 = 0.5 with fp32 absmax.

Rounding rule: ``x`` goes to level ``k`` = the number of midpoints (fp32) below ``x``
(strictly), bitsandbytes' CUDA decision tree ``x > mid``. Where they differ: a block of zeros
(absmax 0) gets the code of 0.0 here (bitsandbytes computes 0 * 1/0 = NaN and stores code 0, -1.0),
so that it dequantizes to exact zeros whatever the double-quantized absmax becomes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

BLOCKSIZE = 64  # values per absmax (QLoRA's choice)
SCALE_BLOCKSIZE = 256  # absmax values per second-level fp32 scale (double quantization)

# The 16 NF4 levels as fp32, ascending; code k is NF4_LEVELS[k]. These exact values are what the
# packed format means (bitsandbytes' kernels hard-code the same numbers);
# :func:`nf4_levels_from_quantiles` derives them and tests/quant checks the two agree bit for bit.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
NF4_ZERO_CODE = 7

# The paper's offset delta = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2 = 0.96770833..., written to seven
# digits as bitsandbytes does: the table above comes from this literal (the full fraction moves
# some levels by one fp32 ulp).
NF4_OFFSET = 0.9677083


def nf4_levels_from_quantiles(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The NF4 construction: quantiles of N(0, 1), normalised to [-1, 1]. -> [16] fp32 ascending.

    8 positive levels from the quantiles at probabilities ``linspace(offset, 0.5, 9)[:-1]``, 7
    negative ones mirrored from ``linspace(offset, 0.5, 8)[:-1]``, and an exact zero; divided by
    the largest. The extra positive level makes the type asymmetric but gives it a true 0 (the
    paper's reason: zero-padded and exactly-zero weights stay exact). Probabilities are fp32 and
    quantiles fp64 rounded to fp32, the order of operations bitsandbytes used to make its table.
    """
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double()).float()
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double()).float()
    levels = torch.cat([neg, torch.zeros(1), pos]).sort().values
    return levels / levels.max()


def dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic map (Dettmers 2015) that quantizes the absmax values -> [256] fp32
    ascending: 0, 1, and for each exponent e in -6..0 the 2^(e+6) midpoints of
    ``linspace(0.1, 1, 2^(e+6) + 1)`` times 10^e, with both signs. Fine near 0, coarse near 1:
    absolute precision where values are small. Built with the same fp32 operations as
    bitsandbytes' ``create_dynamic_map()`` so the two tables are equal bit for bit."""
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2**i + 1)
        mags = (10.0 ** (i - 6)) * ((edges[:-1] + edges[1:]) / 2.0)
        values += mags.tolist() + (-mags).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_MAP = dynamic_map()


def _midpoints(levels: torch.Tensor) -> torch.Tensor:
    """Decision thresholds between adjacent levels, (a + b) * 0.5 in fp32."""
    return (levels[1:] + levels[:-1]) * 0.5


def _nearest(x: torch.Tensor, mids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level: the number of thresholds strictly below ``x`` (x > mid goes up)."""
    return torch.bucketize(x, mids, out_int32=True)


@functools.lru_cache(maxsize=None)
def tables_on(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(NF4 levels [16], dynamic map [256]) fp32 on ``device``, copied there once per device (a
    memo of two constants, so a GPU dequantization does not copy them host-to-device every call,
    and no module carries them: a compiled graph sees no lazily created tensors)."""
    return NF4_LEVELS.to(device), DYNAMIC_MAP.to(device)


@dataclass
class NF4Weight:
    """One NF4 + double-quantized weight (all tensors on one device).

    codes: uint8 [ceil(n/2)], two 4-bit codes per byte, first value in the high nibble.
    qabsmax: uint8 [nb], nb = ceil(n/64): the 8-bit code (dynamic map) of each absmax - offset.
    absmax2: fp32 [ceil(nb/256)]: the absmax of (absmax - offset) over each 256 blocks.
    offset: fp32 [1]: the mean of the fp32 absmax values.
    shape: the weight's shape ([out, in]).
    tables: optional (NF4 levels [16], dynamic map [256]) already on the tensors' device, so that
        a dequantization on the GPU does not copy the two constants host-to-device every call.
    """

    codes: torch.Tensor
    qabsmax: torch.Tensor
    absmax2: torch.Tensor
    offset: torch.Tensor
    shape: torch.Size
    blocksize: int = BLOCKSIZE
    scale_blocksize: int = SCALE_BLOCKSIZE
    tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def levels_and_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(NF4 levels [16], dynamic map [256]) fp32 on the codes' device."""
        if self.tables is not None:
            return self.tables
        return tables_on(self.codes.device)

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def nbytes(self) -> int:
        """Bytes stored: codes + 8-bit absmax + fp32 second-level scales + the fp32 offset."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.qabsmax, self.absmax2, self.offset))


def nf4_storage_shapes(numel: int, blocksize: int = BLOCKSIZE,
                       scale_blocksize: int = SCALE_BLOCKSIZE) -> dict[str, int]:
    """Element counts of each stored tensor for a weight of ``numel`` values."""
    nb = -(-numel // blocksize)
    return {"codes": -(-numel // 2), "qabsmax": nb, "absmax2": -(-nb // scale_blocksize), "offset": 1}


def nf4_weight_bytes(numel: int, blocksize: int = BLOCKSIZE, scale_blocksize: int = SCALE_BLOCKSIZE) -> int:
    """Bytes of an NF4 + double-quant weight of ``numel`` values (what ``NF4Linear.weight_bytes``
    reports): ceil(n/2) + nb + 4 * ceil(nb/256) + 4, nb = ceil(n/64). For the planner."""
    s = nf4_storage_shapes(numel, blocksize, scale_blocksize)
    return s["codes"] + s["qabsmax"] + 4 * s["absmax2"] + 4 * s["offset"]


# Quantize this many blocks at a time: bounds the fp32/int32 transients to a few tens of MiB
# whatever the tensor (a 70B w1 is 235M values), without a Python loop over blocks.
_CHUNK_BLOCKS = 1 << 18


def blockwise_absmax(w: torch.Tensor, blocksize: int = BLOCKSIZE) -> torch.Tensor:
    """|w| max over each block of ``blocksize`` flat values -> fp32 [ceil(n/blocksize)]."""
    flat = w.reshape(-1)
    pad = -flat.numel() % blocksize
    if pad:  # zeros do not change an absmax
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, blocksize).abs().amax(dim=1).float()


def _quantize_blocks(flat: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Codes (int32 [nb * blocksize]) of ``flat`` (padded to whole blocks) against ``levels``,
    each value scaled by its block's 1/absmax as fp32 (a zero block scales by 0: code of 0.0)."""
    mids = _midpoints(levels.to(flat.device))
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    blocks = flat.view(-1, blocksize)
    out = torch.empty(blocks.shape, dtype=torch.int32, device=flat.device)
    for s in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        x = blocks[s:s + _CHUNK_BLOCKS].float() * inv[s:s + _CHUNK_BLOCKS, None]
        out[s:s + _CHUNK_BLOCKS] = _nearest(x, mids)
    return out.view(-1)


def quantize_scales(absmax: torch.Tensor, scale_blocksize: int = SCALE_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization of the fp32 absmax values [nb] -> (qabsmax uint8 [nb],
    absmax2 fp32 [ceil(nb/256)], offset fp32 [1]): subtract the mean, then blockwise 8-bit with
    the dynamic map."""
    offset = absmax.mean().reshape(1)
    centered = absmax - offset
    nb = centered.numel()
    pad = -nb % scale_blocksize
    padded = torch.cat([centered, centered.new_zeros(pad)]) if pad else centered
    absmax2 = padded.view(-1, scale_blocksize).abs().amax(dim=1)
    q = _quantize_blocks(padded, absmax2, DYNAMIC_MAP, scale_blocksize)[:nb]
    return q.to(torch.uint8), absmax2, offset


def dequantize_scales(qabsmax: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor,
                      scale_blocksize: int = SCALE_BLOCKSIZE, dynamic: torch.Tensor | None = None) -> torch.Tensor:
    """The absmax values back -> fp32 [nb]: DYN[q] * absmax2[b // 256] + offset (two fp32 roundings)."""
    nb = qabsmax.numel()
    idx = torch.arange(nb, device=qabsmax.device) // scale_blocksize
    dyn = DYNAMIC_MAP.to(qabsmax.device) if dynamic is None else dynamic
    return dyn[qabsmax.long()] * absmax2[idx] + offset


@torch.no_grad()
def quantize_nf4(w: torch.Tensor, blocksize: int = BLOCKSIZE, scale_blocksize: int = SCALE_BLOCKSIZE) -> NF4Weight:
    """w (fp32/fp16/bf16, any shape; [out, in] for a Linear) -> :class:`NF4Weight` on w's device."""
    if not w.is_floating_point():
        raise TypeError(f"quantize_nf4: expected a floating-point weight, got {w.dtype}")
    if blocksize % 2:
        raise ValueError(f"NF4 blocksize must be even (two codes per byte), got {blocksize}")
    flat = w.detach().reshape(-1)
    n = flat.numel()
    absmax = blockwise_absmax(flat, blocksize)
    pad = -n % blocksize
    padded = torch.cat([flat, flat.new_zeros(pad)]) if pad else flat
    codes = _quantize_blocks(padded, absmax, NF4_LEVELS, blocksize)[: n + (n % 2)]  # whole bytes
    packed = ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8)
    qabsmax, absmax2, offset = quantize_scales(absmax, scale_blocksize)
    return NF4Weight(packed, qabsmax, absmax2, offset, torch.Size(w.shape), blocksize, scale_blocksize)


def _byte_table(levels: torch.Tensor) -> torch.Tensor:
    """[256, 2] fp32: the two levels a byte holds (high nibble first), on the levels' device."""
    b = torch.arange(256, device=levels.device)
    return torch.stack([levels[b >> 4], levels[b & 15]], dim=1)


def dequantize_nf4_torch(q: NF4Weight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The PyTorch path (CPU, and the reference of the Triton kernel) -> [*shape] in ``dtype``."""
    n, bs = q.numel, q.blocksize
    levels, dyn = q.levels_and_map()
    absmax = dequantize_scales(q.qabsmax, q.absmax2, q.offset, q.scale_blocksize, dyn)
    vals = _byte_table(levels)[q.codes.int()].view(-1)  # [2 * bytes] fp32
    pad = -vals.numel() % bs
    if pad:
        vals = torch.cat([vals, vals.new_zeros(pad)])
    out = (vals.view(-1, bs) * absmax[:, None]).view(-1)[:n]
    return out.to(dtype).view(q.shape)


__all__ = [
    "BLOCKSIZE", "SCALE_BLOCKSIZE", "NF4_LEVELS", "NF4_OFFSET", "NF4_ZERO_CODE", "DYNAMIC_MAP", "NF4Weight",
    "nf4_levels_from_quantiles", "dynamic_map", "nf4_storage_shapes", "nf4_weight_bytes", "blockwise_absmax",
    "quantize_scales", "dequantize_scales", "quantize_nf4", "dequantize_nf4_torch",
]
