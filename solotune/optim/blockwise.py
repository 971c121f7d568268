"""Blockwise dynamic 8-bit quantization (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
Quantization"): what 8-bit AdamW stores its two moments in.

A tensor is cut into blocks of :data:`BLOCK` consecutive elements; each block keeps one fp32
absolute maximum and one uint8 code per element, the index of the nearest entry of a 256-entry
*dynamic* map. The map spends its codes on orders of magnitude: an entry is ``10**-e * f`` with
``e`` = 0..6 the exponent and ``f`` a linear fraction in (0.1, 1] whose resolution halves with
every extra exponent step (more codes near 1, still some at 1e-6). So a block's small values keep
their relative precision where a linear int8 map would round them to zero, which is what the
second moment (squared gradients, spanning many decades inside one block) needs.

* signed map (first moment): sign x 127 magnitudes, 0; 255 distinct entries (the 256th repeats 1.0).
* unsigned map (second moment, >= 0): 255 magnitudes and 0.

Round trip bound (``tests/optim/test_blockwise.py``): for an element x of a block with maximum
absolute value A, ``|deq(q(x)) - x| <= A * gap / 2`` where gap is the widest spacing of the map
around ``x / A``; at most ``A * 0.45 / 2**n`` for the n fraction bits of its exponent.

Shapes: blocks run along the last dimension and never cross it. x [..., c] -> codes uint8
[..., c] (x's shape) and absmax fp32 [..., ceil(c / BLOCK)]; a row's last block may be partial.
8-bit AdamW stores a matrix's moments as rows (:func:`row_shape`), so its codes are shaped like the
parameter and its scales have one row per parameter row: a row split of the parameter (FSDP's
Shard(0)) splits codes and scales the same way. A 1-D x is one row. Everything here is plain
PyTorch (CPU or CUDA).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch

BLOCK = 256  # elements per block: one fp32 scale per 256 codes = 0.016 extra bytes per element


def _magnitudes(bits: int) -> list[float]:
    """The positive entries of a dynamic map with ``bits`` bits for the magnitude: for exponent e
    (0 = largest), ``2 ** (bits - 1 - e)`` fractions at the midpoints of equal slices of
    [0.1, 1] x 10^-e; then 1.0 itself. ``2 ** bits - 1`` entries."""
    out = []
    for e in range(bits - 1):
        k = 2 ** (bits - 1 - e)
        edges = torch.linspace(0.1, 1.0, k + 1, dtype=torch.float64)
        out.extend(((edges[:-1] + edges[1:]) / 2 * 10.0 ** (-e)).tolist())
    out.append(1.0)
    return out


@functools.lru_cache(maxsize=2)
def _map64(signed: bool) -> torch.Tensor:
    if signed:
        mags = _magnitudes(7)  # 127
        values = [-m for m in mags] + [0.0] + mags + [1.0]  # 256, the last repeats 1.0 (never produced)
    else:
        values = [0.0] + _magnitudes(8)  # 1 + 255
    t = torch.tensor(sorted(values), dtype=torch.float64)
    assert t.numel() == 256
    return t


def dynamic_map(signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256 sorted fp32 values a code stands for, in [-1, 1] (signed) or [0, 1]."""
    return _map64(signed).to(device=device, dtype=torch.float32)


def midpoints(qmap: torch.Tensor) -> torch.Tensor:
    """Decision boundaries between consecutive map entries [255]: a value rounds to the nearest entry."""
    return (qmap[:-1] + qmap[1:]) / 2


def n_blocks(numel: int) -> int:
    """Blocks of one row of ``numel`` elements."""
    return math.ceil(numel / BLOCK)


def row_shape(shape: Sequence[int]) -> tuple[int, int]:
    """(rows, cols) a tensor of ``shape`` is quantized as: dim 0 are the rows, the other dims make up
    each row (a 1-D or 0-D tensor is one row)."""
    if len(shape) < 2:
        return 1, math.prod(int(d) for d in shape)
    return int(shape[0]), math.prod(int(d) for d in shape[1:])


def scale_shape(shape: Sequence[int]) -> tuple[int, int]:
    """Shape of the absmax of a tensor of ``shape`` quantized by rows: [rows, ceil(cols / BLOCK)]."""
    rows, cols = row_shape(shape)
    return rows, n_blocks(cols)


def _blocks(x: torch.Tensor, nb: int) -> torch.Tensor:
    """x [..., c] -> [..., nb, BLOCK] (zero padding at each row's end), or [..., 1, c] for c <= BLOCK."""
    c = x.shape[-1]
    if c <= BLOCK:
        return x.unsqueeze(-2)
    pad = nb * BLOCK - c
    return (torch.nn.functional.pad(x, (0, pad)) if pad else x).unflatten(-1, (nb, BLOCK))


def quantize(x: torch.Tensor, qmap: torch.Tensor, mids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., c] (any float dtype) -> (codes uint8 [..., c], absmax fp32 [..., n_blocks(c)]); the
    map's device is used. A block of zeros gets absmax 0 and the code of 0."""
    x = x.float()
    c = x.shape[-1]
    blocks = _blocks(x, n_blocks(c))
    absmax = blocks.abs().amax(dim=-1)
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    mids = midpoints(qmap) if mids is None else mids
    codes = torch.searchsorted(mids, scaled.reshape(-1)).to(torch.uint8).view(scaled.shape)
    return codes.flatten(-2)[..., :c], absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """(codes uint8 [..., c], absmax fp32 [..., n_blocks(c)]) -> fp32 [..., c]."""
    c = codes.shape[-1]
    vals = _blocks(qmap[codes.long()], absmax.shape[-1])
    return (vals * absmax.unsqueeze(-1)).flatten(-2)[..., :c]


def quantized_bytes(shape: int | Sequence[int]) -> int:
    """Bytes of one tensor quantized by rows: a code per element and an fp32 scale per block.
    An int is a 1-D tensor of that many elements (one row)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    rows, cols = row_shape(shape)
    return rows * cols + 4 * rows * n_blocks(cols)
