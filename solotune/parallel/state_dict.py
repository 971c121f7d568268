"""Full and sharded state dicts of a (possibly FSDP2-sharded) model and its optimizer, through
``torch.distributed.checkpoint`` (DCP). Primitives only: *where* a training checkpoint puts them is
``solotune/train/sharded.py``'s business.

A sharded state folder (DCP) holds ``.metadata`` + one ``__<rank>_0.distcp`` file per rank: the
trainable weights (``"model"``: LoRA adapters, or every weight) and the optimizer state
(``"optim"``), both under the parameters' canonical names (FQNs). DCP stores each tensor with its
global shape and every rank's slice of it, so the folder loads onto any number of ranks -- one
process without a process group included -- through ``get_state_dict`` / ``dcp.load`` /
``set_state_dict``, which map canonical names onto whatever sharding the loading model has.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from ..checkpoint.common import CheckpointError

DCP_METADATA = ".metadata"  # what makes a folder a DCP folder


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
        raise CheckpointError(src, f"cannot load this sharded checkpoint into the model: {e}") from None
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
        raise CheckpointError(src, f"not a readable DCP checkpoint: {e}") from None
    prefix = "model."
    templates = {k[len(prefix):]: torch.empty(m.size, dtype=m.properties.dtype)
                 for k, m in meta.state_dict_metadata.items()
                 if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    if not templates:
        raise CheckpointError(src, "the sharded checkpoint holds no model tensors")
    state = {"model": templates}
    try:
        with _single_process_ok():
            dcp.load(state, storage_reader=reader, no_dist=True)
    except Exception as e:  # a missing or truncated shard file
        raise CheckpointError(src, f"cannot read the sharded weights: {e}") from None
    return state["model"]


def is_sharded_folder(folder: Path) -> bool:
    """``folder`` is a complete DCP folder (its metadata is written last)."""
    return (Path(folder) / DCP_METADATA).is_file()


@torch.no_grad()
def load_full_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
                         optim_state: dict[str, Any], source: Path) -> None:
    """Put full (unsharded) trainable ``weights`` and a single-process ``optimizer.state_dict()``
    (keyed by parameter position) onto this model's shards and its optimizer, under canonical names."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    missing, unexpected = sorted(set(trainable) - weights.keys()), sorted(weights.keys() - set(trainable))
    if missing or unexpected:
        raise CheckpointError(source, f"weights do not fit this model: missing {missing[:6]}, unexpected {unexpected[:6]}")
    # The single-process optimizer numbered its parameters in param_groups order; this run built
    # its optimizer from the same model in the same order, so the numbers map onto names.
    upgrade = getattr(optimizer, "upgrade_state_dict", None)  # a state saved in an earlier layout (8-bit AdamW)
    if upgrade is not None:
        try:
            optim_state = upgrade(optim_state)
        except ValueError as e:
            raise CheckpointError(source, str(e)) from None
    names = {id(p): n for n, p in model.named_parameters()}
    fqn = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    try:
        osd = {"state": {fqn[int(i)]: s for i, s in optim_state["state"].items()},
               "param_groups": [{**g, "params": [fqn[int(i)] for i in g["params"]]} for g in optim_state["param_groups"]]}
    except (IndexError, KeyError, TypeError) as e:
        raise CheckpointError(source, f"optimizer state does not fit this model: {e!r}") from None
    set_state_dict(model, optimizer, model_state_dict=dict(weights), optim_state_dict=osd,
                   options=StateDictOptions(full_state_dict=True, strict=False))


__all__ = ["DCP_METADATA", "save_sharded", "load_sharded", "read_sharded_weights", "is_sharded_folder",
           "load_full_state_dict"]
