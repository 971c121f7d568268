"""Sharded training checkpoints through ``torch.distributed.checkpoint`` (DCP).

A checkpoint written by N ranks (``OUTPUT_DIR/checkpoints/step-000040/``)::

    sharded/              DCP folder: .metadata + one __<rank>_0.distcp file per rank, holding the
                          trainable weights ("model": LoRA adapters, or every weight) and the AdamW
                          state ("optim"), both under the parameters' canonical names (FQNs)
    trainer_state.pt      as in a single-process checkpoint, minus the optimizer; ``rng_ranks``
                          holds every rank's RNG state (``rng`` is rank 0's)
    config.json           the TrainConfig of the run

DCP stores each tensor with its global shape and every rank's slice of it, so the checkpoint
loads onto any number of ranks -- one process without a process group included --
through ``get_state_dict`` / ``dcp.load`` / ``set_state_dict``, which map canonical names onto
whatever sharding the loading model has. The folder is written under a temporary name and renamed
into place by rank 0 after every rank finished writing: ``--resume`` never sees half a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

SHARDED = "sharded"  # the DCP folder inside a checkpoint folder
DCP_METADATA = ".metadata"


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Only what training changes: the frozen base of a LoRA run is re-read from its source.
    return StateDictOptions(ignore_frozen_params=True, **kw)


def save_sharded(dest: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shard of the trainable weights and optimizer state to the DCP folder
    ``dest`` (a collective call)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(dest))


def load_sharded(src: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a DCP checkpoint written by any number of ranks into ``model`` and ``optimizer``,
    sharded (FSDP2) or plain. Every trainable tensor must be in the checkpoint (DCP raises naming it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    # strict=False: the frozen base weights are deliberately absent from the templates.
    opts = _options(strict=False)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)  # templates with this run's sharding
    state = {"model": model_sd, "optim": optim_sd}
    try:
        with _single_process_ok():
            dcp.load(state, checkpoint_id=str(src), no_dist=not _in_group())
    except Exception as e:  # CheckpointException wraps per-rank errors; keep the message, name the folder
        raise ValueError(f"{src}: cannot load this sharded checkpoint into the model: {e}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=opts)


@contextlib.contextmanager
def _single_process_ok() -> Iterator[None]:
    """Reading a sharded checkpoint in one process is intended: silence DCP's warning about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*assuming the intent is to load in a single process")
        yield


def _in_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def read_sharded_weights(src: Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) trainable weights of a DCP checkpoint, in one process on the CPU,
    without a model: shapes and dtypes come from the checkpoint's metadata."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(src))
    try:
        meta = reader.read_metadata()
    except Exception as e:
        raise ValueError(f"{src}: not a readable DCP checkpoint: {e}") from None
    prefix = "model."
    templates = {k[len(prefix):]: torch.empty(m.size, dtype=m.properties.dtype)
                 for k, m in meta.state_dict_metadata.items()
                 if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    if not templates:
        raise ValueError(f"{src}: the sharded checkpoint holds no model tensors")
    state = {"model": templates}
    with _single_process_ok():
        dcp.load(state, storage_reader=reader, no_dist=True)
    return state["model"]


def is_sharded_checkpoint(folder: Path) -> bool:
    return (Path(folder) / SHARDED / DCP_METADATA).is_file()


def rank_rng_state(trainer: dict[str, Any], rank: int) -> dict[str, torch.Tensor] | None:
    """The RNG state ``rank`` saved, or None when the checkpoint has none for it (it was written
    by fewer ranks). Single-process checkpoints hold rank 0's as ``rng``."""
    ranks = trainer.get("rng_ranks")
    if ranks is not None:
        return ranks[rank] if rank < len(ranks) else None
    return trainer["rng"] if rank == 0 else None


def save_training_checkpoint(par: Any, output_dir: Path, step: int, model: nn.Module,
                             optimizer: torch.optim.Optimizer, trainer: dict[str, Any], config: dict[str, Any]) -> Path:
    """Write checkpoint ``step`` from all ranks (a collective call); returns its folder.

    Rank 0 creates a temporary folder and tells the others its name; every rank writes its DCP
    shard there; after a barrier rank 0 adds the trainer state and config and renames the folder
    into place; a last barrier keeps any rank from reading the folder before it exists."""
    from ..checkpoint.common import atomic_dir
    from ..train.state import CONFIG, TRAINER_STATE, checkpoint_dir

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


__all__ = ["SHARDED", "save_sharded", "load_sharded", "read_sharded_weights", "is_sharded_checkpoint",
           "rank_rng_state", "save_training_checkpoint"]
