"""Training checkpoints: atomic writes, finding the latest one, and the RNG state that makes a
resumed run bit-identical to an uninterrupted one.

Layout of one checkpoint (``OUTPUT_DIR/checkpoints/step-000040/``)::

    weights.safetensors   the trainable weights: LoRA adapters (canonical names) or the full model
    trainer_state.pt      optimizer, scheduler, loss scaler, RNG states, data position, counters
    config.json           the TrainConfig of the run

The folder is written under a temporary name and renamed into place, so a crash (or a second
Ctrl-C) never leaves a half-written checkpoint that ``--resume`` would pick up. A run on N ranks
(``distributed="fsdp"``) writes ``sharded/`` (DCP) instead of ``weights.safetensors`` and keeps the
optimizer there (see ``solotune/train/sharded.py``). ``trainer_state.pt``
holds only tensors, numbers, strings and containers, and is read with ``weights_only=True``.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint.common import CheckpointError, atomic_dir, safe_torch_load
from ..parallel.state_dict import is_sharded_folder
from ..errors import MissingPathError, RunDirError, SolotuneError


class TrainerStateError(SolotuneError, ValueError):
    """A checkpoint folder whose files cannot be read as a solotune checkpoint."""

CHECKPOINTS = "checkpoints"
WEIGHTS = "weights.safetensors"
TRAINER_STATE = "trainer_state.pt"
CONFIG = "config.json"
SHARDED = "sharded"  # a checkpoint of N ranks: the DCP folder of weights + optimizer (train/sharded.py)
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step:06d}"


def is_sharded_checkpoint(folder: Path) -> bool:
    return is_sharded_folder(Path(folder) / SHARDED)


# ------------------------------------------------------------------------------------------ RNG
def capture_rng(device: torch.device) -> dict[str, torch.Tensor]:
    """The global RNG states a training step consumes (dropout draws from the default generator
    of the device it runs on). The data order is a pure function of (seed, epoch) and needs none."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------------- save / load
@dataclass
class TrainingCheckpoint:
    """What :func:`load_checkpoint` returns."""

    path: Path
    step: int
    weights: dict[str, torch.Tensor]  # empty for a sharded checkpoint (its tensors are read by DCP)
    trainer: dict[str, Any]
    config: dict[str, Any]
    sharded: Path | None = None  # the DCP folder of a checkpoint written by N ranks (train/sharded.py)


def save_checkpoint(output_dir: str | Path, step: int, weights: dict[str, torch.Tensor],
                    trainer: dict[str, Any], config: dict[str, Any]) -> Path:
    """Write checkpoint ``step`` atomically (replacing one of the same step); returns its folder."""
    target = checkpoint_dir(output_dir, step)
    with atomic_dir(target) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS),
                  metadata={"format": "pt", "step": str(step)})
        torch.save({"step": step, **trainer}, tmp / TRAINER_STATE)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return target


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``output_dir/checkpoints`` as (step, folder), oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / TRAINER_STATE).is_file() and ((d / WEIGHTS).is_file() or is_sharded_checkpoint(d)):
            found.append((int(m.group(1)), d))
    return sorted(found)


def prune_checkpoints(output_dir: str | Path, keep: int, current_step: int) -> list[Path]:
    """Keep the newest ``keep`` checkpoints up to ``current_step`` (0 = keep all); returns the removed
    folders. Checkpoints *after* ``current_step`` (a run resumed from an earlier one) are never
    touched: they are another branch of the run, not this one's history."""
    if keep <= 0:
        return []
    mine = [d for step, d in list_checkpoints(output_dir) if step <= current_step]
    removed = mine[:-keep]
    for d in removed:
        shutil.rmtree(d)
    return removed


def run_dir_of(checkpoint: Path) -> Path:
    """The output directory a checkpoint folder belongs to (``RUN/checkpoints/step-N`` -> ``RUN``)."""
    return checkpoint.parent.parent


def resolve_checkpoint(path: str | Path) -> Path:
    """``--resume`` argument -> one checkpoint folder: the folder itself, or the latest checkpoint
    of an output directory."""
    p = Path(path)
    if (p / TRAINER_STATE).is_file():
        return p
    if p.exists() and not p.is_dir():
        raise RunDirError(f"--resume {p}: is a file; pass a run's output directory or one of its checkpoint folders")
    if not p.is_dir():
        raise MissingPathError(f"--resume {p}: no such directory")
    ckpts = list_checkpoints(p)
    if not ckpts:
        raise MissingPathError(f"--resume {p}: neither a checkpoint folder (no {TRAINER_STATE}) nor an output "
                               f"directory with checkpoints in {p / CHECKPOINTS}")
    return ckpts[-1][1]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> TrainingCheckpoint:
    """Read a checkpoint folder (or the latest one of an output directory)."""
    d = resolve_checkpoint(path)
    try:
        trainer = safe_torch_load(d / TRAINER_STATE, map_location=map_location)
    except CheckpointError:  # code or objects in the pickle: refused, never run
        raise
    except Exception as e:  # truncated or not a torch file
        raise TrainerStateError(f"{d / TRAINER_STATE}: cannot be read as a solotune trainer state: {e}") from None
    try:
        config = json.loads((d / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TrainerStateError(f"{d / CONFIG}: cannot read the run's config: {e}") from None
    if not isinstance(trainer, dict) or "step" not in trainer:
        raise TrainerStateError(f"{d / TRAINER_STATE}: not a solotune trainer state (no 'step')")
    if not (d / WEIGHTS).is_file() and is_sharded_checkpoint(d):
        return TrainingCheckpoint(path=d, step=int(trainer["step"]), weights={}, trainer=trainer, config=config,
                                  sharded=d / SHARDED)
    try:
        weights = load_file(str(d / WEIGHTS))
    except Exception as e:
        raise TrainerStateError(f"{d / WEIGHTS}: cannot be read as safetensors: {e}") from None
    return TrainingCheckpoint(path=d, step=int(trainer["step"]), weights=weights, trainer=trainer, config=config)
