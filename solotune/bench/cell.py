"""One benchmark cell: one training configuration, run once, in its own process.

``python -m solotune.bench.cell --json '{"model": "llama2-7b", "precision": "fp16-amp", ...}'`` runs
the cell described by a :class:`CellSpec` and prints exactly one line on stdout: the JSON result
(everything else, the training loop's own output included, goes to stderr). A fresh process per
cell keeps the peak-memory counters clean, and an out-of-memory error ends only this cell: it is
caught and reported as ``status: "oom"`` with the size of the allocation that failed.

``python -m solotune.bench.cell --matmul`` prints the device's measured bf16 matmul rate (the MFU
denominator) as JSON.

Weights: random for a preset architecture (memory and speed do not depend on the values), or the
checkpoint's when ``model`` is a path. Data: the first ``samples`` records of the bundled Alpaca
sample, tokenised with the model's tokenizer (presets: the bundled LLaMA-2 SentencePiece model).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from ..peft.spec import LoRASpec
from .tokens import FoldedTokenizer, cell_tokenizer, preset_cell_tokenizer  # noqa: F401  (re-exported)

INJECT_OOM_ENV = "SOLOTUNE_BENCH_INJECT_OOM"  # a cell id (or "all"): that cell raises a fake OOM (tests)
METHODS = ("lora", "full")
IMPLS = ("solotune", "hf")


@dataclass
class CellSpec:
    """Everything that defines one cell (JSON round-trippable)."""

    model: str = "llama2-7b"  # preset name or checkpoint path
    layers: int | None = None  # override the preset's depth
    samples: int = 200  # Alpaca records 0..samples-1
    seq_len: int = 512  # truncation cap
    micro_batch: int = 1
    grad_accum: int = 1
    grad_checkpoint: str = "off"
    precision: str = "fp32"
    method: str = "lora"  # lora | full
    impl: str = "solotune"  # solotune | hf (transformers + peft, plain torch loop)
    lora_rank: int = LoRASpec.rank  # the defaults are LoRASpec's (peft/spec.py): one source
    lora_alpha: float = LoRASpec.alpha
    lora_dropout: float = LoRASpec.dropout
    lora_targets: tuple[str, ...] = LoRASpec.targets
    quantize: str = "none"  # none | nf4 | int8: the frozen base of LoRA (method lora only)
    offload: str = "none"  # none | activations | optimizer | activations,optimizer
    optimizer: str = "adamw"  # solotune.train.optim.OPTIMIZERS
    optimizer_in_backward: bool = False  # grad_accum 1; no clipping (max_grad_norm None)
    memory_limit_bytes: int | None = None  # cap the process (torch.cuda.set_per_process_memory_fraction)
    lr: float = 1e-5
    seed: int = 0
    device: str = "auto"
    time_budget_s: float | None = None  # stop after the optimizer step that crosses it; runtime is extrapolated
    sdpa: str = "no-cudnn"  # "no-cudnn": flash / mem-efficient attention only; "auto": torch's choice
    matmul_tflops: float | None = None  # measured bf16 rate of the device, for MFU
    command: str = ""  # the bench command line that asked for this cell

    def __post_init__(self) -> None:
        self.lora_targets = tuple(self.lora_targets)
        if self.method not in METHODS:
            raise ConfigError(f"cell method {self.method!r}: expected one of {METHODS}")
        if self.impl not in IMPLS:
            raise ConfigError(f"cell impl {self.impl!r}: expected one of {IMPLS}")
        if self.sdpa not in ("no-cudnn", "auto"):
            raise ConfigError(f"cell sdpa {self.sdpa!r}: expected no-cudnn or auto")
        if self.quantize not in ("none", "nf4", "int8") or (self.quantize != "none" and self.method != "lora"):
            raise ConfigError(f"cell quantize {self.quantize!r}: none, or nf4/int8 with LoRA")
        from ..train.config import OFFLOAD
        from ..train.optim import OPTIMIZERS

        if self.offload not in OFFLOAD:
            raise ConfigError(f"cell offload {self.offload!r}: expected one of {', '.join(OFFLOAD)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"cell optimizer {self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
        if self.optimizer_in_backward and self.grad_accum != 1:
            raise ConfigError(f"cell optimizer_in_backward needs grad_accum 1 (got {self.grad_accum})")

    @property
    def method_name(self) -> str:
        """What cells.json records: lora | qlora | int8-lora | full."""
        return {"nf4": "qlora", "int8": "int8-lora"}.get(self.quantize, self.method)

    @property
    def cell_id(self) -> str:
        extra = "" if self.offload == "none" else f"-offload{self.offload.replace(',', '+')}"
        extra = ("" if self.optimizer == "adamw" else f"-{self.optimizer}") + ("-inbwd" if self.optimizer_in_backward else "") + extra
        return (f"ga{self.grad_accum}-gc{self.grad_checkpoint.replace(':', '')}-{self.precision}-{self.method_name}"
                f"{extra}-{self.impl}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CellSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown cell fields: {unknown}")
        return cls(**d)


# ------------------------------------------------------------------------------ helpers
def parse_oom_bytes(message: str) -> int | None:
    """The size in "Tried to allocate 1.95 GiB" of a CUDA out-of-memory message."""
    m = re.search(r"Tried to allocate ([0-9.]+) ?([KMGT]?i?B)", message)
    if not m:
        return None
    unit = m.group(2).upper().replace("I", "i")
    power = {"B": 0, "KiB": 1, "MiB": 2, "GiB": 3, "TiB": 4, "KB": 1, "MB": 2, "GB": 3, "TB": 4}.get(unit)
    if power is None:
        return None
    base = 1000 if unit in ("KB", "MB", "GB", "TB") else 1024
    return int(float(m.group(1)) * base**power)


def measure_matmul_tflops(device: torch.device, n: int = 8192, iters: int = 10) -> float | None:
    """bf16 n x n x n matmul rate in TFLOP/s on ``device`` (None on CPU)."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    return 2.0 * n**3 * iters / (start.elapsed_time(end) / 1e3) / 1e12


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def load_cell_model(spec: CellSpec, device: torch.device) -> tuple[torch.nn.Module, Any, Any, bool]:
    """(model, tokenizer, ModelConfig, random_init) for a solotune cell."""
    from ..api import load, materialize
    from ..config import PRESETS
    from ..train.precision import get_policy

    dtype = get_policy(spec.precision).param_dtype  # the weights' dtype; amp modes cast per op
    if spec.model in PRESETS:
        cfg = PRESETS[spec.model]
        if spec.layers is not None:
            cfg = cfg.replace(n_layers=spec.layers)
        model = materialize(cfg, None, dtype, device, spec.seed, spec.quantize)  # quantized as it is built
        return model, preset_cell_tokenizer(cfg.vocab_size), cfg, True
    if spec.layers is not None:
        raise ConfigError("--layers applies to preset architectures (random init) only")
    model, tok = load(spec.model, dtype=dtype, device=device, quantize=spec.quantize)
    return model, tok, model.config, False


def prepare_data(spec: CellSpec, tokenizer: Any, workdir: str) -> tuple[str, list[int]]:
    """Write the cell's training records (Alpaca records 0..samples-1) to ``workdir/data.json``;
    returns (path, token counts after truncation, in file order).

    With a time budget the cell sees only the first steps, so the longest example is swapped to the
    position the loop's (seeded) order reaches in the second optimizer step: the peak, which the
    longest micro-batch sets, is then measured in steady state (optimizer state allocated, and with
    accumulation the window's gradients alive) however early the budget stops the cell.
    """
    import dataclasses as dc

    from ..data import AlpacaDataset, epoch_order, load_records

    if not 1 <= spec.samples <= 200:
        raise ConfigError(f"--samples {spec.samples}: must be 1..200 (the course's training split)")
    recs = list(load_records("alpaca-sample")[: spec.samples])
    lengths = [len(e.input_ids) for e in AlpacaDataset(recs, tokenizer, spec.seq_len)]
    if spec.time_budget_s:
        micro = spec.grad_accum + 1 if spec.grad_accum > 1 else 1  # 2nd step, and not its first micro-batch
        pos = micro * spec.micro_batch
        if pos < len(recs):
            target = epoch_order(len(recs), spec.seed, 0)[pos]
            longest = max(range(len(recs)), key=lambda i: lengths[i])
            recs[target], recs[longest] = recs[longest], recs[target]
            lengths[target], lengths[longest] = lengths[longest], lengths[target]
    path = os.path.join(workdir, "data.json")
    with open(path, "w") as f:
        json.dump([dc.asdict(r) for r in recs], f)
    return path, lengths


def planner_setup(spec: CellSpec, cfg: Any, seq_len: int, device: torch.device):
    from .plan import Setup

    return Setup(cfg, seq_len=seq_len, batch=spec.micro_batch, grad_accum=spec.grad_accum,
                 grad_checkpoint=spec.grad_checkpoint, precision=spec.precision,
                 lora_rank=spec.lora_rank if spec.method == "lora" else 0, lora_targets=spec.lora_targets,
                 lora_dropout=spec.lora_dropout, quantize=spec.quantize, offload=spec.offload,
                 optimizer=spec.optimizer, optimizer_in_backward=spec.optimizer_in_backward,
                 device="cuda" if device.type == "cuda" else "cpu")


class _InjectedOOM:
    """Instrument wrapper whose first forward raises a fake out-of-memory error (tests)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    @contextlib.contextmanager
    def forward_context(self):
        raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 1.50 GiB. (injected by {INJECT_OOM_ENV})")
        yield  # pragma: no cover

    def before_step(self, *a: Any) -> None:
        self.inner.before_step(*a)

    def after_step(self, *a: Any) -> None:
        self.inner.after_step(*a)


def _wants_injected_oom(spec: CellSpec) -> bool:
    want = os.environ.get(INJECT_OOM_ENV, "")
    return bool(want) and (want == "all" or want == spec.cell_id)


# ---------------------------------------------------------------------------- the cell
def run_cell(spec: CellSpec) -> dict[str, Any]:
    """Run one cell; never raises for OOM or training errors (they become the status)."""
    from ..api import resolve_device
    from .anatomy import AnatomyInstrument, make_meter
    from .plan import predict, train_flops

    device = resolve_device(spec.device)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[cell {spec.cell_id} +{time.perf_counter() - t_start:.1f}s] {msg}", file=sys.stderr, flush=True)

    if device.type == "cuda" and spec.sdpa == "no-cudnn":
        # cuDNN attention builds an execution plan for every new sequence length; with one example
        # per micro-batch every step has a new length and the plan building dominates the runtime.
        torch.backends.cuda.enable_cudnn_sdp(False)
    result: dict[str, Any] = {
        "model": spec.model, "layers": spec.layers, "seq_len": spec.seq_len, "micro_batch": spec.micro_batch,
        "grad_accum": spec.grad_accum, "grad_checkpoint": spec.grad_checkpoint, "precision": spec.precision,
        "method": spec.method_name, "quantize": spec.quantize, "offload": spec.offload,
        "memory_limit_bytes": spec.memory_limit_bytes, "impl": spec.impl, "cell_id": spec.cell_id, "status": "error",
        "peak_alloc_bytes": None, "peak_reserved_bytes": None, "predicted_peak_bytes": None, "runtime_s": None,
        "tokens": None, "tokens_per_s": None, "mean_loss": None, "trainable_params": None, "total_params": None,
        "anatomy": None, "predicted": None, "mfu": None, "samples": spec.samples, "samples_done": 0, "steps": 0,
        "runtime_extrapolated": False, "runtime_measured_s": None, "error": None, "oom_request_bytes": None,
        "device": device_name(device), "torch": torch.__version__, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": spec.command, "peak_kind": None, "weights": None, "matmul_tflops": spec.matmul_tflops,
        "lora": {"rank": spec.lora_rank, "alpha": spec.lora_alpha, "dropout": spec.lora_dropout,
                 "targets": list(spec.lora_targets)} if spec.method == "lora" else None,
        "data": "alpaca-sample", "optimizer": spec.optimizer, "optimizer_in_backward": spec.optimizer_in_backward,
        "max_seq_len_data": None, "max_seq_len_seen": None, "sdpa": spec.sdpa if device.type == "cuda" else None,
        "device_memory_bytes": torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None,
    }
    meter = make_meter(device)
    result["peak_kind"] = meter.kind
    inst: AnatomyInstrument | None = None
    model = None
    cfg = None
    lengths: list[int] = []
    workdir = tempfile.mkdtemp(prefix="solotune-cell-")
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            if spec.memory_limit_bytes:  # reproduce a smaller GPU
                total = torch.cuda.get_device_properties(device).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, spec.memory_limit_bytes / total), device)
        if spec.impl == "hf":
            from .hf_cell import build_hf_model

            model, tokenizer, cfg = build_hf_model(spec, device)
            random_init = True
        else:
            model, tokenizer, cfg, random_init = load_cell_model(spec, device)
        log(f"model built ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters)")
        result["layers"] = cfg.n_layers
        result["weights"] = "random init" if random_init else "checkpoint"
        data_path, lengths = prepare_data(spec, tokenizer, workdir)
        result["max_seq_len_data"] = max(lengths)
        n_micro = math.ceil(len(lengths) / spec.micro_batch)
        n_steps = math.ceil(n_micro / spec.grad_accum)
        setup = planner_setup(spec, cfg, max(lengths), device)
        pred = predict(setup)
        result["predicted"] = pred.to_dict()
        result["predicted_peak_bytes"] = pred.peak
        log(f"planner: peak {pred.peak / 2**30:.2f} GiB for the longest example ({max(lengths)} tokens)")
        inst = AnatomyInstrument(model, meter, stop_after=n_steps)
        instrument: Any = _BudgetInstrument(inst, spec.time_budget_s) if spec.time_budget_s else inst
        if _wants_injected_oom(spec):
            instrument = _InjectedOOM(instrument)
        with meter.tracking(model):
            if spec.impl == "hf":
                from .hf_cell import train_hf

                steps = train_hf(spec, model, tokenizer, device, instrument, n_steps, data_path)
            else:
                steps = _train_solotune(spec, model, tokenizer, device, instrument, workdir, data_path)
        log(f"trained {len(steps)} steps")
        _fill_success(result, spec, steps, inst, lengths, device, setup, train_flops)
    except torch.OutOfMemoryError as e:
        msg = str(e).strip()
        result.update(status="oom", error=msg.splitlines()[0][:500] if msg else "out of memory",
                      oom_request_bytes=parse_oom_bytes(msg))
        print(f"[cell {spec.cell_id}] out of memory: {msg[:300]}", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - a cell reports its failure, the matrix goes on
        traceback.print_exc(file=sys.stderr)
        result.update(status="error", error=f"{type(e).__name__}: {e}"[:1000])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if inst is not None:
            inst.close()
            if result["anatomy"] is None:
                result["anatomy"] = inst.anatomy()
    if result["peak_alloc_bytes"] is None:
        result["peak_alloc_bytes"] = meter.peak() if (device.type == "cuda" or inst is not None) else None
        result["peak_reserved_bytes"] = meter.peak_reserved()
    if model is not None and result["trainable_params"] is None:
        from ..peft import count_parameters

        result["trainable_params"], result["total_params"] = count_parameters(model)
    return result


class _BudgetInstrument:
    """Stop training after the optimizer step that crosses ``budget_s`` seconds of training (never
    before step ``min_steps``, which holds the longest example: see :func:`prepare_data`)."""

    def __init__(self, inner: Any, budget_s: float, min_steps: int = 2) -> None:
        self.inner, self.budget_s, self.min_steps = inner, budget_s, min_steps
        self.t0: float | None = None

    def forward_context(self):
        if self.t0 is None:
            self.t0 = time.perf_counter()
        return self.inner.forward_context()

    def before_step(self, *a: Any) -> None:
        self.inner.before_step(*a)

    def after_step(self, model: Any, optimizer: Any, step: int) -> None:
        self.inner.after_step(model, optimizer, step)
        if step >= self.min_steps and self.t0 is not None and time.perf_counter() - self.t0 > self.budget_s:
            from .anatomy import StopTraining

            raise StopTraining(step)


def _train_solotune(spec: CellSpec, model: Any, tokenizer: Any, device: torch.device, instrument: Any,
                    workdir: str, data_path: str) -> list[dict[str, Any]]:
    """Run solotune's own training loop; returns its per-step metrics records."""
    from ..train import TrainConfig, finetune
    from .anatomy import StopTraining

    cfg = TrainConfig(
        model=spec.model, data=data_path, output_dir=os.path.join(workdir, "run"), epochs=1, lr=spec.lr,
        batch_size=spec.micro_batch, grad_accum=spec.grad_accum, grad_checkpoint=spec.grad_checkpoint,
        precision=spec.precision, full=spec.method == "full", lora_rank=spec.lora_rank if spec.method == "lora" else 0,
        lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout, lora_targets=spec.lora_targets,
        max_seq_len=spec.seq_len, train_range=(0, 200), max_samples=spec.samples, val_samples=0,
        generate_samples=False, progress=False, device=str(device), seed=spec.seed, log_every=10**9,
        quantize=spec.quantize, offload=spec.offload, optimizer=spec.optimizer,
        optimizer_in_backward=spec.optimizer_in_backward,
        **({"max_grad_norm": None} if spec.optimizer_in_backward else {}),  # in backward: no global clipping
    )
    try:
        with contextlib.redirect_stdout(sys.stderr):
            finetune(cfg, model=model, tokenizer=tokenizer, instrument=instrument)
    except StopTraining:
        pass  # the last measured step is done: skip the loop's checkpoint and final-weights writing
    path = os.path.join(workdir, "run", "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _fill_success(result: dict[str, Any], spec: CellSpec, log: list[dict[str, Any]], inst: Any, lengths: list[int],
                  device: torch.device, setup: Any, train_flops: Any) -> None:
    from .plan import predict

    if not log:
        raise RuntimeError("the training loop logged no step")
    runtime = float(log[-1]["time_s"])
    tokens = int(log[-1]["tokens"])
    steps = len(log)
    rows = [r.shape for r in inst.records if r.phase == "forward/backward"]
    done = sum(b for b, _ in rows)
    result.update(status="ok", steps=steps, samples_done=done, runtime_measured_s=runtime,
                  mean_loss=sum(r["loss"] for r in log) / steps, tokens=tokens,
                  tokens_per_s=tokens / runtime if runtime > 0 else None)
    seen = max((t for _, t in rows), default=0)
    result["max_seq_len_seen"] = seen
    if seen and seen != setup.seq_len:  # predict for the longest micro-batch that actually ran
        pred = predict(setup.replace(seq_len=seen))
        result["predicted"] = pred.to_dict()
        result["predicted_peak_bytes"] = pred.peak
    if done < len(lengths):
        # Stopped by the time budget: keep what was measured and add the unseen tokens at the rate of
        # the steady-state steps (after step 2: step 1 carries the warm-up, step 2 the longest example).
        first = 2 if steps > 2 else 1 if steps > 1 else 0
        t0, k0 = (float(log[first - 1]["time_s"]), int(log[first - 1]["tokens"])) if first else (0.0, 0)
        rate = (runtime - t0) / max(tokens - k0, 1)
        result["runtime_extrapolated"] = True
        result["runtime_s"] = runtime + rate * (sum(lengths) - tokens)
        result["tokens_total"] = sum(lengths)
    else:
        result["runtime_s"] = runtime
    flops = sum(train_flops(setup, [t] * b) for b, t in rows)
    result["model_flops"] = flops
    if spec.matmul_tflops and runtime > 0:
        result["mfu"] = flops / runtime / (spec.matmul_tflops * 1e12)
    result["anatomy"] = inst.anatomy()
    result["peak_alloc_bytes"] = inst.meter.peak()
    result["peak_reserved_bytes"] = inst.meter.peak_reserved()


# ------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m solotune.bench.cell", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="the CellSpec as a JSON object")
    p.add_argument("--matmul", action="store_true", help="print the bf16 matmul rate of the device as JSON")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    out = sys.stdout
    if args.matmul:
        from ..api import resolve_device

        dev = resolve_device(args.device)
        out.write(json.dumps({"device": device_name(dev), "matmul_tflops": measure_matmul_tflops(dev)}) + "\n")
        return 0
    if not args.json:
        p.error("--json or --matmul is required")
    try:
        spec = CellSpec.from_dict(json.loads(args.json))
    except (ValueError, TypeError) as e:
        print(f"bad cell spec: {e}", file=sys.stderr)
        return 2
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the result line only
        result = run_cell(spec)
    out.write(json.dumps(result) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # The result is out: skip interpreter and CUDA teardown (seconds per cell with a big model);
    # the driver frees the process's memory either way.
    os._exit(code)
