"""One benchmark cell: one training configuration, run once, in its own process.

``python -m solotune.bench.cell --json '{"model": "llama2-7b", "precision": "fp16-amp", ...}'`` runs
the cell described by a :class:`CellSpec` and prints exactly one line on stdout: the JSON result
(everything else, the training loop's own output included, goes to stderr). A fresh process per
cell keeps the peak-memory counters clean, and an out-of-memory error ends only this cell: it is
caught and reported as ``status: "oom"`` with the size of the allocation that failed.

``python -m solotune.bench.cell --matmul`` prints the device's measured bf16 matmul rate (the MFU
denominator) as JSON.

Weights: random for a preset architecture (memory and speed do not depend on the values), or the
checkpoint's when ``model`` is a path. Data (``data``): the first ``samples`` records of the bundled
Alpaca sample, tokenised with the model's tokenizer (presets: the bundled LLaMA-2 SentencePiece
model), or ``random``: ``samples`` rows of exactly ``seq_len`` random tokens, every position a target
(``solotune.data.synthetic``, the same rows for solotune's loop and the HF reference).

Timing: the first ``warmup_steps`` optimizer steps (CUDA start-up, autotuning, ``torch.compile``)
are reported apart (``warmup_s``; ``compile_s`` when compiling) and ``steady_tokens_per_s`` counts
the later steps only.
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

from ..errors import ConfigError, OutOfMemory
from ..peft.spec import LoRASpec
from ..data.synthetic import RANDOM, RandomTokens
from ..train.config import TrainConfig
from ..train.loss import COMPILABLE_LOSSES
from .tokens import FoldedTokenizer, cell_tokenizer, preset_cell_tokenizer  # noqa: F401  (re-exported)

INJECT_OOM_ENV = "SOLOTUNE_BENCH_INJECT_OOM"  # a cell id (or "all"): that cell raises a fake OOM (tests)
METHODS = ("lora", "full")
IMPLS = ("solotune", "hf", "hf-liger")  # hf-liger: HF + PEFT with Liger-Kernel's fused kernels (when installed)
REFERENCE_IMPLS = IMPLS[1:]
DATA = ("alpaca-sample", RANDOM)
# solotune-only options of the training loop (TrainConfig fields): a cell asks for TrainConfig's
# defaults unless told otherwise ("auto": on where it pays); LOOP_OFF are their off values, what the
# HF reference cells run and the "off" side of a speed axis.
LOOP_OPTIONS = {name: TrainConfig.__dataclass_fields__[name].default for name in ("packing", "compile", "kernels", "loss")}
LOOP_OFF = {"packing": "off", "compile": "off", "kernels": "off", "loss": "full-logits"}
# Memory techniques HF has no equivalent of: its reference cell runs the nearest configuration, without
# them (the comparison the user makes: "what does this technique buy over the reference").
REFERENCE_NEAREST = {"offload": "none", "optimizer": "adamw", "optimizer_in_backward": False}
# frozen-base formats HF + PEFT have no trainer for: the reference runs the nearest it has (the 16-bit
# base; nf4-fp8: bitsandbytes' NF4 in bf16; nf4 itself is bitsandbytes)
REFERENCE_QUANTIZE = {"int8": "none", "fp8": "none", "fp8-lean": "none", "nf4-fp8": "nf4"}


@dataclass
class CellSpec:
    """Everything that defines one cell (JSON round-trippable)."""

    model: str = "llama2-7b"  # preset name or checkpoint path
    layers: int | None = None  # override the preset's depth
    samples: int = 200  # Alpaca records 0..samples-1 (data "random": rows 0..samples-1)
    seq_len: int = 512  # truncation cap (data "random": every row's length)
    data: str = "alpaca-sample"  # alpaca-sample | random (solotune.data.synthetic)
    micro_batch: int = 1
    grad_accum: int = 1
    grad_checkpoint: str = "off"
    precision: str = "fp32"
    method: str = "lora"  # lora | full
    impl: str = "solotune"  # solotune | hf (transformers + peft, plain torch loop) | hf-liger (+ Liger-Kernel)
    packing: str = LOOP_OPTIONS["packing"]  # TrainConfig.packing / compile / kernels / loss (solotune cells)
    compile: str = LOOP_OPTIONS["compile"]
    kernels: str = LOOP_OPTIONS["kernels"]
    loss: str = LOOP_OPTIONS["loss"]
    warmup_steps: int = 2  # first optimizer steps timed apart from the steady state
    lora_rank: int = LoRASpec.rank  # the defaults are LoRASpec's (peft/spec.py): one source
    lora_alpha: float = LoRASpec.alpha
    lora_dropout: float = LoRASpec.dropout
    lora_targets: tuple[str, ...] = LoRASpec.targets
    quantize: str = "none"  # none | nf4 | int8 | fp8: the frozen base of LoRA (method lora only)
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
        from ..train.config import OFFLOAD, QUANTIZE

        if self.quantize not in QUANTIZE or (self.quantize != "none" and self.method != "lora"):
            raise ConfigError(f"cell quantize {self.quantize!r}: none, or {'/'.join(QUANTIZE[1:])} with LoRA")
        from ..train.optim import OPTIMIZERS

        if self.offload not in OFFLOAD:
            raise ConfigError(f"cell offload {self.offload!r}: expected one of {', '.join(OFFLOAD)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"cell optimizer {self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
        if self.optimizer_in_backward and self.grad_accum != 1:
            raise ConfigError(f"cell optimizer_in_backward needs grad_accum 1 (got {self.grad_accum})")
        if self.data not in DATA:
            raise ConfigError(f"cell data {self.data!r}: expected one of {DATA}")
        if self.warmup_steps < 0:
            raise ConfigError(f"cell warmup_steps {self.warmup_steps}: must be >= 0")
        _check_loop_options(self)
        if self.impl != "solotune":
            for k, default in LOOP_OPTIONS.items():  # a reference cell's default is off: they are solotune's
                if getattr(self, k) == default:
                    setattr(self, k, LOOP_OFF[k])
            _check_reference(self)

    @property
    def method_name(self) -> str:
        """What cells.json records: lora | qlora | int8-lora | fp8-lora | full."""
        return {"nf4": "qlora", "nf4-fp8": "qlora", "int8": "int8-lora", "fp8": "fp8-lora", "fp8-lean": "fp8-lora"}.get(self.quantize, self.method)

    @property
    def loop_options(self) -> dict[str, str]:
        """The loop options asked for that differ from TrainConfig's defaults (part of the cell id)."""
        return {k: getattr(self, k) for k, default in LOOP_OPTIONS.items() if getattr(self, k) != default}

    def effective_loop_options(self, device_type: str) -> dict[str, str]:
        """What the loop runs on ``device_type`` ("auto" resolved): what cells.json records."""
        if self.impl != "solotune":
            return {**LOOP_OFF, "loss_compiled": False}
        tc = TrainConfig(model=self.model, **self.train_fields())  # what auto resolves from, as the cell runs
        return {"packing": "on" if tc.packs(device_type) else "off",
                "compile": tc.compile_mode(device_type),
                "kernels": self.kernels, "loss": self.loss,
                # the loop compiles the loss with the blocks (train/loss.py COMPILABLE_LOSSES)
                "loss_compiled": tc.compiles(device_type) and self.loss in COMPILABLE_LOSSES}

    def train_fields(self) -> dict[str, Any]:
        """The TrainConfig fields that shape the cell's training step (the loop's options resolve from them)."""
        return dict(batch_size=self.micro_batch, grad_accum=self.grad_accum, grad_checkpoint=self.grad_checkpoint,
                    precision=self.precision, full=self.method == "full",
                    lora_rank=self.lora_rank if self.method == "lora" else 0, lora_alpha=self.lora_alpha,
                    lora_dropout=self.lora_dropout, lora_targets=self.lora_targets, max_seq_len=self.seq_len,
                    quantize=self.quantize, offload=self.offload, **{k: getattr(self, k) for k in LOOP_OPTIONS},
                    optimizer=self.optimizer, optimizer_in_backward=self.optimizer_in_backward,
                    **({"max_grad_norm": None} if self.optimizer_in_backward else {}))  # in backward: no global clipping

    @property
    def cell_id(self) -> str:
        extra = "" if self.offload == "none" else f"-offload{self.offload.replace(',', '+')}"
        extra = ("" if self.optimizer == "adamw" else f"-{self.optimizer}") + ("-inbwd" if self.optimizer_in_backward else "") + extra
        extra += "".join(f"-{k}{v}" for k, v in self.loop_options.items())
        return (f"ga{self.grad_accum}-gc{self.grad_checkpoint.replace(':', '')}-{self.precision}-{self.method_name}"
                f"{extra}-{self.impl}")

    def as_reference(self, impl: str) -> "CellSpec":
        """This cell run by reference implementation ``impl``: the same model, data, method and
        memory techniques, solotune's own loop options off, and without the techniques HF has no
        equivalent of (``REFERENCE_NEAREST``: offload, another optimizer; ``REFERENCE_QUANTIZE``: an
        int8 or fp8 base, for which the reference trains over the 16-bit base; nf4-fp8: over NF4)."""
        quantize = REFERENCE_QUANTIZE.get(self.quantize, self.quantize)
        return CellSpec.from_dict({**self.to_dict(), **LOOP_OFF, **REFERENCE_NEAREST, "quantize": quantize,
                                   "impl": impl})

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


def _check_loop_options(spec: CellSpec) -> None:
    from ..train.config import COMPILE, KERNELS, PACKING
    from ..train.loss import LOSSES

    for name, allowed in (("packing", PACKING), ("compile", COMPILE), ("kernels", KERNELS), ("loss", tuple(LOSSES))):
        if getattr(spec, name) not in allowed:
            raise ConfigError(f"cell {name} {getattr(spec, name)!r}: expected one of {', '.join(allowed)}")


def reference_gap(spec: CellSpec) -> str | None:
    """Why an HF reference cell cannot run this cell's configuration (None: it can). solotune's
    loop options and the techniques in ``REFERENCE_NEAREST`` do not count: :meth:`CellSpec.as_reference`
    turns them off (the reference then runs without them)."""
    if spec.grad_checkpoint not in ("off", "all"):
        return f"HF has no {spec.grad_checkpoint} checkpointing policy (every layer or none)"
    # a solotune cell's int8/fp8 base has a nearest reference (REFERENCE_QUANTIZE); a reference cell has no such base
    quantize = REFERENCE_QUANTIZE.get(spec.quantize, spec.quantize) if spec.impl == "solotune" else spec.quantize
    if quantize not in ("none", "nf4"):
        return f"no HF reference for quantize {spec.quantize!r} (nf4: bitsandbytes)"
    return None



def _check_reference(spec: CellSpec) -> None:
    on = [k for k, off in LOOP_OFF.items() if getattr(spec, k) != off]
    gap = reference_gap(spec) or (f"{', '.join(on)}: solotune loop options (a reference cell runs them off)"
                                  if on else None)
    if gap:
        raise ConfigError(f"cell impl {spec.impl}: {gap}")


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


def prepare_data(spec: CellSpec, tokenizer: Any, workdir: str) -> tuple[str | None, list[int]]:
    """Write the cell's training records (Alpaca records 0..samples-1) to ``workdir/data.json``;
    returns (path, token counts after truncation, in file order). Random rows need no file: (None,
    ``samples`` x [seq_len]).

    With a time budget the cell sees only the first steps, so the longest example is swapped to the
    position the loop's (seeded) order reaches in the second optimizer step: the peak, which the
    longest micro-batch sets, is then measured in steady state (optimizer state allocated, and with
    accumulation the window's gradients alive) however early the budget stops the cell.
    """
    import dataclasses as dc

    from ..data import AlpacaDataset, epoch_order, load_records

    if spec.data == RANDOM:
        if spec.samples < 1 or spec.seq_len < 2:
            raise ConfigError(f"--data random: --samples >= 1 and --seq-len >= 2 (got {spec.samples}, {spec.seq_len})")
        return None, [spec.seq_len] * spec.samples
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


def cell_examples(spec: CellSpec, tokenizer: Any, data_path: str | None) -> Any:
    """The cell's training examples as the reference cells read them; solotune's loop builds the
    same ones from its TrainConfig (``data``, ``train_range``, ``seed``, ``max_seq_len``)."""
    if spec.data == RANDOM:
        return RandomTokens(range(spec.samples), spec.seq_len, tokenizer.vocab_size, spec.seed)
    from ..data import AlpacaDataset, load_records

    return AlpacaDataset(list(load_records(data_path)), tokenizer, spec.seq_len)


def planner_setup(spec: CellSpec, cfg: Any, seq_len: int, device: torch.device):
    from .plan import Setup

    return Setup(cfg, seq_len=seq_len, batch=spec.micro_batch, grad_accum=spec.grad_accum,
                 grad_checkpoint=spec.grad_checkpoint, precision=spec.precision,
                 lora_rank=spec.lora_rank if spec.method == "lora" else 0, lora_targets=spec.lora_targets,
                 lora_dropout=spec.lora_dropout, quantize=spec.quantize, offload=spec.offload, loss=spec.loss,
                 kernels=spec.kernels, optimizer=spec.optimizer, optimizer_in_backward=spec.optimizer_in_backward,
                 device="cuda" if device.type == "cuda" else "cpu",
                 compiled=spec.effective_loop_options(device.type)["compile"] != "off")


class _Wrapper:
    """An instrument around another: passes every hook through (subclasses add to some)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def forward_context(self):
        return self.inner.forward_context()

    def before_step(self, *a: Any) -> None:
        self.inner.before_step(*a)

    def after_step(self, *a: Any) -> None:
        self.inner.after_step(*a)


class _InjectedOOM(_Wrapper):
    """Instrument wrapper whose first forward raises a fake out-of-memory error (tests)."""

    @contextlib.contextmanager
    def forward_context(self):
        raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 1.50 GiB. (injected by {INJECT_OOM_ENV})")
        yield  # pragma: no cover


class _GraphCounter(_Wrapper):
    """Instrument wrapper that notes, at every optimizer step, how many graphs dynamo has compiled
    so far: a step that compiled (a new row shape, a packed row with one document where the others
    had several, a dynamic-shape recompile) can then be kept out of the steady state even when it
    comes after the warm-up steps (see :func:`_warmup_and_steady`)."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.graphs: list[int] = []

    def after_step(self, *a: Any) -> None:
        from torch._dynamo.utils import counters

        self.graphs.append(int(counters["stats"]["unique_graphs"]))  # before the inner may stop training
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
        "data": spec.data, "optimizer": spec.optimizer, "optimizer_in_backward": spec.optimizer_in_backward,
        **spec.effective_loop_options(device.type), "loop_requested": {k: getattr(spec, k) for k in LOOP_OPTIONS},
        "warmup_steps": None, "warmup_s": None, "compile_s": None, "steady_tokens_per_s": None, "steady_steps": 0,
        "compile_steps_after_warmup": None, "peak_note": None,
        "max_seq_len_data": None, "max_seq_len_seen": None, "max_rows_seen": None,
        "sdpa": spec.sdpa if device.type == "cuda" else None,
        "device_memory_bytes": torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None,
        "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF") if device.type == "cuda" else None,
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
                index = device.index if device.index is not None else torch.cuda.current_device()  # the call wants an index
                torch.cuda.set_per_process_memory_fraction(min(1.0, spec.memory_limit_bytes / total), index)
        if spec.impl != "solotune":
            from .hf_cell import build_hf_model, peak_note

            model, tokenizer, cfg = build_hf_model(spec, device)
            result["peak_note"] = peak_note(spec)
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
        try:
            setup = planner_setup(spec, cfg, max(lengths), device)
            pred = predict(setup)
            result["predicted"] = pred.to_dict()
            result["predicted_peak_bytes"] = pred.peak
            log(f"planner: peak {pred.peak / 2**30:.2f} GiB for the longest example ({max(lengths)} tokens)")
        except ValueError as e:  # a setting the planner does not model (e.g. a loss its dry run lacks)
            setup = None
            log(f"planner: no prediction ({e})")
        inst = AnatomyInstrument(model, meter, stop_after=n_steps)
        instrument: Any = (_BudgetInstrument(inst, spec.time_budget_s, min_steps=max(2, spec.warmup_steps + 1))
                           if spec.time_budget_s else inst)
        if _wants_injected_oom(spec):
            instrument = _InjectedOOM(instrument)
        instrument = counter = _GraphCounter(instrument)
        with meter.tracking(model):
            if spec.impl != "solotune":
                from .hf_cell import train_hf

                steps = train_hf(spec, model, tokenizer, device, instrument, n_steps,
                                 cell_examples(spec, tokenizer, data_path))
            else:
                steps = _train_solotune(spec, model, tokenizer, device, instrument, workdir, data_path)
        log(f"trained {len(steps)} steps")
        _fill_success(result, spec, steps, inst, lengths, device, setup, train_flops, counter.graphs)
    except _reference_unavailable() as e:  # a missing package or device: not a failure of the cell
        result.update(status="skipped", error=str(e)[:1000])
    except (torch.OutOfMemoryError, OutOfMemory) as e:  # the allocator's error, or the loop's line around it
        msg = (getattr(e, "allocator_message", "") or str(e)).strip()
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


def _reference_unavailable() -> type[Exception]:
    from .hf_cell import ReferenceUnavailable

    return ReferenceUnavailable


class _BudgetInstrument(_Wrapper):
    """Stop training after the optimizer step that crosses ``budget_s`` seconds of training (never
    before step ``min_steps``, which holds the longest example: see :func:`prepare_data`)."""

    def __init__(self, inner: Any, budget_s: float, min_steps: int = 2) -> None:
        super().__init__(inner)
        self.budget_s, self.min_steps = budget_s, min_steps
        self.t0: float | None = None

    def forward_context(self):
        if self.t0 is None:
            self.t0 = time.perf_counter()
        return self.inner.forward_context()

    def after_step(self, model: Any, optimizer: Any, step: int) -> None:
        self.inner.after_step(model, optimizer, step)
        if step >= self.min_steps and self.t0 is not None and time.perf_counter() - self.t0 > self.budget_s:
            from .anatomy import StopTraining

            raise StopTraining(step)


def _train_solotune(spec: CellSpec, model: Any, tokenizer: Any, device: torch.device, instrument: Any,
                    workdir: str, data_path: str | None) -> list[dict[str, Any]]:
    """Run solotune's own training loop; returns its per-step metrics records."""
    from ..train import TrainConfig, finetune
    from .anatomy import StopTraining

    rows = (0, spec.samples) if spec.data == RANDOM else (0, 200)
    cfg = TrainConfig(
        model=spec.model, data=RANDOM if spec.data == RANDOM else data_path, output_dir=os.path.join(workdir, "run"), epochs=1, lr=spec.lr,
        train_range=rows, max_samples=spec.samples, val_samples=0, generate_samples=False, progress=False,
        device=str(device), seed=spec.seed, log_every=10**9, **spec.train_fields(),
    )
    try:
        with contextlib.redirect_stdout(sys.stderr):
            finetune(cfg, model=model, tokenizer=tokenizer, instrument=instrument)
    except StopTraining:
        pass  # the last measured step is done: skip the loop's checkpoint and final-weights writing
    path = os.path.join(workdir, "run", "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _warmup_and_steady(result: dict[str, Any], spec: CellSpec, log: list[dict[str, Any]],
                       graphs: list[int] | None = None) -> tuple[float, int, float]:
    """Record the warm-up (the first ``spec.warmup_steps`` steps, fewer when the cell ran fewer
    than warmup + 1) and the steady state: the later steps, less any that compiled a graph
    (``graphs``: dynamo's graph count after each step, from :class:`_GraphCounter`; such steps are
    counted in ``compile_steps_after_warmup``). Returns (warm-up seconds, warm-up tokens, steady
    seconds per token). ``compile_s`` (compiled cells): what the warm-up and compiling steps took
    beyond the steady rate."""
    steps, runtime, tokens = len(log), float(log[-1]["time_s"]), int(log[-1]["tokens"])
    k = min(spec.warmup_steps, steps - 1)
    t0, k0 = (float(log[k - 1]["time_s"]), int(log[k - 1]["tokens"])) if k else (0.0, 0)
    compiled_at = set()
    if graphs is not None and len(graphs) == steps:
        compiled_at = {i for i in range(k, steps) if graphs[i] > (graphs[i - 1] if i else 0)}
        if len(compiled_at) == steps - k:  # every later step compiled: nothing is steady, keep them all
            compiled_at = set()
    dt = dtok = 0.0
    for i in range(k, steps):
        if i not in compiled_at:
            dt += float(log[i]["time_s"]) - (float(log[i - 1]["time_s"]) if i else 0.0)
            dtok += int(log[i]["tokens"]) - (int(log[i - 1]["tokens"]) if i else 0)
    rate = dt / max(dtok, 1)
    steady = dtok / dt if dt > 0 else None
    result.update(warmup_steps=k, warmup_s=t0, steady_steps=steps - k - len(compiled_at),
                  steady_tokens_per_s=steady, compile_steps_after_warmup=len(compiled_at))
    if result.get("compile", spec.compile) not in ("off", "auto") and (k or compiled_at):
        result["compile_s"] = max(0.0, runtime - rate * tokens) if steady else None
    return t0, k0, rate


def _fill_success(result: dict[str, Any], spec: CellSpec, log: list[dict[str, Any]], inst: Any, lengths: list[int],
                  device: torch.device, setup: Any, train_flops: Any, graphs: list[int] | None = None) -> None:
    from .plan import predict

    if not log:
        raise RuntimeError("the training loop logged no step")
    runtime = float(log[-1]["time_s"])
    tokens = int(log[-1]["tokens"])
    steps = len(log)
    rows = [r.shape for r in inst.records if r.phase == "forward/backward"]
    # records consumed: every optimizer step takes micro_batch x grad_accum of them (the last one
    # what is left); counting micro-batch rows instead would undercount packed cells, whose rows
    # hold several records each
    done = min(len(lengths), steps * spec.micro_batch * spec.grad_accum)
    result.update(status="ok", steps=steps, samples_done=done, runtime_measured_s=runtime,
                  mean_loss=sum(r["loss"] for r in log) / steps, tokens=tokens,
                  tokens_per_s=tokens / runtime if runtime > 0 else None)
    if "host_peak_mem" in log[-1]:  # activation offload: the host copies at most (planner: host_bytes)
        result["host_peak_bytes"] = int(log[-1]["host_peak_mem"])
    seen = max((t for _, t in rows), default=0)
    # rows of the largest micro-batch: micro_batch, or fewer when packing fit the records in fewer rows
    max_rows = max((b for b, t in rows if t == seen), default=spec.micro_batch)
    result["max_seq_len_seen"], result["max_rows_seen"] = seen, max_rows
    if setup is not None and seen and (seen, max_rows) != (setup.seq_len, setup.batch):  # the largest that ran
        pred = predict(setup.replace(seq_len=seen, batch=max_rows))
        result["predicted"] = pred.to_dict()
        result["predicted_peak_bytes"] = pred.peak
    _, _, rate = _warmup_and_steady(result, spec, log, graphs)
    if done < len(lengths):
        # Stopped by the time budget: keep what was measured and add the unseen tokens at the rate of
        # the steady-state steps (with alpaca data step 2 also holds the longest example).
        result["runtime_extrapolated"] = True
        result["runtime_s"] = runtime + rate * (sum(lengths) - tokens)
        result["tokens_total"] = sum(lengths)
    else:
        result["runtime_s"] = runtime
    flops = sum(train_flops(setup, [t] * b) for b, t in rows) if setup is not None else None
    result["model_flops"] = flops
    if flops and spec.matmul_tflops and runtime > 0:
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
