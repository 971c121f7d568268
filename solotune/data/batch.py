"""``Batch``: what the collator hands the model — tokens, labels, RoPE positions and the document
boundaries of every row — so the model can choose the attention form from the batch itself.

Today each row holds one document, right-padded; a packed row (several documents back to back,
positions restarting at each, attention block-diagonal causal) is the same dataclass with more
than one length per row, which is what padding-free packing builds.

Shapes: B rows, T tokens per row.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch

from .alpaca import IGNORE_INDEX, Example, collate


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, T] long; pad_id after the last document of a row
    labels: torch.Tensor  # [B, T] long, aligned with input_ids; IGNORE_INDEX on prompt and padding
    positions: torch.Tensor  # [B, T] long RoPE positions: 0.. within each document (padding continues the row)
    seq_lens: tuple[tuple[int, ...], ...]  # per row, the lengths of its documents in order (padding excluded)
    # built by packing (rows with padding or several documents): attention takes the packed form even
    # where every row holds one document, so a compiled block sees one attention form for the whole
    # run (no new graph for a window that happens to hold one document per row)
    packed_rows: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)  # type: ignore[return-value]

    @property
    def num_tokens(self) -> int:
        """Non-padding tokens."""
        return sum(sum(row) for row in self.seq_lens)

    @property
    def num_targets(self) -> int:
        """Tokens the loss is computed on (position t predicts labels[t + 1])."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def packed(self) -> bool:
        """True when some row holds more than one document (attention must not cross them), or the
        rows come from packing (``packed_rows``)."""
        return self.packed_rows or any(len(row) > 1 for row in self.seq_lens)

    def cu_seqlens(self) -> torch.Tensor:
        """int32 [D + 1] cumulative document lengths over the flattened [B * T] tokens (each row's
        padding, if any, counts as one more segment), the layout varlen attention kernels take."""
        T = self.input_ids.shape[1]
        bounds = [0]
        for r, row in enumerate(self.seq_lens):
            for n in row:
                bounds.append(bounds[-1] + n)
            if bounds[-1] < (r + 1) * T:
                bounds.append((r + 1) * T)
        return torch.tensor(bounds, dtype=torch.int32)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return dataclasses.replace(self, input_ids=self.input_ids.to(device, non_blocking=non_blocking),
                                   labels=self.labels.to(device, non_blocking=non_blocking),
                                   positions=self.positions.to(device, non_blocking=non_blocking))


def positions_for(seq_lens: Sequence[Sequence[int]], T: int) -> torch.Tensor:
    """[B, T] RoPE positions restarting at 0 for each document; padding continues counting."""
    pos = torch.empty(len(seq_lens), T, dtype=torch.long)
    for r, row in enumerate(seq_lens):
        start = 0
        for n in row:
            pos[r, start:start + n] = torch.arange(n)
            start += n
        pos[r, start:] = torch.arange(start, T) - start + (row[-1] if row else 0)
    return pos


def collate_batch(examples: Sequence[Example], pad_id: int, pad_to_multiple_of: int | None = None) -> Batch:
    """One example per row, right-padded to the longest (see :func:`solotune.data.collate`)."""
    padded = collate(examples, pad_id, pad_to_multiple_of)
    seq_lens = tuple((len(e.input_ids),) for e in examples)
    return Batch(padded["input_ids"], padded["labels"], positions_for(seq_lens, padded["input_ids"].shape[1]),
                 seq_lens)


def empty_batch(pad_id: int, T: int = 2) -> Batch:
    """One padding row without targets (a rank's empty share of a micro-batch: it still joins the
    collectives and adds exactly zero loss and gradient)."""
    return Batch(torch.full((1, T), pad_id, dtype=torch.long), torch.full((1, T), IGNORE_INDEX, dtype=torch.long),
                 torch.arange(T)[None, :], ((),))
