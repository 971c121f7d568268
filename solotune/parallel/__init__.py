"""Data-parallel training: the "parallel context" the one training loop talks to.

The loop (``solotune/train/loop.py``) is written once. Whatever differs between one process and N
processes started by ``torchrun`` is asked of a context object, so the loop has no ``if distributed``
branches of its own:

====================================  ==========================================================
``par.load_model`` / ``par.wrap``     build the model / shard it (FSDP2 ``fully_shard``)
``par.share(indices)``                this rank's examples of one (global) micro-batch
``par.accumulate(model, last)``       no gradient reduce-scatter until the window's last micro-batch
``par.grad_sum_factor``               FSDP averages gradients over ranks; the loss undoes that
``par.all_reduce_sum(*values)``       global token counts and loss sums
``par.clip_grad_norm(params, max)``   the norm of the whole (sharded) gradient
``par.gather`` / ``broadcast``        any picklable value from every rank / from rank 0
``par.make_scaler(policy, device)``   the policy's loss scaler (fp16: found-inf agreed by all ranks)
``par.is_main``                       only rank 0 prints and writes metrics, summaries, ``final/``
``par.sharded``                       weights and optimizer state live in shards (DCP checkpoints)
``par.full_state_dict(state)``        full tensors of a (sharded) state dict, on rank 0
``par.interrupts`` / ``check_...``    Ctrl-C stops every rank after the same optimizer step
====================================  ==========================================================

The package offers primitives and imports nothing of ``train/`` or ``bench/``: where the pieces go
inside a training checkpoint (single-file or sharded), and which RNG state each rank restores, is
``solotune/train/sharded.py``'s, which calls these methods and :mod:`solotune.parallel.state_dict`.

:class:`SingleProcess` (``distributed="none"``) is the default and does nothing beyond what the loop
did before there was a context. :class:`~solotune.parallel.fsdp.FSDPContext` (``distributed="fsdp"``) is
the torchrun one.

One convention makes a run's trajectory independent of the number of processes:
``TrainConfig.batch_size`` is the *global* micro-batch. Every rank reads the same seeded example
order, takes its share of each micro-batch, and the loss is normalised by the target-token count of
the whole window across ranks, so N ranks follow the single-process curve of the same config (and a
checkpoint resumes on any number of ranks).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

class SingleProcess:
    """One process, nothing to coordinate: every method is what the loop does on its own."""

    kind = "none"
    rank = 0
    world_size = 1
    is_main = True
    grad_sum_factor = 1

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> "SingleProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    # ------------------------------------------------------------------ model
    def load_model(self, cfg: Any, policy: Any, model: nn.Module | None, tokenizer: Any,
                   load: Callable[..., tuple[nn.Module, Any]]) -> tuple[nn.Module, Any]:
        """``load(cfg, policy, device, model, tokenizer)``: the loop's own loader."""
        return load(cfg, policy, self.device, model, tokenizer)

    def wrap(self, model: nn.Module, cfg: Any, policy: Any) -> nn.Module:
        return model

    # ------------------------------------------------------------------- data
    def share(self, indices: Sequence[int]) -> list[int]:
        return list(indices)

    def accumulate(self, model: nn.Module, last: bool) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    # -------------------------------------------------------- collectives
    def all_reduce_sum(self, *values: float) -> list[float]:
        return [float(v) for v in values]

    def gather(self, value: Any) -> list[Any]:
        """``value`` of every rank, in rank order."""
        return [value]

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        return value

    def barrier(self) -> None:
        pass

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float | None) -> float:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf))

    def make_scaler(self, policy: Any, device_type: str) -> Any:
        return policy.make_scaler(device_type)

    # ---------------------------------------------------------- Ctrl-C
    def interrupts(self) -> contextlib.AbstractContextManager[None]:
        """Ctrl-C raises KeyboardInterrupt where it lands (the loop defers it around the update)."""
        return contextlib.nullcontext()

    def check_interrupt(self) -> None:
        pass

    # ------------------------------------------------------------ state dicts
    sharded = False  # weights and optimizer state are whole in this process

    def full_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The full tensors of ``state`` on the main process (here: ``state`` itself)."""
        return state


def make_parallel(kind: str, device: torch.device) -> Any:
    """The context for ``TrainConfig.distributed``; use it as a context manager (``fsdp`` joins the
    torchrun process group on entry and leaves it on exit)."""
    if kind == "none":
        return SingleProcess(device)
    if kind == "fsdp":
        from .fsdp import FSDPContext

        return FSDPContext(device)
    from ..errors import ConfigError

    raise ConfigError(f"distributed {kind!r}: expected none or fsdp")


__all__ = ["SingleProcess", "make_parallel"]
