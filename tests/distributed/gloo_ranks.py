"""Spawning the 2-rank CPU (gloo) scenarios of the FSDP tests: one process group per test module,
each rank's stdout/stderr kept in the run folder for a failing assertion to point at."""

from __future__ import annotations

import contextlib
import gc
import io
import os
import socket
from pathlib import Path
from typing import Callable

import torch

from solotune.parallel.fsdp import NVLS_OFF

Scenarios = Callable[[int, Path], None]  # (rank, run folder) -> None; module-level, so it pickles


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, root: str, scenarios: Scenarios) -> None:
    import torch.distributed as dist

    for k, v in NVLS_OFF.items():
        os.environ.setdefault(k, v)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            scenarios(rank, Path(root))
    finally:
        (Path(root) / f"stdout-rank{rank}.txt").write_text(out.getvalue())
        (Path(root) / f"stderr-rank{rank}.txt").write_text(err.getvalue())
        gc.collect()  # free the sharded models (and any gloo work they hold) before the group goes
        dist.barrier()
        dist.destroy_process_group()


def spawn_ranks(scenarios: Scenarios, world: int, root: Path) -> None:
    """Run ``scenarios`` on ``world`` gloo ranks over ``root``; returns when every rank has finished."""
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(world, free_port(), str(root), scenarios), nprocs=world, join=True)
