"""``data="random"``: synthetic fixed-length rows of random tokens, for speed and memory benchmarks.

Every row is exactly ``seq_len`` token ids drawn uniformly from ``[0, vocab_size)`` and every
position is a target (``labels == input_ids``; the loss shifts by one, so a row has
``seq_len - 1`` target tokens). Row ``i`` is a pure function of ``(seed, i, seq_len,
vocab_size)``: the training loop (through ``train/inputs.py``) and the HF reference cell of
``solotune bench`` build the same rows from the same arguments, with no file in between.

Rows are indexed like records of the bundled sample, so the same default ranges apply (train
0-199, validation 400-499) and ``train_range``/``max_samples``/``val_samples`` select rows.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Iterator, Sequence

from .alpaca import DEFAULT_TRAIN, DEFAULT_VAL, Example

RANDOM = "random"  # the TrainConfig.data / bench --data name


def random_row(index: int, seq_len: int, vocab_size: int, seed: int = 0) -> Example:
    """Row ``index``: ``seq_len`` ids in ``[0, vocab_size)``, all of them targets."""
    if seq_len < 2 or vocab_size < 1:
        raise ValueError(f"random rows need seq_len >= 2 and vocab_size >= 1 (got {seq_len}, {vocab_size})")
    digest = hashlib.sha256(f"solotune-random:{seed}:{index}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "little"))  # no global RNG touched
    ids = [rng.randrange(vocab_size) for _ in range(seq_len)]
    return Example(ids, list(ids), truncated=False)


class RandomTokens(Sequence[Example]):
    """The rows ``indices`` (built on demand), with :class:`~solotune.data.AlpacaDataset`'s counters."""

    def __init__(self, indices: Sequence[int], seq_len: int, vocab_size: int, seed: int = 0) -> None:
        self.indices, self.max_seq_len, self.vocab_size, self.seed = list(indices), seq_len, vocab_size, seed
        self.num_truncated = self.num_no_target = 0
        self.num_tokens = len(self.indices) * seq_len
        self.num_target_tokens = len(self.indices) * (seq_len - 1)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):  # int -> Example (slices -> list)
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return random_row(self.indices[i], self.max_seq_len, self.vocab_size, self.seed)

    def __iter__(self) -> Iterator[Example]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return (f"RandomTokens({len(self)} rows of {self.max_seq_len} random tokens < {self.vocab_size}, "
                f"seed {self.seed})")


@dataclass
class RandomSplit:
    """The train/validation rows of a ``data="random"`` run (nothing to read: no records)."""

    train_range: range
    val_range: range
    seq_len: int
    seed: int = 0

    @classmethod
    def of(cls, seq_len: int, seed: int, train: tuple[int, int] | None = None, val: tuple[int, int] | None = None,
           max_samples: int | None = None, val_samples: int | None = None) -> "RandomSplit":
        """The default ranges (those of the bundled sample) or the given ones, cut to the counts."""
        tr = range(*train) if train is not None else DEFAULT_TRAIN
        va = range(*val) if val is not None else DEFAULT_VAL
        return cls(tr[:max_samples] if max_samples is not None else tr,
                   va[:val_samples] if val_samples is not None else va, seq_len, seed)

    def datasets(self, vocab_size: int, say=print) -> tuple[RandomTokens, RandomTokens]:
        """(train, val) rows for a model of ``vocab_size`` tokens."""
        train = RandomTokens(self.train_range, self.seq_len, vocab_size, self.seed)
        val = RandomTokens(self.val_range, self.seq_len, vocab_size, self.seed)
        say(f"train: rows {self.train_range.start}:{self.train_range.stop} {train}\n"
            f"val:   rows {self.val_range.start}:{self.val_range.stop} {val}")
        return train, val


__all__ = ["RANDOM", "RandomSplit", "RandomTokens", "random_row"]
