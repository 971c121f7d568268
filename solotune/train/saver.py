"""When and how a run writes its checkpoints: periodic (every N steps and every M minutes of
training), rotated, on Ctrl-C / SIGTERM, and at the end. What goes inside one is ``state.py``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .config import TrainConfig
from .interrupts import Terminated, deferred_signals, saving_on_exit
from .run_state import TrainState
from .sharded import save_training_checkpoint
from .state import checkpoint_dir, list_checkpoints, prune_checkpoints


class CheckpointSaver:
    def __init__(self, cfg: TrainConfig, out: Path, par: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
                 state: TrainState) -> None:
        self.cfg, self.out, self.par, self.model, self.optimizer, self.state = cfg, out, par, model, optimizer, state
        self.last: Path | None = None  # the newest checkpoint this run wrote
        self._saved_at_runtime = state.runtime_s

    def save(self) -> Path:
        """Checkpoint the last completed step, then drop the oldest beyond ``keep_checkpoints``."""
        s = self.state
        self.last = save_training_checkpoint(self.par, self.out, s.step, self.model, self.optimizer,
                                             self.cfg.use_lora, s.state_dict(), self.cfg.to_dict())
        self._saved_at_runtime = s.runtime_s
        if self.par.is_main:
            prune_checkpoints(self.out, self.cfg.keep_checkpoints, s.step)
        return self.last

    def due(self) -> bool:
        """A periodic checkpoint after this step: every ``save_every`` steps, or once
        ``save_every_minutes`` of training passed since the last one (rank 0 decides for all)."""
        cfg, step = self.cfg, self.state.step
        if not cfg.save:
            return False
        if cfg.save_every and step % cfg.save_every == 0:
            return True  # the same step on every rank: no collective needed
        if not cfg.save_every_minutes:
            return False
        since = self.state.runtime_s - self._saved_at_runtime
        return bool(self.par.broadcast(since >= 60.0 * cfg.save_every_minutes))  # clocks differ across ranks

    def save_periodic(self) -> None:
        with deferred_signals():  # a periodic checkpoint is finished before Ctrl-C acts
            self.save()

    def save_final(self) -> None:
        """The end of training: the last step's checkpoint, unless the newest one already is it."""
        saved = list_checkpoints(self.out)
        if not saved or saved[-1][0] != self.state.step:
            self.save()

    def save_on_exit(self, stop: KeyboardInterrupt) -> None:
        """Ctrl-C / SIGTERM: write the last completed step (unless it was just written), then say
        where it is, or plainly that nothing was saved when a further Ctrl-C abandoned the write."""
        say = (lambda m: print(m, file=sys.stderr)) if self.par.is_main else (lambda m: None)
        what = "terminated (SIGTERM)" if isinstance(stop, Terminated) else "interrupted"
        step = self.state.step
        if self.last is None or self.last.name != checkpoint_dir(self.out, step).name:
            try:
                with saving_on_exit(say):
                    self.save()
            except KeyboardInterrupt:
                newest = list_checkpoints(self.out)
                say(f"\n{what}: the checkpoint of step {step} was NOT saved (abandoned by a further Ctrl-C); "
                    + (f"the newest complete one is {newest[-1][1]}" if newest else "no checkpoint of this run exists"))
                return
        say(f"\n{what}: saved a checkpoint of step {step} to {self.last}\n"
            f"continue with: solotune finetune --resume {self.out}")
