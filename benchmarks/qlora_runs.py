"""Collect the runs of benchmarks/run_qlora_h200.sh: peak memory and tokens/s per run, steady state
(the first steps, with Triton compilation and allocator warm-up, left out) -> cells.json + a table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

WARMUP = 5  # steps left out of the steady-state rate


def collect(out: Path) -> list[dict]:
    cells = []
    for summary in sorted(out.glob("*/summary.json")):
        s = json.loads(summary.read_text())
        cfg = s["config"]
        recs = [json.loads(line) for line in (summary.parent / "metrics.jsonl").read_text().splitlines() if line]
        steady = recs[WARMUP:]
        dt = sum(r["tokens"] - p["tokens"] for p, r in zip(steady, steady[1:]))
        ts = steady[-1]["time_s"] - steady[0]["time_s"]
        cells.append({
            "name": summary.parent.name, "model": cfg["model"], "method": {"nf4": "qlora", "int8": "int8-lora"}.get(
                cfg["quantize"], "lora"), "quantize": cfg["quantize"], "offload": cfg["offload"],
            "precision": cfg["precision"], "grad_checkpoint": cfg["grad_checkpoint"], "micro_batch": cfg["batch_size"],
            "grad_accum": cfg["grad_accum"], "max_seq_len": cfg["max_seq_len"], "data": cfg["data"],
            "steps": s["steps"], "peak_alloc_bytes": s["peak_memory_bytes"],
            "tokens_per_s_all_steps": s["tokens_per_s"], "tokens_per_s_steady": dt / ts if ts > 0 else None,
            "warmup_steps_excluded": WARMUP, "first_loss": s["first_loss"], "final_loss": s["final_loss"],
        })
    return cells


def main(out: str) -> None:
    cells = collect(Path(out))
    (Path(out) / "cells.json").write_text(json.dumps(cells, indent=1) + "\n")
    print("| run | method | offload | batch | peak GiB | tok/s (steady) | tok/s (all steps) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for c in cells:
        print(f"| {c['name']} | {c['method']} | {c['offload']} | {c['micro_batch']} | {c['peak_alloc_bytes'] / 2**30:.2f} "
              f"| {c['tokens_per_s_steady'] or 0:,.0f} | {c['tokens_per_s_all_steps']:,.0f} |")


if __name__ == "__main__":
    main(sys.argv[1])
