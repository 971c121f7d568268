"""Collect the cells of ``benchmarks/run_fsdp_h200x2.sh`` into ``cells.json`` and ``results.md``.

``python benchmarks/fsdp_cells.py OUT [--warmup 5]``

Each cell folder ``OUT/<cell>/`` holds ``cmd.txt``, ``rc.txt``, ``log.txt`` (raw output of every
rank) and ``run/`` (the run's ``metrics.jsonl`` and ``summary.json``, written by rank 0).

Per cell: ``tokens_per_s`` is the steady-state rate: non-padding tokens of all ranks between the end
of step ``warmup`` and the last step, over the loop's wall time between them (the first steps pay
for allocator growth, NCCL communicators and kernel selection). ``scaling`` = this rate over the
rate of the plain single-GPU run (``--distributed none``) of the same configuration at the same
per-GPU batch; ``scaling_vs_fsdp1`` the same against an FSDP group of one (FSDP's own copies, no
communication). ``peak_memory_bytes_per_rank`` is ``torch.cuda.max_memory_allocated`` of each rank.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any


def steady_rate(records: list[dict[str, Any]], warmup: int) -> tuple[float | None, int]:
    """(tokens/s over the steps after ``warmup``, steps measured); all steps when there are too few."""
    if not records:
        return None, 0
    w = warmup if len(records) > warmup + 1 else 0
    t0, n0 = (records[w - 1]["time_s"], records[w - 1]["tokens"]) if w else (0.0, 0)
    dt, dn = records[-1]["time_s"] - t0, records[-1]["tokens"] - n0
    return (dn / dt if dt > 0 else None), len(records) - w


def read_cell(d: Path, warmup: int) -> dict[str, Any]:
    rc_file = d / "rc.txt"
    cell: dict[str, Any] = {
        "cell": d.name, "status": "error", "rc": int(rc_file.read_text()) if rc_file.is_file() else None,
        "command": (d / "cmd.txt").read_text().strip() if (d / "cmd.txt").is_file() else None,
        "log": str(d / "log.txt"),
    }
    summary_file, metrics_file = d / "run" / "summary.json", d / "run" / "metrics.jsonl"
    if not summary_file.is_file():
        log = (d / "log.txt").read_text(errors="replace") if (d / "log.txt").is_file() else ""
        oom = "out of memory" in log.lower()
        cell.update(status="oom" if oom else "error", error="\n".join(log.strip().splitlines()[-15:]))
        return cell
    s = json.loads(summary_file.read_text())
    cfg = s["config"]
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    rate, measured = steady_rate(records, warmup)
    world = int(s.get("world_size", 1))
    peaks = s.get("peak_memory_bytes_per_rank") or [s["peak_memory_bytes"]]
    cell.update({
        "status": "ok" if cell["rc"] in (0, None) else "error",
        "model": cfg["model"], "n_layers": cfg.get("n_layers"),
        "method": "lora" if not cfg["full"] and cfg["lora_rank"] > 0 else "full",
        "precision": cfg["precision"], "grad_checkpoint": cfg["grad_checkpoint"], "distributed": cfg.get("distributed", "none"),
        "world_size": world, "global_batch": cfg["batch_size"], "per_gpu_batch": cfg["batch_size"] / world,
        "grad_accum": cfg["grad_accum"], "max_seq_len": cfg["max_seq_len"], "steps": s["steps"],
        "warmup_steps_excluded": len(records) - measured, "steps_measured": measured,
        "tokens_per_s": rate, "tokens_per_s_per_gpu": rate / world if rate else None,
        "tokens_per_s_all_steps": s["tokens_per_s"], "tokens": s["tokens"], "runtime_s": s["runtime_s"],
        "peak_memory_bytes_per_rank": peaks, "peak_memory_bytes": max(peaks),
        "trainable_params": s["trainable_params"], "total_params": s["total_params"],
        "mean_loss": s.get("avg_loss"), "device": s.get("device"),
    })
    return cell


def _key(c: dict[str, Any]) -> tuple:
    """What must agree for two cells to be "the same configuration at the same per-GPU batch"."""
    return (c["model"], c["n_layers"], c["method"], c["precision"], c["grad_checkpoint"], c["per_gpu_batch"],
            c["grad_accum"], c["max_seq_len"])


def add_scaling(cells: list[dict[str, Any]]) -> None:
    ok = [c for c in cells if c["status"] == "ok" and c.get("tokens_per_s")]
    plain1 = {_key(c): c for c in ok if c["world_size"] == 1 and c["distributed"] == "none"}
    fsdp1 = {_key(c): c for c in ok if c["world_size"] == 1 and c["distributed"] == "fsdp"}
    for c in cells:
        c["scaling"] = c["scaling_vs_fsdp1"] = c["scaling_efficiency"] = c["baseline_cell"] = None
        if c not in ok:
            continue
        base = plain1.get(_key(c))
        if base is not None:
            c["scaling"] = c["tokens_per_s"] / base["tokens_per_s"]
            c["scaling_efficiency"] = c["scaling"] / c["world_size"]
            c["baseline_cell"] = base["cell"]
        if _key(c) in fsdp1:
            c["scaling_vs_fsdp1"] = c["tokens_per_s"] / fsdp1[_key(c)]["tokens_per_s"]


def gib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**30:.1f}"


def table(cells: list[dict[str, Any]]) -> str:
    rows = ["| cell | status | GPUs | per-GPU batch | tokens/s | tokens/s/GPU | scaling (vs 1 GPU) | vs FSDP x1 "
            "| peak GiB per GPU |", "|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        f = lambda v, p=0: "-" if v is None else f"{v:,.{p}f}"
        rows.append(f"| {c['cell']} | {c['status']} | {c.get('world_size', '-')} ({c.get('distributed', '-')}) "
                    f"| {f(c.get('per_gpu_batch'))} | {f(c.get('tokens_per_s'))} | {f(c.get('tokens_per_s_per_gpu'))} "
                    f"| {f(c.get('scaling'), 3)} | {f(c.get('scaling_vs_fsdp1'), 3)} "
                    f"| {' / '.join(gib(p) for p in c.get('peak_memory_bytes_per_rank') or []) or '-'} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of the steady-state rate")
    args = ap.parse_args(argv)
    cells = [read_cell(d, args.warmup) for d in sorted(args.out.iterdir()) if d.is_dir() and (d / "cmd.txt").is_file()]
    if not cells:
        print(f"{args.out}: no cell folders (with cmd.txt)", file=sys.stderr)
        return 1
    add_scaling(cells)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    for c in cells:
        c["collected"] = now
    fd, tmp = tempfile.mkstemp(dir=args.out, prefix=".cells.json.")
    with os.fdopen(fd, "w") as f:
        json.dump(cells, f, indent=2)
    os.replace(tmp, args.out / "cells.json")
    text = (f"# FSDP2 cells ({now})\n\nSteady-state tokens/s after {args.warmup} warm-up steps, all ranks' "
            f"non-padding tokens. Raw logs: <cell>/log.txt. GPUs: gpu.txt.\n\n{table(cells)}\n")
    (args.out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
