"""The run directory a training run owns while it runs: refuse to mix two runs, lock out a second
process, clear what a killed one left half-written, and leave nothing behind when set-up fails.

Layout (``OUTPUT_DIR/``): ``checkpoints/step-NNNNNN/`` (``state.py``), ``final/`` (``weights.py``),
``metrics.jsonl``, ``summary.json``, ``loss.png`` (``metrics.py``), and ``.solotune.lock``, which
holds the pid of the process training there. The lock is an ``fcntl.flock`` on that file: the kernel
drops it when the process dies in any way (kill -9 included), so a stale lock never blocks a resume.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from pathlib import Path
from typing import Iterator

from ..errors import RunDirError
from .metrics import LOSS_PNG, METRICS, SUMMARY
from .state import CHECKPOINTS, list_checkpoints
from .weights import FINAL

LOCK = ".solotune.lock"
RUN_OUTPUTS = (CHECKPOINTS, FINAL, METRICS, SUMMARY, LOSS_PNG)  # what a run writes; nothing else is ours


def holds_run(out: Path) -> bool:
    """True when ``out`` holds outputs of a run (complete checkpoints, final/, metrics or summary)."""
    return bool(list_checkpoints(out)) or any((out / name).exists() for name in (FINAL, METRICS, SUMMARY))


def check_output_dir(out: Path, resuming: bool, overwrite: bool) -> None:
    """Refuse an output dir that is a file, or that holds another run (unless resuming or ``overwrite``)."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"output dir {out} exists and is not a directory: choose another --output-dir")
    if not resuming and not overwrite and holds_run(out):
        # A fresh run would interleave its checkpoints with the old run's and --resume could pick the wrong one.
        raise RunDirError(f"output dir {out} already holds a run: continue it with --resume {out}, start over "
                          f"with --overwrite (deletes that run's outputs), or choose another --output-dir")


def remove_run_outputs(out: Path) -> None:
    """``overwrite``: delete exactly what a run writes; any other file in the folder stays."""
    for name in RUN_OUTPUTS:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete the ``.NAME.tmp-*`` / ``.NAME.old-*`` folders and files that an atomic write leaves
    when its process is killed mid-write (only call this while holding the run's lock)."""
    removed = []
    for folder in (out, out / CHECKPOINTS):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                removed.append(p)
    return removed


class RunDirLock:
    """An exclusive, non-blocking lock on ``OUTPUT_DIR/.solotune.lock`` for the life of a run."""

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock (documented limitation)
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown pid"
            os.close(fd)
            raise RunDirError(f"output dir {self.path.parent} is in use by another solotune run ({holder}): wait "
                              f"for it to finish, or choose another --output-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (unlinking it would race)
            self._fd = None


@contextlib.contextmanager
def claim_run_dir(out: Path, *, resuming: bool, overwrite: bool, write: bool = True) -> Iterator[None]:
    """Check, create and lock ``out`` for one run; on any error before the run wrote an output, remove
    a folder this call created. ``write=False`` (ranks other than 0) only checks."""
    check_output_dir(out, resuming, overwrite)
    if not write:
        yield
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = RunDirLock(out)
    try:
        lock.acquire()
    except BaseException:
        _remove_if_untouched(out, created)
        raise
    try:
        check_output_dir(out, resuming, overwrite)  # again under the lock: another run may have just finished
        if overwrite and not resuming:
            remove_run_outputs(out)
        remove_stale_temporaries(out)
        yield
    except BaseException:
        lock.release()
        _remove_if_untouched(out, created)
        raise
    else:
        lock.release()


def _remove_if_untouched(out: Path, created: bool) -> None:
    """Remove ``out`` when this run created it and wrote nothing into it but its lock file (and an
    empty metrics file: the run failed before its first step was logged)."""
    if not (created and out.is_dir()):
        return
    left = [p for p in out.iterdir() if p.name != LOCK and not (p.name == METRICS and p.stat().st_size == 0)]
    if not left:
        shutil.rmtree(out, ignore_errors=True)
