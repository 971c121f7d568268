"""Signals during training: Ctrl-C and SIGTERM save a checkpoint before the run exits.

* SIGINT (Ctrl-C) raises ``KeyboardInterrupt`` where it lands (under torchrun the parallel context
  turns it into a flag all ranks agree on); the loop saves the last completed step and exits.
* SIGTERM (what schedulers and ``docker stop`` send) does exactly what Ctrl-C does at that moment,
  as :class:`Terminated`, so the CLI exits 143 instead of 130.
* An optimizer update and its bookkeeping are never cut in half: :func:`deferred_signals` holds both
  signals until the block ends.
* While the exit checkpoint is written, a second signal only warns; a third abandons the save and
  the caller says plainly that nothing was saved (:func:`saving_on_exit`).
* A signal the process was started with ignored (``nohup``, a background job) stays ignored.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Any, Callable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM: stop like Ctrl-C (save, then exit) but report the signal."""


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _restore(signum: int, previous: Any) -> None:
    # getsignal() is None for a handler installed outside Python: fall back to Python's default.
    fallback = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
    signal.signal(signum, previous if previous is not None else fallback)


def _terminate_like_ctrl_c(signum: int, frame: Any) -> None:
    """SIGTERM handler: whatever Ctrl-C does now (raise, or set a distributed stop flag)."""
    on_int = signal.getsignal(signal.SIGINT)
    if callable(on_int) and on_int is not signal.default_int_handler:
        on_int(signum, frame)
        return
    raise Terminated()


@contextlib.contextmanager
def terminate_saves() -> Iterator[None]:
    """Install the SIGTERM -> Ctrl-C path for the training loop (main thread only)."""
    if not _main_thread() or signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate_like_ctrl_c)
    try:
        yield
    finally:
        _restore(signal.SIGTERM, previous)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM arriving inside the block until it is done, then hand the first one to
    the handler that was in place (an ignored signal stays ignored)."""
    if not _main_thread():
        yield
        return
    caught: list[tuple[int, Any]] = []
    previous: dict[int, Any] = {}
    for s in STOP_SIGNALS:
        if signal.getsignal(s) is not signal.SIG_IGN:
            previous[s] = signal.signal(s, lambda signum, frame: caught.append((signum, frame)))
    try:
        yield
    finally:
        for s, handler in previous.items():
            _restore(s, handler)
        if caught:
            signum, frame = caught[0]
            handler = signal.getsignal(signum)
            if callable(handler):
                handler(signum, frame)
            else:  # SIG_DFL
                raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def saving_on_exit(say: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Iterator[None]:
    """Around the checkpoint written on the way out: a second signal warns, a third raises
    KeyboardInterrupt inside the save (the atomic write then leaves nothing half-written)."""
    if not _main_thread():
        yield
        return
    count = 0

    def handler(signum: int, frame: Any) -> None:
        nonlocal count
        count += 1
        if count == 1:
            say("still saving the checkpoint; press Ctrl-C again to abandon it (nothing would be saved)")
            return
        raise KeyboardInterrupt()

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, h in previous.items():
            _restore(s, h)
