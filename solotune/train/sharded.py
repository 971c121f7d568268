"""A run's checkpoints, ``final/`` and RNG streams on any number of ranks: the layout is train/'s,
the collectives and (sharded) state dicts are the parallel context's (``solotune/parallel``).

One process (``par.sharded`` False) writes the single-file checkpoint of ``state.py``. A run whose
weights live in shards (``distributed="fsdp"``, any number of ranks) writes instead::

    sharded/              DCP folder (solotune.parallel.state_dict): the trainable weights ("model")
                          and the optimizer state ("optim") under canonical names, one file per rank
    trainer_state.pt      as in a single-process checkpoint, minus the optimizer; ``rng_ranks``
                          holds every rank's RNG state (``rng`` is rank 0's), ``world_size`` the ranks
    config.json           the TrainConfig of the run

Both kinds load on any number of ranks: a sharded one through DCP (which reshards), a single-file
one by putting its full tensors onto this run's shards. The folder is written under a temporary
name and renamed into place by rank 0 after every rank finished writing: ``--resume`` never sees
half a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..checkpoint.common import CheckpointError, atomic_dir
from ..parallel.state_dict import load_full_state_dict, load_sharded, save_sharded
from .state import CONFIG, SHARDED, TRAINER_STATE, TrainingCheckpoint, checkpoint_dir, restore_rng, save_checkpoint
from .weights import load_trainable_state, save_final, trainable_state


def save_training_checkpoint(par: Any, output_dir: Path, step: int, model: nn.Module,
                             optimizer: torch.optim.Optimizer, lora: bool, trainer: dict[str, Any],
                             config: dict[str, Any]) -> Path:
    """Write checkpoint ``step`` of the run (a collective call on N ranks); returns its folder.

    ``trainer``: everything besides weights and optimizer that the next step depends on."""
    if not par.sharded:
        return save_checkpoint(output_dir, step, trainable_state(model, lora),
                               {"optimizer": optimizer.state_dict(), **trainer}, config)
    # Rank 0 creates a temporary folder and tells the others its name; every rank writes its DCP
    # shard there; after a barrier rank 0 adds the trainer state and config and renames the folder
    # into place; a last barrier keeps any rank from reading the folder before it exists.
    target = checkpoint_dir(output_dir, step)
    rngs = par.gather(trainer["rng"])
    with (atomic_dir(target) if par.is_main else contextlib.nullcontext(None)) as tmp:
        tmp = Path(par.broadcast(str(tmp) if tmp is not None else None))
        save_sharded(tmp / SHARDED, model, optimizer)
        par.barrier()
        if par.is_main:
            torch.save({"step": step, **trainer, "rng": rngs[0], "rng_ranks": rngs, "world_size": par.world_size},
                       tmp / TRAINER_STATE)
            (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    par.barrier()
    return target


def load_training_checkpoint(par: Any, ckpt: TrainingCheckpoint, model: nn.Module,
                             optimizer: torch.optim.Optimizer, lora: bool) -> None:
    """Weights and optimizer state of ``ckpt`` into this run's (possibly sharded) model and
    optimizer, whatever the number of ranks that wrote it."""
    if ckpt.sharded is not None:
        load_sharded(ckpt.sharded, model, optimizer)  # DCP reshards onto this run (one process included)
    elif par.sharded:
        load_full_state_dict(model, optimizer, ckpt.weights, ckpt.trainer["optimizer"], ckpt.path)
    else:
        load_trainable_state(model, ckpt.weights, lora, ckpt.path)
        try:
            optimizer.load_state_dict(ckpt.trainer["optimizer"])
        except ValueError as e:  # a state this optimizer cannot take (8-bit AdamW: a layout it cannot convert)
            raise CheckpointError(ckpt.path, str(e)) from None


def rank_rng_state(trainer: dict[str, Any], rank: int) -> dict[str, torch.Tensor] | None:
    """The RNG state ``rank`` saved, or None when the checkpoint has none for it (it was written
    by fewer ranks). Single-process checkpoints hold rank 0's as ``rng``."""
    ranks = trainer.get("rng_ranks")
    if ranks is not None:
        return ranks[rank] if rank < len(ranks) else None
    return trainer["rng"] if rank == 0 else None


def restore_rank_rng(par: Any, trainer: dict[str, Any], seed: int = 0) -> None:
    """This rank's saved RNG state; a rank the checkpoint has none for (it was written by fewer
    ranks) starts a fresh stream from (seed, rank, step)."""
    state = rank_rng_state(trainer, par.rank)
    if state is not None:
        restore_rng(state, par.device)
        return
    fresh = (seed * 1_000_003 + int(trainer.get("step", 0))) * 1_009 + par.rank
    torch.default_generator.manual_seed(fresh)
    if par.device.type == "cuda":
        torch.cuda.manual_seed(fresh)


def save_final_weights(par: Any, path: Path, model: nn.Module, cfg: Any, tokenizer: Any) -> Path:
    """``final/`` exactly as a single-process run writes it (adapter, or an HF directory with the
    tokenizer), from rank 0; a sharded model's trainable weights are gathered to full tensors first."""
    full = par.full_state_dict(trainable_state(model, cfg.use_lora))
    if par.is_main:
        save_final(path, model, cfg, tokenizer, state=full)
    par.barrier()
    return path


__all__ = ["save_training_checkpoint", "load_training_checkpoint", "rank_rng_state", "restore_rank_rng",
           "save_final_weights"]
