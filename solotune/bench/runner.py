"""The benchmark matrix: every on/off combination of the chosen techniques, one subprocess per cell.

Axes (each on/off): ``ga`` gradient accumulation (1 / ``ga_on``), ``precision`` (fp32 /
``precision_on``, fp16 AMP by default as in the course), ``lora`` (full fine-tuning / LoRA), ``gc``
gradient checkpointing (off / ``gc_on``). An axis left out of ``axes`` stays at its fixed value: off for
ga, gc and precision, on for LoRA (the product's default method), unless ``fixed`` pins it
(``--fix ga=on``); ``--axes none --fix ...`` runs a single cell.

With ``reference="hf"`` every solotune cell that ran is followed by the same cell in HF
transformers + peft (when both are importable); cells that ran out of memory in solotune, and
checkpointing policies HF lacks, are recorded as ``skipped``.

The raw log (every cell's stderr and the progress lines) goes to ``OUT/bench.log``; ``cells.json``
is rewritten after every cell, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from ..errors import ConfigError
from ..peft.spec import LoRASpec
from ..train.precision import TRAINING_PRECISIONS
from .cell import CellSpec
from .plan import GiB

AXES = ("ga", "precision", "lora", "gc")  # the course's columns (GA, mixed precision, LoRA) + checkpointing


@dataclass
class BenchConfig:
    model: str = "llama2-7b"
    layers: int | None = None
    samples: int = 200
    seq_len: int = 512
    micro_batch: int = 1
    axes: tuple[str, ...] = AXES
    fixed: dict[str, bool] = field(default_factory=dict)  # pins for axes left out (default: FIXED)
    ga_on: int = 8
    gc_on: str = "all"
    precision_on: str = "fp16-amp"
    lora_rank: int = LoRASpec.rank  # the defaults are LoRASpec's (peft/spec.py): one source
    lora_alpha: float = LoRASpec.alpha
    lora_dropout: float = LoRASpec.dropout
    lora_targets: tuple[str, ...] = LoRASpec.targets
    quantize: str = "none"  # none | nf4 | int8 (LoRA cells; full fine-tuning cells keep a 16-bit base)
    offload: str = "none"
    # adamw | adamw-8bit | auto (full fine-tuning cells: plan's cheapest technique under memory_limit_bytes)
    optimizer: str = "adamw"
    optimizer_in_backward: bool = False  # cells with grad_accum 1 (others keep the plain step)
    memory_limit_bytes: int | None = None
    lr: float = 1e-5
    seed: int = 0
    reference: str | None = None  # "hf"
    device: str = "auto"
    out: str = "benchmarks/results/bench"
    cell_timeout_s: float = 1200.0
    time_budget_s: float | None = None
    sdpa: str = "no-cudnn"
    command: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.axes = tuple(dict.fromkeys(self.axes))
        bad = [a for a in self.axes if a not in AXES]
        if bad:
            raise ConfigError(f"--axes {','.join(self.axes)}: choose from {','.join(AXES)} (or none)")
        clash = [a for a in self.fixed if a not in AXES or a in self.axes]
        if clash:
            raise ConfigError(f"--fix {','.join(clash)}: pin only axes that --axes leaves out ({','.join(AXES)})")
        if self.precision_on not in TRAINING_PRECISIONS or self.precision_on == "fp32":
            raise ConfigError(f"--precision-on {self.precision_on!r}: choose from fp16-amp, bf16-amp, bf16")
        if self.reference not in (None, "hf"):
            raise ConfigError(f"--reference {self.reference!r}: only 'hf' is supported")
        if self.reference and (self.quantize != "none" or self.offload != "none"):
            raise ConfigError("--reference hf with --quantize/--offload: the HF + bitsandbytes reference cell is not "
                              "built yet; run without --reference")
        if self.ga_on < 2:
            raise ConfigError(f"--ga-on must be >= 2, got {self.ga_on}")
        if not 1 <= self.samples <= 200:
            raise ConfigError(f"--samples must be in 1..200 (the course's training split), got {self.samples}")


def axis_values(bc: BenchConfig, axis: str, on: bool) -> dict[str, Any]:
    return {
        "ga": {"grad_accum": bc.ga_on if on else 1},
        "gc": {"grad_checkpoint": bc.gc_on if on else "off"},
        "precision": {"precision": bc.precision_on if on else "fp32"},
        "lora": {"method": "lora" if on else "full"},
    }[axis]


FIXED = {"ga": False, "gc": False, "precision": False, "lora": True}


def matrix(bc: BenchConfig) -> list[CellSpec]:
    """The solotune cells in the course's table order: GA, mixed precision, LoRA, then checkpointing
    (off before on, the last axis varying fastest)."""
    cells = []
    for combo in itertools.product((False, True), repeat=len(AXES)):
        state = dict(zip(AXES, combo))
        fixed = {**FIXED, **bc.fixed}
        if any(state[a] != fixed[a] for a in AXES if a not in bc.axes):
            continue
        kw: dict[str, Any] = {}
        for a in AXES:
            kw.update(axis_values(bc, a, state[a]))
        cells.append(CellSpec(model=bc.model, layers=bc.layers, samples=bc.samples, seq_len=bc.seq_len,
                              micro_batch=bc.micro_batch, lora_rank=bc.lora_rank, lora_alpha=bc.lora_alpha,
                              lora_dropout=bc.lora_dropout, lora_targets=bc.lora_targets, lr=bc.lr, seed=bc.seed,
                              device=bc.device, time_budget_s=bc.time_budget_s, sdpa=bc.sdpa, command=bc.command,
                              quantize=bc.quantize if kw["method"] == "lora" else "none", offload=bc.offload,
                              memory_limit_bytes=bc.memory_limit_bytes,
                              optimizer="adamw" if bc.optimizer == "auto" else bc.optimizer,
                              optimizer_in_backward=bc.optimizer_in_backward and kw["grad_accum"] == 1, **kw))
    if bc.optimizer == "auto":
        from .optim_choice import with_cheapest_optimizer

        cells = [with_cheapest_optimizer(c, bc.memory_limit_bytes) if c.method == "full" else c for c in cells]
    return cells


# ------------------------------------------------------------------------------ running
def run_cell_subprocess(spec: CellSpec, timeout_s: float, log: TextIO) -> dict[str, Any]:
    """Run one cell in a fresh Python process; a crash or timeout becomes an error result."""
    cmd = [sys.executable, "-m", "solotune.bench.cell", "--json", json.dumps(spec.to_dict())]
    log.write(f"\n===== cell {spec.cell_id}\n$ {shlex.join(cmd)}\n")
    log.flush()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, timeout=timeout_s,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:
        return _failed(spec, f"timed out after {timeout_s:.0f} s (see bench.log)", time.perf_counter() - t0)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        return _failed(spec, f"cell process exited with code {proc.returncode} (see bench.log)", time.perf_counter() - t0)
    try:
        res = json.loads(lines[-1])
    except json.JSONDecodeError:
        return _failed(spec, "cell printed no JSON result (see bench.log)", time.perf_counter() - t0)
    res["wall_s"] = time.perf_counter() - t0
    return res


def _failed(spec: CellSpec, message: str, wall: float, status: str = "error") -> dict[str, Any]:
    return {"model": spec.model, "layers": spec.layers, "seq_len": spec.seq_len, "micro_batch": spec.micro_batch,
            "grad_accum": spec.grad_accum, "grad_checkpoint": spec.grad_checkpoint, "precision": spec.precision,
            "method": spec.method, "impl": spec.impl, "cell_id": spec.cell_id, "status": status,
            "peak_alloc_bytes": None, "peak_reserved_bytes": None, "predicted_peak_bytes": None, "runtime_s": None,
            "tokens": None, "tokens_per_s": None, "mean_loss": None, "trainable_params": None, "anatomy": None,
            "mfu": None, "error": message, "device": None, "torch": None,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": spec.command, "wall_s": wall}


def measure_matmul(device: str, log: TextIO) -> dict[str, Any]:
    """The device's bf16 matmul rate, measured in a subprocess (the runner never touches the GPU)."""
    cmd = [sys.executable, "-m", "solotune.bench.cell", "--matmul", "--device", device]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, timeout=300)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError):
        return {"device": None, "matmul_tflops": None}


def progress_line(i: int, n: int, r: dict[str, Any]) -> str:
    def gib(x: Any) -> str:
        return "-" if x is None else f"{x / GiB:.2f} GiB"

    head = (f"[{i:>2}/{n}] ga={r['grad_accum']:<2} gc={r['grad_checkpoint']:<7} {r['precision']:<8} "
            f"{r['method']:<4} {r['impl']:<8}")
    st = r["status"]
    if st == "ok":
        pred = r.get("predicted_peak_bytes")
        err = f", {100 * (pred / r['peak_alloc_bytes'] - 1):+.1f}%" if pred and r["peak_alloc_bytes"] else ""
        rt = f"{r['runtime_s']:.1f} s" + (" (extrapolated)" if r.get("runtime_extrapolated") else "")
        tps = f"{r['tokens_per_s']:.0f} tok/s" if r.get("tokens_per_s") else ""
        return f"{head} ok    peak {gib(r['peak_alloc_bytes'])} (pred {gib(pred)}{err})  {rt}  {tps}  loss {r['mean_loss']:.3f}"
    if st == "oom":
        return (f"{head} OOM   at {gib(r.get('peak_alloc_bytes'))} allocating {gib(r.get('oom_request_bytes'))} "
                f"more (planner: {gib(r.get('predicted_peak_bytes'))})")
    return f"{head} {st.upper():<5} {r.get('error') or ''}"


def run_bench(bc: BenchConfig, say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run the matrix and write the report; returns the cell results."""
    from . import report
    from .hf_cell import available as hf_available

    out = Path(bc.out)
    out.mkdir(parents=True, exist_ok=True)
    cells = matrix(bc)
    want_hf = bc.reference == "hf"
    if want_hf and not hf_available():
        say("--reference hf: transformers and/or peft are not installed; running solotune cells only")
        want_hf = False
    n = len(cells) * (2 if want_hf else 1)
    results: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    with open(out / "bench.log", "a") as log:
        log.write(f"\n##### {time.strftime('%Y-%m-%d %H:%M:%S')} {bc.command}\n")
        mm = measure_matmul(bc.device, log)
        bc.extra["matmul"] = mm
        if mm.get("matmul_tflops"):
            say(f"{mm['device']}: measured bf16 matmul rate {mm['matmul_tflops']:.0f} TFLOP/s (MFU denominator)")
        i = 0
        for spec in cells:
            spec.matmul_tflops = mm.get("matmul_tflops")
            todo = [spec]
            if want_hf:
                todo.append(CellSpec.from_dict({**spec.to_dict(), "impl": "hf"}))
            for s in todo:
                i += 1
                if s.impl == "hf" and (results[-1]["status"] != "ok" or s.grad_checkpoint not in ("off", "all")):
                    why = ("the solotune cell did not fit" if results[-1]["status"] == "oom" else
                           f"the solotune cell ended with {results[-1]['status']}" if results[-1]["status"] != "ok"
                           else f"HF has no {s.grad_checkpoint} checkpointing policy")
                    r = _failed(s, f"not run: {why}", 0.0, status="skipped")
                else:
                    r = run_cell_subprocess(s, bc.cell_timeout_s, log)
                results.append(r)
                line = progress_line(i, n, r)
                say(line)
                log.write(line + "\n")
                log.flush()
                report.write_json(out / "cells.json", results)
        log.write(f"##### done in {time.perf_counter() - t_start:.0f} s\n")
    report.write_report(out, results, bc)
    say(f"wrote {out / 'report.md'}, cells.json, cells.csv, anatomy.png, memory_runtime.png "
        f"({time.perf_counter() - t_start:.0f} s)")
    return results
