"""The benchmark matrix: every on/off combination of the chosen techniques, one subprocess per cell.

Axes (each on/off): ``ga`` gradient accumulation (1 / ``ga_on``), ``precision`` (fp32 /
``precision_on``, fp16 AMP by default as in the course), ``lora`` (full fine-tuning / LoRA), ``gc``
gradient checkpointing (off / ``gc_on``), and the training-speed options of the loop ``packing``,
``compile``, ``kernels`` (off / their ``--packing``/``--compile``/``--kernels`` value, or the first
non-off choice). An axis left out of ``axes`` stays at its fixed value: off for ga, gc and
precision, on for LoRA (the product's default method), the flag's value for the speed options,
unless ``fixed`` pins it (``--fix ga=on``); ``--axes none --fix ...`` runs a single cell.

With ``reference="hf"`` (or ``hf-liger``, or both: ``hf,hf-liger``) every solotune cell that ran is
followed by the same cell in HF transformers + peft (+ Liger-Kernel); solotune's loop options are
off there, and so are offload and another optimizer (HF has none: the reference is the nearest
configuration, ``cell.REFERENCE_NEAREST``), so cells that differ only in them share one reference
cell. A reference cell is recorded as ``skipped`` with the reason when the solotune cell did not
fit, when HF cannot run the configuration (``every:K`` checkpointing, int8) or when its packages
are missing.

``--find-max-seq-len`` (:func:`find_max_seq_len`): instead of the matrix, the longest row that
trains at micro-batch 1 under ``--memory-limit``, by real cells on random rows: first at the
planner's longest, then a few probes around it (``probes.json``, ``max_seq_len.json``).

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
from .cell import DATA, LOOP_OFF, LOOP_OPTIONS, REFERENCE_IMPLS, CellSpec, reference_gap
from .plan import GiB

AXES = ("ga", "precision", "lora", "gc")  # the course's columns (GA, mixed precision, LoRA) + checkpointing
SPEED_AXES = ("packing", "compile", "kernels")  # training-speed options of the loop (issue 11)
ALL_AXES = AXES + SPEED_AXES


@dataclass
class BenchConfig:
    model: str = "llama2-7b"
    layers: int | None = None
    samples: int = 200
    seq_len: int = 512
    micro_batch: int = 1
    data: str = "alpaca-sample"  # alpaca-sample | random (fixed-length rows of random tokens)
    axes: tuple[str, ...] = AXES
    fixed: dict[str, bool] = field(default_factory=dict)  # pins for axes left out (default: FIXED)
    ga_on: int = 8
    gc_on: str = "all"
    precision_on: str = "fp16-amp"
    lora_rank: int = LoRASpec.rank  # the defaults are LoRASpec's (peft/spec.py): one source
    lora_alpha: float = LoRASpec.alpha
    lora_dropout: float = LoRASpec.dropout
    lora_targets: tuple[str, ...] = LoRASpec.targets
    quantize: str = "none"  # train.config.QUANTIZE (LoRA cells; full fine-tuning cells keep a 16-bit base)
    offload: str = "none"
    # adamw | adamw-8bit | auto (full fine-tuning cells: plan's cheapest technique under memory_limit_bytes)
    optimizer: str = "adamw"
    optimizer_in_backward: bool = False  # cells with grad_accum 1 (others keep the plain step)
    memory_limit_bytes: int | None = None
    packing: str = LOOP_OPTIONS["packing"]  # the loop options (TrainConfig's defaults; a speed axis: its "on")
    compile: str = LOOP_OPTIONS["compile"]
    kernels: str = LOOP_OPTIONS["kernels"]
    loss: str = LOOP_OPTIONS["loss"]
    warmup_steps: int = 2
    lr: float = 1e-5
    seed: int = 0
    reference: str | None = None  # "hf", "hf-liger" or "hf,hf-liger"
    device: str = "auto"
    out: str = "benchmarks/results/bench"
    cell_timeout_s: float = 1200.0
    time_budget_s: float | None = None
    sdpa: str = "no-cudnn"
    command: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.axes = tuple(dict.fromkeys(self.axes))
        bad = [a for a in self.axes if a not in ALL_AXES]
        if bad:
            raise ConfigError(f"--axes {','.join(self.axes)}: choose from {','.join(ALL_AXES)} (or none)")
        clash = [a for a in self.fixed if a not in ALL_AXES or a in self.axes]
        if clash:
            raise ConfigError(f"--fix {','.join(clash)}: pin only axes that --axes leaves out ({','.join(ALL_AXES)})")
        if self.precision_on not in TRAINING_PRECISIONS or self.precision_on == "fp32":
            raise ConfigError(f"--precision-on {self.precision_on!r}: choose from fp16-amp, bf16-amp, bf16")
        bad = [r for r in self.references if r not in REFERENCE_IMPLS]
        if bad:
            raise ConfigError(f"--reference {self.reference!r}: choose from {', '.join(REFERENCE_IMPLS)} (comma-separated)")
        if self.data not in DATA:
            raise ConfigError(f"--data {self.data!r}: choose from {', '.join(DATA)}")
        CellSpec(packing=self.packing, compile=self.compile, kernels=self.kernels, loss=self.loss,
                 warmup_steps=self.warmup_steps)  # validates the loop options (one place: CellSpec)
        if self.ga_on < 2:
            raise ConfigError(f"--ga-on must be >= 2, got {self.ga_on}")
        if self.data != "random" and not 1 <= self.samples <= 200:
            raise ConfigError(f"--samples must be in 1..200 (the course's training split), got {self.samples}")
        if self.samples < 1:
            raise ConfigError(f"--samples must be >= 1, got {self.samples}")

    @property
    def references(self) -> tuple[str, ...]:
        """The reference implementations to run after each solotune cell, in order."""
        return tuple(dict.fromkeys(r.strip() for r in (self.reference or "").split(",") if r.strip()))

    def on_value(self, axis: str) -> str:
        """What a speed axis's "on" means: its flag's value, or the first choice that is neither off
        nor auto."""
        value = getattr(self, axis)
        if value not in ("off", "auto"):
            return value
        from ..train import config as tc

        choices = {"packing": tc.PACKING, "compile": tc.COMPILE, "kernels": tc.KERNELS}[axis]
        return next(c for c in choices if c not in ("off", "auto"))


def axis_values(bc: BenchConfig, axis: str, on: bool) -> dict[str, Any]:
    if axis in SPEED_AXES:
        return {axis: bc.on_value(axis) if on else LOOP_OFF[axis]}
    return {
        "ga": {"grad_accum": bc.ga_on if on else 1},
        "gc": {"grad_checkpoint": bc.gc_on if on else "off"},
        "precision": {"precision": bc.precision_on if on else "fp32"},
        "lora": {"method": "lora" if on else "full"},
    }[axis]


FIXED = {"ga": False, "gc": False, "precision": False, "lora": True}


def fixed_state(bc: BenchConfig) -> dict[str, bool]:
    """Each course axis's value when --axes leaves it out: FIXED, then the --fix pins. (A speed axis
    left out and not pinned takes its flag's value as it is, "auto" included: see :func:`matrix`.)"""
    return {**FIXED, **bc.fixed}


def matrix(bc: BenchConfig) -> list[CellSpec]:
    """The solotune cells in the course's table order: GA, mixed precision, LoRA, then checkpointing
    (off before on, the last axis varying fastest)."""
    cells = []
    fixed = fixed_state(bc)
    axes = [a for a in ALL_AXES if a in AXES or a in bc.axes or a in bc.fixed]  # on/off switched or pinned
    free = {a: getattr(bc, a) for a in SPEED_AXES if a not in axes}
    for combo in itertools.product((False, True), repeat=len(axes)):
        state = dict(zip(axes, combo))
        if any(state[a] != fixed[a] for a in axes if a not in bc.axes):
            continue
        kw: dict[str, Any] = dict(free)
        for a in axes:
            kw.update(axis_values(bc, a, state[a]))
        cells.append(CellSpec(model=bc.model, layers=bc.layers, samples=bc.samples, seq_len=bc.seq_len,
                              data=bc.data, loss=bc.loss, warmup_steps=bc.warmup_steps,
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
def cell_env(spec: CellSpec, environ: Any) -> dict[str, str]:
    """The cell process's environment. Under ``--memory-limit`` the cap binds the allocator's *reserved*
    memory, and fragmentation left 1-2 GiB reserved but unusable there (7B long rows,
    benchmarks/results/frontier3-h200/run4): such cells get expandable segments (reserved ~ allocated,
    what the planner predicts) unless the user set ``PYTORCH_CUDA_ALLOC_CONF`` themselves."""
    env = {**environ, "PYTHONUNBUFFERED": "1"}
    if spec.memory_limit_bytes and "PYTORCH_CUDA_ALLOC_CONF" not in environ:
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    return env


def run_cell_subprocess(spec: CellSpec, timeout_s: float, log: TextIO) -> dict[str, Any]:
    """Run one cell in a fresh Python process; a crash or timeout becomes an error result."""
    cmd = [sys.executable, "-m", "solotune.bench.cell", "--json", json.dumps(spec.to_dict())]
    log.write(f"\n===== cell {spec.cell_id}\n$ {shlex.join(cmd)}\n")
    log.flush()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, timeout=timeout_s,
                              env=cell_env(spec, os.environ))
    except subprocess.TimeoutExpired:
        return _failed(spec, f"timed out after {timeout_s:.0f} s (see bench.log; --cell-timeout gives a cell longer)",
                       time.perf_counter() - t0)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        return _failed(spec, f"cell process exited with code {proc.returncode} (see bench.log)", time.perf_counter() - t0)
    try:
        res = json.loads(lines[-1])
    except json.JSONDecodeError:
        return _failed(spec, "cell printed no JSON result (see bench.log)", time.perf_counter() - t0)
    res["wall_s"] = time.perf_counter() - t0
    return res


def _failed(spec: CellSpec, message: str, wall: float, status: str = "error", impl: str | None = None) -> dict[str, Any]:
    """The result of a cell that produced none; ``impl``: a reference cell of ``spec`` that was not run."""
    impl = impl or spec.impl
    options = {} if impl == spec.impl else LOOP_OFF  # a reference cell runs the loop options off
    cell_id = spec.cell_id if impl == spec.impl else CellSpec.from_dict(
        {**spec.to_dict(), **LOOP_OFF}).cell_id.rsplit("-", 1)[0] + f"-{impl}"
    return {"model": spec.model, "layers": spec.layers, "seq_len": spec.seq_len, "micro_batch": spec.micro_batch,
            "grad_accum": spec.grad_accum, "grad_checkpoint": spec.grad_checkpoint, "precision": spec.precision,
            "method": spec.method_name, "quantize": spec.quantize, "offload": spec.offload, "data": spec.data,
            "optimizer": spec.optimizer, "optimizer_in_backward": spec.optimizer_in_backward,
            **{k: options.get(k, getattr(spec, k)) for k in LOOP_OPTIONS},
            "memory_limit_bytes": spec.memory_limit_bytes, "impl": impl, "cell_id": cell_id, "status": status,
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
        # The steady state is the speed to compare: the whole-run rate carries the warm-up (compilation).
        if r.get("steady_tokens_per_s"):
            warm = f"compile {r['compile_s']:.1f} s" if r.get("compile_s") else f"warm-up {r.get('warmup_s') or 0:.1f} s"
            if r.get("compile_steps_after_warmup"):  # a step that compiled later is not steady: say so
                warm += f", {r['compile_steps_after_warmup']} later step(s) compiled, not counted"
            tps = f"{r['steady_tokens_per_s']:.0f} tok/s steady ({warm})"
        else:
            tps = f"{r['tokens_per_s']:.0f} tok/s" if r.get("tokens_per_s") else ""
        return f"{head} ok    peak {gib(r['peak_alloc_bytes'])} (pred {gib(pred)}{err})  {rt}  {tps}  loss {r['mean_loss']:.3f}"
    if st == "oom":
        return (f"{head} OOM   at {gib(r.get('peak_alloc_bytes'))} allocating {gib(r.get('oom_request_bytes'))} "
                f"more (planner: {gib(r.get('predicted_peak_bytes'))})")
    return f"{head} {st.upper():<5} {r.get('error') or ''}"


def run_bench(bc: BenchConfig, say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run the matrix and write the report; returns the cell results."""
    from . import report

    out = Path(bc.out)
    out.mkdir(parents=True, exist_ok=True)
    cells = matrix(bc)
    refs = bc.references
    results: list[dict[str, Any]] = []
    shared: dict[str, dict[str, Any]] = {}  # reference cells already run (cells differing in loop options share one)
    t_start = time.perf_counter()
    with open(out / "bench.log", "a") as log:
        log.write(f"\n##### {time.strftime('%Y-%m-%d %H:%M:%S')} {bc.command}\n")
        mm = measure_matmul(bc.device, log)
        bc.extra["matmul"] = mm
        if mm.get("matmul_tflops"):
            say(f"{mm['device']}: measured bf16 matmul rate {mm['matmul_tflops']:.0f} TFLOP/s (MFU denominator)")

        def record(r: dict[str, Any]) -> None:
            results.append(r)
            line = progress_line(len(results), len(cells) * (1 + len(refs)), r)
            say(line)
            log.write(line + "\n")
            log.flush()
            report.write_json(out / "cells.json", results)

        for spec in cells:
            spec.matmul_tflops = mm.get("matmul_tflops")
            ours = run_cell_subprocess(spec, bc.cell_timeout_s, log)
            record(ours)
            for impl in refs:
                r = reference_cell(spec, impl, ours, shared, bc.cell_timeout_s, log)
                if r is not None:
                    record(r)
        log.write(f"##### done in {time.perf_counter() - t_start:.0f} s\n")
    report.write_report(out, results, bc)
    say(f"wrote {out / 'report.md'}, cells.json, cells.csv, anatomy.png, memory_runtime.png "
        f"({time.perf_counter() - t_start:.0f} s)")
    return results


def reference_cell(spec: CellSpec, impl: str, ours: dict[str, Any], shared: dict[str, dict[str, Any]],
                   timeout_s: float, log: TextIO) -> dict[str, Any] | None:
    """The reference ``impl``'s cell after solotune's ``spec`` (result ``ours``): run, ``skipped``
    with the reason, or None when the same reference cell already ran for an earlier solotune cell."""
    from .hf_cell import missing_package

    why = reference_gap(spec) or missing_package(impl, spec.as_reference(impl).quantize) or (
        None if ours["status"] == "ok" else
        "the solotune cell did not fit" if ours["status"] == "oom" else f"the solotune cell ended with {ours['status']}")
    if why is not None:
        return _failed(spec, f"not run: {why}", 0.0, status="skipped", impl=impl)
    ref = spec.as_reference(impl)
    key = json.dumps({**ref.to_dict(), "command": "", "matmul_tflops": None}, sort_keys=True)
    if key in shared:
        return None
    shared[key] = run_cell_subprocess(ref, timeout_s, log)
    return shared[key]


# ------------------------------------------------------------------- longest trainable row
def probe_lengths(predicted: int, results: dict[int, str], rel_step: float, step: int = 128) -> int | None:
    """The next seq_len to probe, from the planner's longest and the statuses so far ({T: "ok" |
    "oom"}): the prediction first; then, until both sides are known, ``rel_step`` (doubling each
    time) beyond the last probe; then the midpoint of the bracket. None when the bracket is one
    ``step`` wide."""
    if not results:
        return predicted
    fit = max((t for t, st in results.items() if st == "ok"), default=None)
    over = min((t for t, st in results.items() if st != "ok"), default=None)
    if fit is not None and over is not None:
        if over - fit <= step:
            return None
        return max(fit + step, (fit + over) // 2 // step * step)
    k = len(results) - 1  # probes already made on this side (beyond the first)
    factor = rel_step * 2**k
    if over is None:
        return -(-int(fit * (1 + factor)) // step) * step
    return max(step, int(over * (1 - factor)) // step * step)


def find_max_seq_len(bc: BenchConfig, max_probes: int = 3, rel_step: float = 0.04, step: int = 128,
                     probe_samples: int = 2, probe_start: float = 1.0,
                     say: Callable[[str], None] = print) -> dict[str, Any]:
    """The longest row that trains at micro-batch 1 within ``bc.memory_limit_bytes``, measured by
    real cells (random rows of exactly T tokens, ``probe_samples`` optimizer steps each: with 2 the
    optimizer state exists, as the planner assumes; 1 saves a long step and misses only LoRA's
    small AdamW state) around the planner's longest, the first at ``probe_start`` times it (below 1:
    a margin for the allocator's slack when each probe of a long row costs minutes); writes
    ``probes.json`` (the cells) and ``max_seq_len.json`` (predicted and measured) under ``bc.out``;
    returns the latter."""
    import torch

    from . import report
    from .cell import planner_setup
    from .plan import longest_seq_len, model_config

    if not bc.memory_limit_bytes:
        raise ConfigError("--find-max-seq-len needs --memory-limit (the memory to fit in, e.g. 24GiB)")
    if not 0 < probe_start <= 1:
        raise ConfigError(f"--probe-start {probe_start}: a fraction of the planner's longest, in (0, 1]")
    cells = matrix(BenchConfig(**{**_fields(bc), "data": "random", "micro_batch": 1,
                                       "samples": probe_samples}))
    if len(cells) != 1:
        raise ConfigError(f"--find-max-seq-len searches one configuration; --axes/--fix give {len(cells)} cells "
                          "(use --axes none --fix ...)")
    base = cells[0]
    cfg = model_config(bc.model, bc.layers)
    device = torch.device("cpu" if bc.device == "cpu" else "cuda")  # the planner's kernels; nothing runs here
    planned = longest_seq_len(planner_setup(base, cfg, step, device), bc.memory_limit_bytes, step=step)
    out = Path(bc.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "model": bc.model, "layers": cfg.n_layers, "method": base.method_name, "quantize": base.quantize,
        "offload": base.offload, "precision": base.precision, "grad_checkpoint": base.grad_checkpoint,
        "loss": base.loss, "micro_batch": 1, "data": "random", "memory_limit_bytes": bc.memory_limit_bytes,
        "predicted_longest": planned.seq_len, "predicted_first_over": planned.first_over,
        "predicted_peak_at_longest": planned.prediction.peak, "longest_fit": None, "shortest_oom": None,
        "probes": [], "command": bc.command, "step": step, "probe_samples": probe_samples, "probe_start": probe_start}
    say(f"planner: longest {planned.seq_len} tokens within {bc.memory_limit_bytes / 2**30:.2f} GiB "
        f"(peak {planned.prediction.peak / 2**30:.2f} GiB; {planned.first_over} does not fit)")
    results: list[dict[str, Any]] = []
    statuses: dict[int, str] = {}
    with open(out / "bench.log", "a") as log:
        log.write(f"\n##### {time.strftime('%Y-%m-%d %H:%M:%S')} {bc.command}\n")
        first = max(step, int(planned.seq_len * probe_start) // step * step) if planned.seq_len else None
        while len(statuses) < max_probes and first:
            T = probe_lengths(first, statuses, rel_step, step)
            if T is None or T in statuses:
                break
            r = run_cell_subprocess(CellSpec.from_dict({**base.to_dict(), "seq_len": T}), bc.cell_timeout_s, log)
            r["probe"] = len(results) + 1
            results.append(r)
            statuses[T] = r["status"]
            peak = r.get("peak_alloc_bytes")
            line = (f"[probe {len(results)}/{max_probes}] seq_len {T}: {r['status']}"
                    + (f", peak {peak / 2**30:.2f} GiB" if peak else "")
                    + (f" (pred {r['predicted_peak_bytes'] / 2**30:.2f} GiB)" if r.get("predicted_peak_bytes") else "")
                    + (f" {r.get('error')}" if r["status"] not in ("ok", "oom") else ""))
            say(line)
            log.write(line + "\n")
            log.flush()
            report.write_json(out / "probes.json", results)
            if r["status"] not in ("ok", "oom"):
                break  # an error is neither side of the bracket
    fits = [t for t, st in statuses.items() if st == "ok"]
    ooms = [t for t, st in statuses.items() if st == "oom"]
    summary.update(longest_fit=max(fits, default=None), shortest_oom=min(ooms, default=None),
                   probes=[{k: r.get(k) for k in ("seq_len", "status", "peak_alloc_bytes", "peak_reserved_bytes",
                                                  "predicted_peak_bytes", "oom_request_bytes", "steady_tokens_per_s",
                                                  "error")} for r in results],
                   device=next((r.get("device") for r in results if r.get("device")), None))
    report.write_json(out / "max_seq_len.json", [summary])
    report.write_longest(out / "max_seq_len.md", summary)
    say(f"measured: longest that trained {summary['longest_fit']}, shortest out of memory {summary['shortest_oom']} "
        f"(planner: {planned.seq_len}); wrote {out / 'max_seq_len.json'}")
    return summary


def _fields(bc: BenchConfig) -> dict[str, Any]:
    import dataclasses

    return {f.name: getattr(bc, f.name) for f in dataclasses.fields(bc)}
