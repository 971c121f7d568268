"""Padding-free packing: the examples of one accumulation window, packed into rows of a fixed
token budget (several documents back to back per row, RoPE positions restarting at each), so a
micro-batch carries real tokens instead of padding.

A document never straddles rows (every example is at most ``row_len`` tokens: truncation is the
tokeniser's, unchanged), and each document's first label is dropped: in a padded row position 0's
label is never a target either (position t predicts ``labels[t + 1]``), so the previous
document's last token must not learn to predict the next one's first. The loss is normalised by the
window's target tokens as before, so a packed window gives the gradient of the padded one
(``tests/data/test_packing.py``).

Shapes: R rows, T = ``row_len``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .alpaca import IGNORE_INDEX, Example
from .batch import Batch, positions_for


def pack_rows(lengths: Sequence[int], row_len: int) -> list[list[int]]:
    """First-fit decreasing: example indices per row, each row's lengths summing to <= row_len.
    Deterministic (ties broken by index), so a resumed run packs a window exactly as before."""
    if any(n > row_len for n in lengths):
        raise ValueError(f"an example of {max(lengths)} tokens does not fit a row of {row_len}")
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(row_len - lengths[i])
    return rows


def packed_batch(examples: Sequence[Example], row_len: int, pad_id: int) -> Batch:
    """One row per entry of ``examples`` (a sequence of rows, each a sequence of examples), right-
    padded to ``row_len`` (a fixed shape: one compiled graph serves every micro-batch)."""
    R = len(examples)
    input_ids = torch.full((R, row_len), pad_id, dtype=torch.long)
    labels = torch.full((R, row_len), IGNORE_INDEX, dtype=torch.long)
    seq_lens = []
    for r, row in enumerate(examples):
        start = 0
        for e in row:
            n = len(e.input_ids)
            input_ids[r, start:start + n] = torch.tensor(e.input_ids, dtype=torch.long)
            labels[r, start + 1:start + n] = torch.tensor(e.labels[1:], dtype=torch.long)
            start += n
        seq_lens.append(tuple(len(e.input_ids) for e in row))
    seq_lens_t = tuple(seq_lens)
    # rows that are each one document filling the row exactly (fixed-length rows) are plain causal
    # attention; any other packed micro-batch takes the packed form, whatever its document count
    full_rows = all(len(row) == 1 and row[0] == row_len for row in seq_lens_t)
    return Batch(input_ids, labels, positions_for(seq_lens_t, row_len), seq_lens_t, packed_rows=not full_rows)


def pack_window(examples: Sequence[Example], row_len: int, rows_per_batch: int, pad_id: int) -> list[Batch]:
    """The window's examples -> micro-batches of at most ``rows_per_batch`` packed rows of
    ``row_len`` tokens (the memory budget of one padded micro-batch of ``rows_per_batch`` rows)."""
    rows = pack_rows([len(e.input_ids) for e in examples], row_len)
    return [packed_batch([[examples[i] for i in row] for row in rows[b:b + rows_per_batch]], row_len, pad_id)
            for b in range(0, len(rows), rows_per_batch)]


__all__ = ["pack_rows", "packed_batch", "pack_window"]
