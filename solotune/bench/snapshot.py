"""What was allocated at the CUDA allocator's peak, and where it came from: a replay of the
allocator's trace (``torch.cuda.memory._record_memory_history``), for the bytes the anatomy can only
call "rest" (transients inside compiled graphs, library workspaces) and the planner does not model.

    summary = record_peak(step)          # CUDA: one call of ``step`` under the allocator's recorder
    print(format_peak(summary))          # the blocks alive at the peak, grouped by where they were made

The replay counts what ``torch.cuda.max_memory_allocated`` counts: an ``alloc`` adds the block's
size, its ``free_requested`` takes it away (the allocator lowers its allocated bytes there, even
when the memory is reused only after other streams' events). Bytes allocated before recording began
are the ``baseline`` (blocks whose ``alloc`` is not in the trace); their frees lower it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch


@dataclass(frozen=True)
class PeakSummary:
    """The allocated bytes at the peak of a recorded window and the blocks alive then."""

    baseline: int  # allocated before recording (what is left of it at the peak)
    peak: int  # baseline + the window's blocks alive at the peak
    alive: tuple[tuple[str, int, int], ...]  # (where, blocks, bytes) at the peak, most bytes first


def where(frames: Iterable[dict[str, Any]], prefer: str = "solotune") -> str:
    """The frame that made a block: the innermost one in a file whose path contains ``prefer``, else
    the innermost Python frame (a ``.py`` file), else the innermost frame at all."""
    frames = list(frames)
    pick = (next((f for f in frames if prefer in f.get("filename", "")), None)
            or next((f for f in frames if f.get("filename", "").endswith(".py")), None)
            or (frames[0] if frames else None))
    if pick is None:
        return "?"
    return f"{pick.get('filename', '?')}:{pick.get('line', '?')} {pick.get('name', '')}".strip()


def peak_of_trace(trace: Iterable[dict[str, Any]], baseline: int = 0, prefer: str = "solotune") -> PeakSummary:
    """Replay one device's trace entries (dicts with ``action``, ``addr``, ``size``, ``frames``)."""
    live: dict[int, tuple[int, str]] = {}  # addr -> (size, where) of blocks allocated in the window
    total = baseline
    peak, at_peak = total, {}
    for e in trace:
        action = e.get("action")
        if action == "alloc":
            live[e["addr"]] = (e["size"], where(e.get("frames", ()), prefer))
            total += e["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif action == "free_requested":
            size, _ = live.pop(e["addr"], (e["size"], ""))  # not in the window: part of the baseline
            total -= size
    groups: dict[str, list[int]] = {}
    for size, site in at_peak.values():
        g = groups.setdefault(site, [0, 0])
        g[0] += 1
        g[1] += size
    alive = tuple(sorted(((s, n, b) for s, (n, b) in groups.items()), key=lambda r: -r[2]))
    return PeakSummary(baseline=peak - sum(b for _, _, b in alive), peak=peak, alive=alive)


def record_peak(step: Callable[[], Any], device: torch.device | int | None = None, max_entries: int = 1_000_000,
                prefer: str = "solotune") -> PeakSummary:
    """Run ``step`` once under the CUDA allocator's recorder (after a synchronize) and replay it."""
    torch.cuda.synchronize(device)
    baseline = torch.cuda.memory_allocated(device)
    # Python frames only: C++ unwinding on every allocation would slow the step many times over
    torch.cuda.memory._record_memory_history(enabled="all", stacks="python", max_entries=max_entries)
    try:
        step()
        torch.cuda.synchronize(device)
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return peak_of_trace(snap["device_traces"][index], baseline, prefer)


def format_peak(s: PeakSummary, top: int = 25) -> str:
    """The summary as text (MiB), the ``top`` sites with the most bytes alive at the peak."""
    mib = 2**20
    lines = [f"peak allocated {s.peak / mib:,.1f} MiB: {s.baseline / mib:,.1f} MiB from before the window, "
             f"{(s.peak - s.baseline) / mib:,.1f} MiB made in it, by site:"]
    lines += [f"{b / mib:10.2f} MiB  {n:5d} blocks  {site}" for site, n, b in s.alive[:top]]
    if len(s.alive) > top:
        rest = s.alive[top:]
        lines.append(f"{sum(b for *_, b in rest) / mib:10.2f} MiB  {sum(n for _, n, _ in rest):5d} blocks  "
                     f"({len(rest)} more sites)")
    return "\n".join(lines)
