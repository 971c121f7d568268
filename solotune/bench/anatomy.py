"""Measured memory anatomy of a training run: what the peak is made of.

:class:`AnatomyInstrument` plugs into the training loop's instrument hooks
(``solotune.train.loop.Instrument``) and measures, per micro-batch and per optimizer step:

* parameters by dtype, gradients, optimizer state: unique storages of the live tensors;
* activations saved for backward: every tensor autograd packs during the forward (+ loss), seen
  through ``torch.autograd.graph.saved_tensors_hooks``, deduplicated by storage; storages of
  parameters are not activations (a weight saved for backward costs nothing extra);
* autocast weight copies: the saved tensors that are 16-bit copies of weights (a transposed 2-D
  view of a weight's shape, in autocast's dtype): frozen weights are cast per call and kept by
  backward; trainable ones come from autocast's cache;
* autocast's cache during the forward: one 16-bit copy of every trainable fp32 matmul weight
  (autocast caches casts of leaf tensors that require grad), counted from the model when a forward
  starts under autocast. Reported beside the anatomy, not in it: it dies when the forward leaves
  autocast, unless backward keeps the copy (then it is a weight copy).

The saved-tensor accounting (:class:`SavedTensorLedger`) is shared with the planner's dry run
(``solotune.bench.dryrun``), which packs the same tensors from a forward on fake tensors.

The anatomy is taken for the phase that set the run's peak (the peak counter only grows, so the
last phase that raised it holds the peak): for a forward/backward phase the components are the
parameters, the gradients alive when the micro-batch started, the optimizer state, the saved
activations and the saved weight copies, which all coexist when backward starts; ``rest`` is the
peak minus their sum (logits, loss gradients, recomputation, allocator rounding...). For an
optimizer-step phase: parameters + all gradients + optimizer state + rest.

Peak memory: CUDA ``max_memory_allocated``; on CPU, :class:`TensorMeter` tracks the bytes of every
live tensor storage (a dispatch mode) since there is no allocator statistic there.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn as nn

# --------------------------------------------------------------------------------- meters


class CudaMeter:
    """The CUDA caching allocator's counters for one device."""

    kind = "cuda max_memory_allocated"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def current(self) -> int:
        return int(torch.cuda.memory_allocated(self.device))

    def peak(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device))

    def peak_reserved(self) -> int | None:
        return int(torch.cuda.max_memory_reserved(self.device))

    @contextlib.contextmanager
    def tracking(self, *seed: Any) -> Iterator["CudaMeter"]:
        yield self


class TensorMeter:
    """Live bytes of tensor storages on CPU, with their peak.

    Storages produced by any op while :meth:`tracking` is active are counted until they are freed
    (a ``weakref.finalize`` on the storage); storages that existed before (the model) are seeded.
    Scratch memory inside kernels is invisible: this is a tensor count, close to what
    ``max_memory_allocated`` reports on CUDA.
    """

    kind = "cpu live tensor storages"

    def __init__(self) -> None:
        self.live: dict[int, int] = {}
        self.cur = 0
        self.max = 0

    def current(self) -> int:
        return self.cur

    def peak(self) -> int:
        return self.max

    def peak_reserved(self) -> int | None:
        return None

    def _free(self, key: int) -> None:
        self.cur -= self.live.pop(key, 0)

    def add(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live:
            return
        n = st.nbytes()
        self.live[key] = n
        self.cur += n
        self.max = max(self.max, self.cur)
        weakref.finalize(st, self._free, key)

    @contextlib.contextmanager
    def tracking(self, *seed: Any) -> Iterator["TensorMeter"]:
        """Count every tensor made inside; ``seed``: modules/tensors that already exist."""
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        meter = self
        for obj in seed:
            for t in (obj.parameters() if isinstance(obj, nn.Module) else [obj]):
                self.add(t)

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        meter.add(t)
                return out

        with _Mode():
            yield self


def make_meter(device: torch.device) -> CudaMeter | TensorMeter:
    return CudaMeter(device) if device.type == "cuda" else TensorMeter()


# ------------------------------------------------------------------------------ accounting
def storage_bytes(tensors: Any) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and shared tensors count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            seen[st._cdata] = st.nbytes()
    return sum(seen.values())


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def dtype_name(dtype: torch.dtype) -> str:
    """The short name the anatomy and the planner key bytes by: fp32, bf16, fp16 (else torch's name)."""
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def params_by_dtype(model: nn.Module) -> dict[str, int]:
    """Weight bytes by dtype name; a quantized frozen base (its weight lives in buffers, it reports
    ``weight_bytes()``) is counted under its ``kind`` (``nf4``, ``int8``), as the planner does."""
    seen: dict[int, tuple[int, str]] = {}
    for p in model.parameters():
        st = p.untyped_storage()
        seen[st._cdata] = (st.nbytes(), dtype_name(p.dtype))
    out: dict[str, int] = {}
    for n, dt in seen.values():
        out[dt] = out.get(dt, 0) + n
    for m in model.modules():
        if hasattr(m, "weight_bytes") and not any(True for _ in m.parameters()):
            kind = getattr(m, "kind", "quantized")
            out[kind] = out.get(kind, 0) + m.weight_bytes()
    return out


def grad_bytes(model: nn.Module) -> int:
    return storage_bytes(p.grad for p in model.parameters() if p.grad is not None)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, device_type: str | None = None) -> int:
    """Bytes of the optimizer's state tensors (only those on ``device_type`` when given: state
    offloaded to pinned host memory is not on the GPU)."""
    return storage_bytes(v for state in optimizer.state.values() for v in state.values()
                         if device_type is None or (isinstance(v, torch.Tensor) and v.device.type == device_type))


_HALF = (torch.float16, torch.bfloat16)


def _in_backward() -> bool:
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def matmul_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(qualified name, weight) of every 2-D parameter of a module other than an embedding, once per
    storage (a tied head appears under its Linear's name): the weights matmuls multiply through,
    which autocast casts per call, and caches once per forward when they are trainable fp32 leaves."""
    seen: set[int] = set()
    out: list[tuple[str, nn.Parameter]] = []
    for mname, m in model.named_modules():
        if isinstance(m, nn.Embedding):
            continue
        for pname, p in m.named_parameters(recurse=False):
            key = p.untyped_storage()._cdata
            if p.ndim == 2 and key not in seen:
                seen.add(key)
                out.append((f"{mname}.{pname}" if mname else pname, p))
    return out


def autocast_cached(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The weights autocast caches a 16-bit copy of for the whole forward: trainable fp32 matmul weights."""
    return [(n, p) for n, p in matmul_weights(model) if p.requires_grad and p.dtype == torch.float32]


class SavedTensorLedger:
    """The tensors autograd packs for backward, by storage (views and repeats count once), split
    into activations and autocast's 16-bit weight copies; storages of parameters and buffers are
    neither (a weight saved for backward costs nothing extra). Shared by the measured anatomy
    (:class:`AnatomyInstrument`) and the planner's dry run (``solotune.bench.dryrun``).
    """

    def __init__(self, model: nn.Module) -> None:
        params = list(model.parameters())  # unique (tied weights once)
        self.device_type = params[0].device.type if params else "cpu"
        # Buffers too: a quantized base saves its stored codes/scales for backward (views, no copy).
        self.param_storages = {t.untyped_storage()._cdata for t in (*params, *model.buffers())}
        self.weight_shapes = {tuple(p.shape) for _, p in matmul_weights(model)}
        self.saved: dict[int, int] = {}  # storage -> bytes
        self.copies: dict[int, int] = {}

    def reset(self) -> None:
        self.saved, self.copies = {}, {}

    def classify(self, t: torch.Tensor) -> tuple[int, int, bool] | None:
        """(storage key, bytes, is a weight copy) of a packed tensor, or None when it is not
        counted (a parameter, a host-side tensor of a device kernel, a pack during backward)."""
        if t.device.type != self.device_type or _in_backward():
            return None  # e.g. attention's RNG seed/offset scalars kept on the CPU by CUDA kernels
        st = t.untyped_storage()
        key = st._cdata
        if key in self.param_storages:
            return None
        n = st.nbytes()
        # W.t() of a 16-bit copy of a weight: autocast's doing
        copy = (t.dtype in _HALF and t.dim() == 2 and t.stride() == (1, t.shape[0])
                and (t.shape[1], t.shape[0]) in self.weight_shapes and n == t.numel() * t.element_size())
        return key, n, copy

    def add(self, t: torch.Tensor) -> tuple[int, int, bool] | None:
        """Record a packed tensor; returns its :meth:`classify` result."""
        c = self.classify(t)
        if c is not None:
            key, n, copy = c
            (self.copies if copy else self.saved)[key] = n
        return c

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """A ``saved_tensors_hooks`` pack hook: record, keep the tensor as it is."""
        self.add(t)
        return t

    @property
    def activations(self) -> int:
        return sum(self.saved.values())

    @property
    def weight_copies(self) -> int:
        return sum(self.copies.values())


# ------------------------------------------------------------------------------ instrument
@dataclass
class PhaseRecord:
    phase: str  # "forward/backward" | "optimizer step"
    step: int  # optimizer step (1-based) the phase belongs to
    micro: int  # micro-batch index in the window (-1 for the optimizer step)
    peak: int
    params: dict[str, int]
    grads: int
    optimizer: int
    activations: int
    weight_copies: int
    shape: tuple[int, int] = (0, 0)  # (batch, seq_len) of this micro-batch (forward/backward phases)

    def anatomy(self) -> dict[str, Any]:
        total_params = sum(self.params.values())
        parts = total_params + self.grads + self.optimizer + self.activations + self.weight_copies
        return {"phase": self.phase, "step": self.step, "micro": self.micro, "shape": list(self.shape), "peak": self.peak,
                "params": dict(self.params), "params_total": total_params, "grads": self.grads,
                "optimizer": self.optimizer, "activations": self.activations,
                "weight_copies": self.weight_copies, "rest": self.peak - parts}


@dataclass
class AnatomyInstrument:
    """Training-loop instrument that measures the memory anatomy (see the module docstring).

    ``stop_after``: raise :class:`StopTraining` from ``after_step`` of that optimizer step, so a
    benchmark can end the loop before it writes checkpoints and final weights.
    """

    model: nn.Module
    meter: CudaMeter | TensorMeter
    stop_after: int | None = None
    records: list[PhaseRecord] = field(default_factory=list)
    peak_record: PhaseRecord | None = None
    max_activations: int = 0  # largest saved activations of any micro-batch
    max_weight_copies: int = 0
    autocast_cache: int = 0  # largest autocast cache of trainable weights in one forward
    grads_total: int = 0  # all gradients of a window (measured before the optimizer step)
    optimizer_total: int = 0
    micro_batches: int = 0
    steps: int = 0
    _ledger: SavedTensorLedger | None = None
    _step_grads: int = 0
    _optimizer: int = 0
    _step_peak_before: int = 0
    _micro_in_window: int = 0
    _hooks: list[Any] = field(default_factory=list)
    _shape: tuple[int, int] = (0, 0)
    _params: list[nn.Parameter] = field(default_factory=list)
    _trainable: list[nn.Parameter] = field(default_factory=list)
    _params_by_dtype: dict[str, int] = field(default_factory=dict)
    _cache_numel: int = 0
    _cache_now: int = 0
    _ready: bool = False

    # ---------------------------------------------------------------- set-up
    def _setup(self) -> None:
        """After finetune() has applied LoRA and frozen what it freezes: the parameter storages,
        the shapes of matmul weights, the trainable fp32 matmul weights (what autocast caches), and
        one pre-hook on the model (per-module hooks would slow a launch-bound batch-1 loop down)."""
        params = list(self.model.parameters())  # unique (tied weights once)
        self._params = params
        self._trainable = [p for p in params if p.requires_grad]
        self._params_by_dtype = params_by_dtype(self.model)
        self._ledger = SavedTensorLedger(self.model)
        self._cache_numel = sum(p.numel() for _, p in autocast_cached(self.model))
        self._hooks.append(self.model.register_forward_pre_hook(self._on_forward, with_kwargs=True))
        self._ready = True

    def _on_forward(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        """Per micro-batch: (batch, seq_len) of the token ids (positional, or HF's input_ids=), and
        autocast's cache: every trainable fp32 matmul weight gets one 16-bit copy in this forward."""
        ids = args[0] if args else kwargs.get("input_ids")
        ids = getattr(ids, "input_ids", ids)  # a solotune Batch carries them
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            self._shape = (int(ids.shape[0]), int(ids.shape[1]))
            dev = ids.device.type
            if torch.is_grad_enabled() and torch.is_autocast_enabled(dev):
                self._cache_now = self._cache_numel * torch.finfo(torch.get_autocast_dtype(dev)).bits // 8

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # ------------------------------------------------------------ the hooks
    @contextlib.contextmanager
    def forward_context(self) -> Iterator[None]:
        if not self._ready:
            self._setup()
        grads_live = storage_bytes(p.grad for p in self._trainable if p.grad is not None)
        peak_before = self.meter.peak()
        ledger = self._ledger
        assert ledger is not None
        ledger.reset()
        self._cache_now = 0
        with torch.autograd.graph.saved_tensors_hooks(ledger.pack, lambda t: t):
            yield
        acts, copies = ledger.activations, ledger.weight_copies
        self.max_activations = max(self.max_activations, acts)
        self.max_weight_copies = max(self.max_weight_copies, copies)
        self.autocast_cache = max(self.autocast_cache, self._cache_now)
        rec = PhaseRecord("forward/backward", self.steps + 1, self._micro_in_window, self.meter.peak(),
                          dict(self._params_by_dtype), grads_live, self._optimizer, acts, copies, self._shape)
        self._note(rec, peak_before)
        self._micro_in_window += 1
        self.micro_batches += 1
        ledger.reset()

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        self._step_grads = storage_bytes(p.grad for p in self._trainable if p.grad is not None)
        self.grads_total = max(self.grads_total, self._step_grads)
        self._step_peak_before = self.meter.peak()

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        self._optimizer = optimizer_state_bytes(optimizer, self._params[0].device.type if self._params else None)
        self.optimizer_total = max(self.optimizer_total, self._optimizer)
        rec = PhaseRecord("optimizer step", step, -1, self.meter.peak(), dict(self._params_by_dtype),
                          self._step_grads, self._optimizer, 0, 0)
        self._note(rec, self._step_peak_before)
        self.steps = step
        self._micro_in_window = 0
        if self.stop_after is not None and step >= self.stop_after:
            raise StopTraining(step)

    def _note(self, rec: PhaseRecord, peak_before: int) -> None:
        self.records.append(rec)
        if self.peak_record is None or rec.peak > peak_before:
            self.peak_record = rec

    # --------------------------------------------------------------- result
    def anatomy(self) -> dict[str, Any] | None:
        if self.peak_record is None:
            return None
        out = self.peak_record.anatomy()
        out["autocast_cache"] = self.autocast_cache
        out["max_activations"] = self.max_activations
        out["max_weight_copies"] = self.max_weight_copies
        out["grads_total"] = self.grads_total
        out["optimizer_total"] = self.optimizer_total
        return out


class StopTraining(Exception):
    """Raised by :class:`AnatomyInstrument` after the last measured step (not an error)."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped after optimizer step {step}")
        self.step = step
