"""The run's state besides weights and optimizer: counters, the data position, the RNG streams,
the learning-rate schedule and the loss scaler — one :class:`TrainState` whose ``state_dict`` /
``load_state_dict`` are the only place its keys are listed (``trainer_state.pt`` in a checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..data import epoch_order
from .state import capture_rng


class DataStream:
    """Example indices in a seeded order, epoch after epoch; its position is two integers.

    The order of epoch e is ``epoch_order(n, seed, e)``, a pure function, so resuming needs only
    (epoch, index). With ``epochs`` set the stream ends after that many passes; otherwise it cycles.
    """

    def __init__(self, n: int, seed: int, batch_size: int, epochs: int | None) -> None:
        self.n, self.seed, self.batch_size, self.epochs = n, seed, batch_size, epochs
        self.epoch, self.index = 0, 0
        self._order: list[int] | None = None

    def _take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.index == self.n:
                self.epoch, self.index, self._order = self.epoch + 1, 0, None
            if self.epochs is not None and self.epoch >= self.epochs:
                break
            if self._order is None:
                self._order = epoch_order(self.n, self.seed, self.epoch)
            out.append(self._order[self.index])
            self.index += 1
        return out

    def take_window(self, micro_batches: int) -> list[list[int]]:
        """Up to ``micro_batches`` lists of ``batch_size`` indices (fewer at the very end)."""
        window = []
        for _ in range(micro_batches):
            idx = self._take(self.batch_size)
            if not idx:
                break
            window.append(idx)
        return window

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None


@dataclass
class TrainState:
    """Everything besides the weights and the optimizer that the next step depends on.

    ``commit()`` snapshots the data position and RNG streams after a completed step; a checkpoint
    always holds the last committed step, even when written from the middle of the next one
    (Ctrl-C), so a resumed run repeats nothing and skips nothing.
    """

    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: Any  # precision.LossScaler
    stream: DataStream
    device: torch.device
    step: int = 0
    tokens: int = 0  # non-padding input tokens, all completed steps
    target_tokens: int = 0
    runtime_s: float = 0.0  # training time (no evaluation, generation or saving)
    val_loss_before: float | None = None
    generations_before: list[str] = field(default_factory=list)
    _data: dict[str, int] = field(default_factory=dict, repr=False)
    _rng: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.commit()

    def commit(self) -> None:
        self._data, self._rng = self.stream.state_dict(), capture_rng(self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "data": self._data, "rng": self._rng, "tokens": self.tokens, "target_tokens": self.target_tokens,
                "runtime_s": self.runtime_s, "val_loss_before": self.val_loss_before,
                "generations_before": list(self.generations_before)}

    def load_state_dict(self, d: dict[str, Any], restore_rng: Callable[[dict[str, Any]], None]) -> None:
        """Restore from a checkpoint's trainer state; ``restore_rng(d)`` sets this rank's RNG streams."""
        self.scheduler.load_state_dict(d["scheduler"])
        self.scaler.load_state_dict(d["scaler"])
        self.stream.load_state_dict(d["data"])
        restore_rng(d)
        self.step, self.tokens, self.target_tokens = int(d["step"]), int(d["tokens"]), int(d["target_tokens"])
        self.runtime_s = float(d["runtime_s"])
        self.val_loss_before = d.get("val_loss_before")
        self.generations_before = list(d.get("generations_before", []))
        self.commit()
