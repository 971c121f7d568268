"""The training loss, which owns the output head.

The model stops at the final norm's hidden states [B, T, C] when it is given a ``head`` (see
``Transformer.forward``); the loss receives them together with the output projection and the
labels, and decides how the [tokens x vocab] logits come to exist: all at once in fp32 here, in
chunks or inside a fused linear-cross-entropy kernel in later implementations. The loop never
sees logits, so swapping the loss changes nothing else.

Every loss returns the fp32 (fp64 for fp64 inputs) *sum* over target tokens: the loop divides by
the accumulation window's target count, so k micro-batches equal one batch.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import IGNORE_INDEX


class HeadLoss(Protocol):
    """``loss(hidden [B, T, C], head, labels [B, T]) -> scalar sum over target tokens``."""

    def __call__(self, hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor) -> torch.Tensor: ...


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """labels [B, T] aligned with the inputs -> targets [B, T]: position t predicts ``labels[t+1]``;
    the last position predicts nothing. Shifting the labels instead of slicing the logits avoids a
    copy of the [B, T, V] tensor."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over target positions, in fp32.

    logits [B, T, V] (any float dtype), labels [B, T] aligned with the inputs (``labels[t]`` is
    the token at position t, IGNORE_INDEX on prompt/padding).
    """
    logits = logits.flatten(0, 1)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp16/bf16 -> fp32; fp64 stays
    return F.cross_entropy(logits, shifted_targets(labels).flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def full_logits_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """The reference :class:`HeadLoss`: project every position to the vocabulary (in the forward's
    autocast dtype), then :func:`token_loss_sum` outside autocast (peak: the [B, T, V] logits in the
    compute dtype plus their fp32 copy)."""
    logits = head(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        return token_loss_sum(logits, labels)


LOSSES: dict[str, Callable[..., torch.Tensor]] = {"full-logits": full_logits_loss}


def get_loss(name: str = "full-logits") -> HeadLoss:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}") from None
