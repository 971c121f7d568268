"""Memory planner: predict every component of a fine-tuning run's peak memory.

The components (all in bytes, for one micro-batch of ``batch`` rows of ``seq_len`` tokens) are
measured on the real code, not on a replica of it: ``solotune.bench.dryrun`` builds the real
:class:`~solotune.model.Transformer`, wraps it with the real LoRA and casts it per the precision
policy (:func:`solotune.train.precision.get_policy`), on the meta device for the parameters and on
fake tensors (shapes and dtypes, no data) for one forward + the training loop's loss.

* **parameters**: every parameter tensor of that model, in its dtype (the policy's ``param_dtype``;
  LoRA adapters in its ``adapter_dtype``).
* **gradients**: one tensor per *trainable* parameter, in that parameter's dtype.
* **optimizer state**: :func:`solotune.train.optim.optimizer_state_bytes` of the setup's optimizer
  over the trainable tensors (AdamW: two moments in the parameter's dtype + a 4-byte ``step``).
* **saved activations** and **autocast weight copies**: the tensors autograd packs for backward in
  the dry run, counted by the measured anatomy's own ledger
  (:class:`solotune.bench.anatomy.SavedTensorLedger`: by storage, parameters excluded, 16-bit
  transposed weight copies apart), so the planner counts what the anatomy measures: byte for byte
  on the tiny models through the training loop and on every committed 7B cell measured on an H100
  (tests/bench). Under fp16/bf16 autocast every fp32 weight a gradient flows
  through gets a 16-bit copy that backward keeps (~2 bytes per weight: this, not the activations,
  is what makes fp16 AMP over fp32 weights *raise* the peak). For ``device="cuda"`` CUDA's fused
  dropout and attention kernels (flash in 16 bits, memory-efficient in fp32) are swapped in: the
  dry run runs on CPU fake tensors.
  All blocks are identical, so a model of any depth is measured from dry runs of at most 3 blocks
  (:func:`solotune.bench.dryrun.activations`): a few tenths of a second of CPU per method and
  precision for a 7B model, after a one-time ~2 s import of torch's fake-tensor machinery.
* **autocast cache**: one 16-bit copy of every trainable fp32 matmul weight, held by autocast for
  the whole forward (kept by backward too, as a weight copy, unless its block is checkpointed).
* **transients** ("rest"): the logits and the loss's fp32 copy of them, the loss gradients at the
  start of backward, the block recomputed under gradient checkpointing (its saved tensors, from the
  dry run of that block un-checkpointed), autocast's cache of trainable weights in checkpointed
  blocks, the optimizer's scratch. Sizes come from the dry run; how they overlap is modelled, not
  measured.

Compiled runs (``compiled``: the blocks and, where it compiles, the loss): a block that is not
checkpointed saves what Inductor's partitioner keeps, traced from the real block
(``dryrun._block_graph``); the full-logits loss saves its 16-bit logits and logsumexp
(``dryrun.as_compiled_full_logits``). A checkpointed block's recomputation is the compiled block's
saved set. What the dry run could not trace is modelled eager and named in ``Prediction.notes``.

Two options change components rather than add any:

* **quantize** ("nf4" | "int8" | "fp8", LoRA only: QLoRA): the dry run's model has the real quantized
  linears swapped in before LoRA (``dryrun.training_model``). Their codes and scales are buffers,
  counted in the parameters under the kind's name (``params["nf4"]``), from ``weight_bytes()``;
  one dequantized weight (the largest [out, in] in the compute dtype) is a forward/backward
  transient, since the forward dequantizes for its matmul and the backward dequantizes again.
* **optimizer** (``solotune.train.optim``): its state bytes per tensor (8-bit AdamW: ~2 bytes per
  parameter: a uint8 code per element and an fp32 scale per 256) and its update's scratch (the
  largest tensor's). ``optimizer_in_backward``: every parameter is updated from its gradient hook and
  its gradient freed, so the full set of gradients never exists: the gradients component is the
  largest single gradient, the updates (scratch, and with state offload the states in flight)
  happen during backward in gradient order — the head's while its 16-bit d(logits) is alive, the
  blocks' with the recomputation's transients — and the step phase holds nothing extra.
  It needs grad_accum 1; :func:`plan` plans such a row as one micro-batch of ``batch x grad_accum``
  rows (the same examples per optimizer step).
* **offload "optimizer"** (``solotune.optim.offload.HostStates``): the optimizer state lives in
  pinned host memory (``host_bytes``); the device holds the states of ``max_in_flight + 2``
  tensors at most (the one updated, the one prefetched, the copies going back): that many times the
  largest tensor's state in the step phase; in backward (in-backward) one head-sized state and the
  rest block tensors' at the head's update, block tensors' states alone during the blocks'
  (7B full fine-tuning: predicted 13.70 GiB, measured 13.40; all-largest gave 14.39).
* **offload "activations"**: ``ActivationOffload`` moves every saved activation storage of at
  least its ``min_bytes`` to pinned host memory (with checkpointing, mostly the block inputs). The
  device keeps the ledger's activations less those storages, plus a few of the largest of them
  (:func:`offload_resident_storages`: every block checkpointed, max(max_in_flight, 2), the pending
  copies that backward starts from, then the one in use and the one prefetched; otherwise
  max_in_flight + 2); the head's and loss's storages, saved last, are still pending when backward
  starts and stay. ``Prediction.host_bytes``: the pinned host copies.

``peak = max(forward/backward phase, optimizer-step phase)``, both in steady state (optimizer
state allocated; with accumulation the window's gradients already exist while the next
micro-batch runs).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ..config import PRESETS, ModelConfig
from ..model import checkpoint_policy
from ..peft import LoRASpec
from ..kernels import KERNEL_SETS
from ..optim.offload import HostStates
from ..train.config import OFFLOAD, OFFLOAD_TARGETS
from ..train.loss import COMPILABLE_LOSSES, LOSSES
from ..train.optim import get_optimizer_spec, optimizer_scratch_bytes, optimizer_state_bytes
from ..train.precision import PrecisionPolicy, get_policy
from . import dryrun
from .anatomy import dtype_name
from .dryrun import OFFLOAD_MAX_IN_FLIGHT, QUANTIZE_KINDS

OFFLOAD_KINDS = OFFLOAD  # none | activations | optimizer | activations,optimizer (solotune.train.config)
# HostStates' in-flight limit, read from it so the prediction follows the code: the device holds the
# states of the tensor being updated, the one prefetched and max_in_flight copies going back.
OPTIMIZER_STATES_ON_DEVICE: int = inspect.signature(HostStates.__init__).parameters["max_in_flight"].default + 2
# Ranking only: bytes over PCIe per optimizer step priced in FLOPs at PRECISION_SPEED 1.0 (fp32,
# ~50 TFLOP/s on an H100/H200 without TF32) against ~25 GB/s of pinned host copies each way.
PCIE_FLOPS_PER_BYTE = 2000.0
# The optimizer techniques `solotune plan` weighs for full fine-tuning (LoRA's state is small):
# (optimizer, in backward, state offloaded).
FULL_FT_OPTIMIZERS: tuple[tuple[str, bool, bool], ...] = (
    ("adamw", False, False), ("adamw-8bit", False, False), ("adamw-8bit", True, False),
    ("adamw-8bit", False, True), ("adamw-8bit", True, True),
)
PRECISIONS = ("fp32", "fp16-amp", "bf16-amp", "bf16")  # the training modes (precision.POLICIES also has fp64)
DEVICES = ("cuda", "cpu")
GiB = 1024**3

# Relative throughput of one training token per precision on a tensor-core GPU, used only to rank
# configurations (fp32 matmuls run without TF32, as torch does by default).
PRECISION_SPEED = {"fp32": 1.0, "fp16-amp": 3.0, "bf16-amp": 3.0, "bf16": 3.6}


# =========================================================================== configuration
@dataclass(frozen=True, init=False)
class Setup:
    """One training configuration, as the planner sees it.

    ``lora``: the adapters (rank 0 = full fine-tuning). For convenience ``lora_rank=``,
    ``lora_targets=`` and ``lora_dropout=`` are accepted too (also by :meth:`replace`) and change
    those fields of ``lora``.
    """

    model: ModelConfig
    seq_len: int = 512  # tokens per row of the longest micro-batch
    batch: int = 1  # rows per micro-batch
    grad_accum: int = 1
    grad_checkpoint: str = "off"  # off | all | every:K
    precision: str = "fp32"  # fp32 | fp16-amp | bf16-amp | bf16 (solotune.train.precision)
    lora: LoRASpec = LoRASpec()
    optimizer: str = "adamw"  # solotune.train.optim
    device: str = "cuda"  # "cuda" | "cpu": dropout masks, attention statistics and the optimizer step differ
    quantize: str = "none"  # none | nf4 | int8 | fp8: the frozen base's block linears (LoRA only)
    offload: str = "none"  # none | activations | optimizer | activations,optimizer
    optimizer_in_backward: bool = False  # each parameter updated from its gradient hook (grad_accum 1)
    loss: str = "full-logits"  # solotune.train.loss.LOSSES: how the head's logits come to exist
    kernels: str = "off"  # off | triton: fused RMSNorm / SwiGLU / RoPE (solotune.kernels; CUDA only)
    # the run compiles its blocks and its loss (TrainConfig.compiles: auto on CUDA): what a compiled
    # loss keeps (dryrun.as_compiled_full_logits), and what Inductor's partitioner saves of each
    # block that is not checkpointed (dryrun._AsCompiledBlock: the real block traced by AOTAutograd)
    compiled: bool = False
    # whether the compiled run compiles its loss too (None: as ``compiled``; runs recorded before the
    # compiled loss compiled their blocks only)
    loss_compiled: bool | None = None

    def __init__(self, model: ModelConfig, seq_len: int = 512, batch: int = 1, grad_accum: int = 1,
                 grad_checkpoint: str = "off", precision: str = "fp32", lora: LoRASpec | None = None,
                 optimizer: str = "adamw", device: str = "cuda", quantize: str = "none", offload: str = "none",
                 optimizer_in_backward: bool = False, *, loss: str = "full-logits", kernels: str = "off",
                 compiled: bool = False, loss_compiled: bool | None = None, lora_rank: int | None = None,
                 lora_targets: Iterable[str] | None = None, lora_dropout: float | None = None) -> None:
        spec = lora if lora is not None else LoRASpec()
        legacy = {k: v for k, v in (("rank", lora_rank), ("targets", lora_targets), ("dropout", lora_dropout))
                  if v is not None}
        if legacy:
            spec = dataclasses.replace(spec, **legacy)
        for name, value in (("model", model), ("seq_len", seq_len), ("batch", batch), ("grad_accum", grad_accum),
                            ("grad_checkpoint", grad_checkpoint), ("precision", precision), ("lora", spec),
                            ("optimizer", optimizer), ("device", device), ("quantize", quantize), ("offload", offload),
                            ("loss", loss), ("kernels", kernels), ("compiled", bool(compiled)),
                            ("loss_compiled", None if loss_compiled is None else bool(loss_compiled)),
                            ("optimizer_in_backward", bool(optimizer_in_backward))):
            object.__setattr__(self, name, value)
        self.__post_init__()

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.seq_len < 1 or self.batch < 1 or self.grad_accum < 1:
            raise ValueError(f"seq_len, batch and grad_accum must be >= 1 (got {self.seq_len}, {self.batch}, {self.grad_accum})")
        if self.device not in DEVICES:
            raise ValueError(f"device {self.device!r}: expected one of {', '.join(DEVICES)}")
        checkpoint_policy(self.grad_checkpoint, self.model.n_layers)  # validates
        if self.quantize not in QUANTIZE_KINDS:
            raise ValueError(f"quantize {self.quantize!r}: expected one of {', '.join(QUANTIZE_KINDS)}")
        if self.quantize != "none" and not self.lora.enabled:
            raise ValueError(f"quantize {self.quantize!r} needs LoRA (lora rank > 0): a quantized base is frozen")
        if self.offload not in OFFLOAD_KINDS:
            raise ValueError(f"offload {self.offload!r}: expected one of {', '.join(OFFLOAD_KINDS)}")
        get_optimizer_spec(self.optimizer)  # validates
        if self.loss not in LOSSES:
            raise ValueError(f"loss {self.loss!r}: expected one of {', '.join(LOSSES)}")
        if self.kernels not in KERNEL_SETS:
            raise ValueError(f"kernels {self.kernels!r}: expected one of {', '.join(KERNEL_SETS)}")
        if self.optimizer_in_backward and self.grad_accum != 1:
            raise ValueError(f"optimizer_in_backward needs grad_accum 1 (got {self.grad_accum})")
        if self.optimizer_in_backward and self.precision == "fp16-amp":
            raise ValueError("optimizer_in_backward cannot run under fp16-amp (its loss scaler needs every gradient)")

    @property
    def policy(self) -> PrecisionPolicy:
        return get_policy(self.precision)

    @property
    def lora_rank(self) -> int:
        return self.lora.rank

    @property
    def lora_targets(self) -> tuple[str, ...]:
        return self.lora.targets

    @property
    def lora_dropout(self) -> float:
        return self.lora.dropout

    @property
    def method(self) -> str:
        return "lora" if self.lora.enabled else "full"

    @property
    def offload_targets(self) -> frozenset[str]:
        return frozenset(t for t in self.offload.split(",") if t in OFFLOAD_TARGETS)

    @property
    def label(self) -> str:
        """The method with its options, e.g. ``lora``, ``lora nf4 +offload``, ``full adamw-8bit
        +in-backward +offload(optimizer)``."""
        off = self.offload_targets
        return " ".join([self.method] + [self.quantize] * (self.quantize != "none")
                        + [self.optimizer] * (self.optimizer != "adamw")
                        + ["+in-backward"] * self.optimizer_in_backward
                        + ["+offload"] * (off == {"activations"})
                        + ([f"+offload({','.join(sorted(off))})"] if "optimizer" in off else [])
                        + [f"+{self.loss}"] * (self.loss != "full-logits"))

    @property
    def compiles_loss(self) -> bool:
        """The loss runs compiled: a compiled run's (unless ``loss_compiled`` says otherwise) and a
        loss that the loop compiles (``train.loss.COMPILABLE_LOSSES``)."""
        wanted = self.compiled if self.loss_compiled is None else self.loss_compiled
        return wanted and self.loss in COMPILABLE_LOSSES

    @property
    def amp(self) -> bool:
        return self.policy.autocast_dtype is not None

    @property
    def compute_dtype(self) -> str:
        pol = self.policy
        return dtype_name(pol.autocast_dtype or pol.param_dtype)

    @property
    def param_dtype(self) -> str:
        return dtype_name(self.policy.param_dtype)

    @property
    def checkpointed(self) -> frozenset[int]:
        """The blocks recomputed in backward."""
        return checkpoint_policy(self.grad_checkpoint, self.model.n_layers)

    def replace(self, **changes: Any) -> "Setup":
        return dataclasses.replace(self, **changes)


@dataclass
class Prediction:
    """Predicted bytes per component; ``peak`` is the larger of the two phases."""

    setup: Setup
    params: dict[str, int]  # dtype -> bytes
    trainable_params: int
    total_params: int
    grads: int
    optimizer: int
    activations: int  # saved for backward (model + loss), one micro-batch
    weight_copies: int  # autocast's 16-bit weight copies kept for backward
    autocast_cache: int  # 16-bit copies of trainable weights held by autocast during the forward
    activations_by_part: dict[str, int]
    transient_fb: int  # forward/backward transients on top of the resident components
    transient_step: int
    peak_fb: int
    peak_step: int
    # Activation offload: `activations` is what stays on the device; these are the ledger's bytes
    # before the offload and the pinned host copies (0 without offload).
    activations_saved: int = 0
    host_bytes: int = 0
    dequantized: int = 0  # one quantized weight dequantized [out, in] (part of transient_fb)
    notes: tuple[str, ...] = ()  # what the dry run could not model as asked (dryrun.DryRun.notes)

    @property
    def params_total(self) -> int:
        return sum(self.params.values())

    @property
    def peak(self) -> int:
        return max(self.peak_fb, self.peak_step)

    @property
    def peak_phase(self) -> str:
        return "forward/backward" if self.peak_fb >= self.peak_step else "optimizer step"

    def anatomy(self) -> dict[str, Any]:
        """The same keys as the measured anatomy (``solotune.bench.anatomy``)."""
        fb = self.peak_fb >= self.peak_step
        grads_live = self.grads if (not fb or self.setup.grad_accum > 1) else 0
        acts = self.activations if fb else 0
        copies = self.weight_copies if fb else 0
        parts = self.params_total + grads_live + self.optimizer + acts + copies
        return {
            "phase": self.peak_phase, "peak": self.peak, "params": dict(self.params), "params_total": self.params_total,
            "grads": grads_live, "optimizer": self.optimizer, "activations": acts, "weight_copies": copies,
            "rest": self.peak - parts, "autocast_cache": self.autocast_cache,
        }

    def to_dict(self) -> dict[str, Any]:
        s = self.setup
        return {
            "model": s.model.name, "layers": s.model.n_layers, "seq_len": s.seq_len, "batch": s.batch,
            "grad_accum": s.grad_accum, "grad_checkpoint": s.grad_checkpoint, "precision": s.precision,
            "method": s.method, "quantize": s.quantize, "offload": s.offload, "loss": s.loss, "compiled": s.compiled, "loss_compiled": s.compiles_loss,
            "optimizer": s.optimizer,
            "optimizer_in_backward": s.optimizer_in_backward, "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "params": dict(self.params), "grads": self.grads, "optimizer": self.optimizer,
            "activations": self.activations, "weight_copies": self.weight_copies,
            "autocast_cache": self.autocast_cache, "activations_by_part": dict(self.activations_by_part),
            "transient_fb": self.transient_fb, "transient_step": self.transient_step,
            "peak_fb": self.peak_fb, "peak_step": self.peak_step, "peak": self.peak, "peak_phase": self.peak_phase,
            "activations_saved": self.activations_saved, "host_bytes": self.host_bytes, "dequantized": self.dequantized,
            "notes": list(self.notes),
        }


# ================================================================== parameters and optimizer
def _tensors(s: Setup) -> list[tuple[str, int, torch.dtype, bool]]:
    return dryrun.parameters(s.model, s.policy, s.lora, s.quantize)


def _quantized(s: Setup) -> dryrun.Quantized:
    return dryrun.quantized(s.model, s.policy, s.lora, s.quantize)


def param_tensors(s: Setup) -> list[tuple[str, int, str, bool]]:
    """Every parameter tensor of the training model once: (name, numel, dtype, trainable), names as
    ``model.named_parameters()`` gives them (LoRA: ``...wq.base.weight``, ``...wq.lora_a``). Tied
    heads appear once."""
    return [(name, n, dtype_name(dt), tr) for name, n, dt, tr in _tensors(s)]


def param_bytes(s: Setup) -> dict[str, int]:
    """Bytes of the model's weights by dtype; a quantized base's codes and scales (buffers) under
    the kind's name ("nf4", "int8")."""
    by: dict[str, int] = {}
    for _, n, dt, _ in _tensors(s):
        by[dtype_name(dt)] = by.get(dtype_name(dt), 0) + n * dt.itemsize
    q = _quantized(s)
    if q.storage:
        by[s.quantize] = q.storage
    return by


def grad_bytes(s: Setup) -> int:
    """One gradient per trainable parameter, in the parameter's dtype."""
    return sum(n * dt.itemsize for _, n, dt, tr in _tensors(s) if tr)


def optimizer_bytes(s: Setup) -> int:
    """The optimizer's state over the trainable tensors (``solotune.train.optim``)."""
    return optimizer_state_bytes(s.optimizer, _trainable_shapes(s))


def _trainable_shapes(s: Setup) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of every trainable tensor: what optimizer state sizes are computed from."""
    shape = dryrun.shapes(s.model, s.policy, s.lora, s.quantize)
    return [(shape[name], dt) for name, _, dt, tr in _tensors(s) if tr]


# ======================================================================= saved activations
def saved_activations(s: Setup) -> tuple[int, int, dict[str, int], dict[str, int], dict[str, int]]:
    """(saved activation bytes, saved weight-copy bytes, bytes by part, autocast cache by weight,
    transient sizes) for one micro-batch of ``s.batch`` x ``s.seq_len`` tokens, from the dry run."""
    a = _activations(s)
    lp = s.policy.autocast_dtype
    cache = {} if lp is None else {name: n * lp.itemsize
                                   for name, n in dryrun.autocast_cache(s.model, s.policy, s.lora, s.quantize)}
    extra = {"logits": a.logits, "logits_fp32": a.logits_fp32, "loss_grads": a.loss_grads, "head_grad": a.head_grad,
             "recompute": a.recompute, "offloadable": a.saved.offloadable,
             "outside_offloadable": a.outside_offloadable, "largest_offloadable": a.largest_block_offloadable,
             "outside": a.outside}
    return a.saved.activations, a.saved.weight_copies, dict(a.saved.by_part), cache, extra


def _activations(s: Setup) -> dryrun.Activations:
    return dryrun.activations(s.model, s.policy, s.lora, s.checkpointed, s.batch, s.seq_len, s.device, s.quantize,
                              s.loss, s.kernels, compiled_loss=s.compiles_loss,
                              compiled_blocks=s.compiled)


def offloaded(s: Setup, acts: int, offloadable: int, outside: int, largest: int) -> tuple[int, int]:
    """(activation bytes that stay on the device, pinned host bytes) under ``s.offload``, from the
    ledger's activations and the storages ActivationOffload copies to the host (>= its min_bytes;
    all of them are host bytes). Those saved outside the blocks (head, loss: ``outside``) are saved
    last, so they are the copies still pending when backward starts and are used in place: they
    count as resident (an upper bound when there are more than max_in_flight of them). Of the
    blocks' storages, :func:`offload_resident_storages` of the largest stay, at most all of them."""
    if "activations" not in s.offload_targets or not offloadable:
        return acts, 0
    moved = offloadable - outside
    return acts - moved + min(moved, offload_resident_storages(s) * largest), offloadable


def offload_resident_storages(s: Setup) -> int:
    """How many of the blocks' offloaded storages are on the device at once (in units of the largest).

    Checkpointing every block, the hooks see only the blocks' inputs, one per block, used by one
    recomputation: the forward keeps at most max_in_flight pending copies; backward starts from those
    (handed back in place, the last blocks' inputs) and then holds the input in use and the one being
    prefetched, the earlier one freed with its block's backward: max(max_in_flight, 2). (frontier6-h200
    run5: (max_in_flight + 2) put the 24 GiB probes 2.7% / 5.4% over, by two [T, C] bf16; with this
    rule −0.2% / +0.2%.) A block that is not checkpointed saves its internals through the hooks,
    and one autograd node may need several of them at once (attention's q, k, v, out): there, the
    pending copies plus the one in use and the prefetched one, max_in_flight + 2, as an upper bound."""
    if s.checkpointed == frozenset(range(s.model.n_layers)):
        return max(OFFLOAD_MAX_IN_FLIGHT, 2)
    return OFFLOAD_MAX_IN_FLIGHT + 2


# ================================================================================ the peak
def predict(s: Setup) -> Prediction:
    """Every component and the two phase peaks of ``s`` (steady state)."""
    params = param_bytes(s)
    tensors = _tensors(s)
    quant = _quantized(s)
    trainable = sum(n for _, n, _, tr in tensors if tr)
    total = sum(n for _, n, _, _ in tensors) + quant.weights
    grads, opt = grad_bytes(s), optimizer_bytes(s)
    acts_saved, copies, parts, cache, extra = saved_activations(s)
    acts, host = offloaded(s, acts_saved, extra["offloadable"], extra["outside_offloadable"],
                           extra["largest_offloadable"])
    trainable_tensors = [(n, dt) for _, n, dt, tr in tensors if tr]
    largest_grad = max((n * dt.itemsize for n, dt in trainable_tensors), default=0)
    # The update's working memory: the largest tensor's scratch, and with the state offloaded the
    # states of the tensors in flight (what stays resident is then nothing).
    update = optimizer_scratch_bytes(s.optimizer, trainable_tensors, s.device)
    update_in_blocks = update  # in backward, while the blocks' gradients arrive (in-backward only)
    if "optimizer" in s.offload_targets:
        host += opt
        largest_state = max((optimizer_state_bytes(s.optimizer, [t]) for t in _trainable_shapes(s)), default=0)
        shape = dryrun.shapes(s.model, s.policy, s.lora, s.quantize)
        block_tensors = [(shape[name], dt) for name, n, dt, tr in tensors if tr and _layer_of(name) is not None]
        largest_block = max((optimizer_state_bytes(s.optimizer, [t]) for t in block_tensors), default=0)
        if s.optimizer_in_backward:  # in gradient order: one head-sized tensor among the ones in flight
            update += min(opt, largest_state + (OPTIMIZER_STATES_ON_DEVICE - 1) * largest_block)
        else:
            update += min(opt, OPTIMIZER_STATES_ON_DEVICE * largest_state)
        update_in_blocks += min(opt, OPTIMIZER_STATES_ON_DEVICE * largest_block)
        opt = 0
    if s.optimizer_in_backward:
        grads = largest_grad  # one gradient at a time: each is freed by its own update
    cache_total = sum(cache.values())
    ckpt = s.checkpointed
    # Trainable weights whose 16-bit copy is not kept by backward (checkpointed blocks) still sit
    # in autocast's cache until the forward ends.
    cache_unsaved = sum(b for name, b in cache.items() if _layer_of(name) in ckpt) if ckpt else 0
    logits, logits_f, head_grad = extra["logits"], extra["logits_fp32"], extra["head_grad"]
    # End of forward: + logits (+ the unsaved cache). Loss: + the fp32 copy of the logits while
    # log_softmax runs. Start of backward: d(log_softmax) and d(logits) in fp32 (+ the head's weight
    # gradient) beside the saved fp32 log_softmax; the 16-bit logits are gone (the loss owns them
    # and returns a scalar: nothing holds them into backward — measured: 7B LoRA rows of 99,456 and
    # 103,552 tokens, benchmarks/results/frontier4-h200/run4, predicted within 0.05% without them,
    # +8% with them), and their 16-bit gradient comes only after the fp32 ones are freed.
    # A quantized linear's dequantized weight lives for its matmul: in the last block's forward
    # (all but the head's activations saved), and in each block's backward (with its recomputation).
    deq = quant.dequantized
    fwd_end = cache_unsaved + max(logits, deq)
    # the head's input (the final norm's output, [B, T, C]) lives through the loss; eager losses that hold
    # one chunk at a time (fused linear-CE, chunked) peak there with every activation saved
    head_input = s.batch * s.seq_len * s.model.dim * s.policy.param_dtype.itemsize
    loss = logits + logits_f + head_input
    bwd_start = extra["loss_grads"] + head_grad
    # A block's backward: eager blocks as traced on their own (dryrun.block_backward: the incoming
    # gradient, the ops' gradients and temporaries, a checkpointed block's recomputation, each freed as
    # autograd frees it), on top of the saved tensors less the head's and loss's (consumed by then);
    # compiled blocks as their saved set (a checkpointed one's recomputation). With the full-logits
    # loss the loss's fp32 gradients are the larger transient at every length; with fused linear-CE
    # the block's backward is (the long-row miss of frontier4-h200/run2).
    plain_bwd, ckpt_bwd = _block_backward(s)
    freed = extra["outside"]
    bwd_plain = max(plain_bwd + deq - freed, 0) if plain_bwd else 0
    bwd_ckpt = max(extra["recompute"] + (head_grad if ckpt else 0), ckpt_bwd - freed if ckpt_bwd else 0) + deq
    transient_fb = max(fwd_end, loss, bwd_start, bwd_ckpt, bwd_plain)
    grads_fb = grads if s.grad_accum > 1 else 0
    if s.optimizer_in_backward:
        # Updates run inside backward, each right after its own gradient: the head's first, once the
        # loss gradients are consumed (the 16-bit d(logits), logits-sized, and the head's gradient
        # still alive), the blocks'
        # during their recomputation and backward (one block tensor's gradient and, offloaded, the
        # states in flight of block tensors), the embedding's last, when the activations are gone.
        transient_fb = max(fwd_end, loss, bwd_start, logits + grads + update,
                           bwd_ckpt + grads + update_in_blocks)
        peak_fb = sum(params.values()) + opt + acts + copies + transient_fb
        transient_step = 0  # step() has nothing left to do
        peak_step = sum(params.values()) + opt
    else:
        # Gradients grow while activations are freed: when the gradients are the bigger of the two
        # (full fine-tuning) the end of backward holds all of them and the activations are gone.
        peak_fb = sum(params.values()) + opt + grads_fb + max(acts + copies + transient_fb, grads - grads_fb)
        # Optimizer step: fused AdamW on CUDA works in place (the CPU loop and 8-bit AdamW have
        # per-tensor scratch; with the state offloaded, the states in flight).
        transient_step = update
        peak_step = sum(params.values()) + grads + opt + transient_step
    return Prediction(s, params, trainable, total, grads, opt, acts, copies, cache_total, parts,
                      transient_fb, transient_step, peak_fb, peak_step, acts_saved, host, deq, _activations(s).notes)


def _block_backward(s: Setup) -> tuple[int, int]:
    """(a plain block's, a checkpointed block's) backward working set beyond the saved tensors, for eager
    blocks (0 where there is no such block, and for compiled blocks: their saved set models them)."""
    if s.compiled:
        return 0, 0
    ckpt = s.checkpointed
    run = functools.partial(dryrun.block_backward, s.model, s.policy, s.lora, batch=s.batch, seq_len=s.seq_len,
                            device=s.device, quantize=s.quantize, kernels=s.kernels)
    return (run(checkpointed=False) if len(ckpt) < s.model.n_layers else 0), (run(checkpointed=True) if ckpt else 0)


def _layer_of(name: str) -> int | None:
    m = re.match(r"layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


# ====================================================================== FLOPs and runtime
def matmul_params(s: Setup) -> tuple[int, int]:
    """(weights every token multiplies through, the trainable ones among them). The embedding is a
    lookup (no FLOPs); the head is a matmul even when tied."""
    cfg = s.model
    total = trainable = 0
    for name, n, _, tr in param_tensors(s):
        if name.endswith("norm.weight") or name == "tok_embeddings.weight":
            continue
        total += n
        trainable += n if tr else 0
    total += _quantized(s).weights  # the quantized bases: buffers, frozen, multiplied through all the same
    head = cfg.vocab_size * cfg.dim
    if cfg.tie_embeddings:
        total += head
        trainable += head if not s.lora.enabled else 0
    return total, trainable


def train_flops(s: Setup, rows: Iterable[int]) -> float:
    """Model FLOPs of one training pass over micro-batch rows of the given lengths.

    forward: 2 * N_mm per token + causal attention (2 * T * C per token per layer for QK^T and PV);
    backward: the input gradients through every matmul (2 * N_mm, even through frozen weights) +
    the weight gradients of the trainable ones (2 * N_trainable) + twice the attention.
    Recomputation under checkpointing is not model FLOPs and is not counted.
    """
    n_mm, n_tr = matmul_params(s)
    cfg = s.model
    flops = 0.0
    for T in rows:
        attn = 2.0 * T * T * cfg.dim * cfg.n_layers  # causal: half of 2 matmuls of 2*T*T*C
        fwd = 2.0 * n_mm * T + attn
        flops += fwd + (2.0 * n_mm * T + 2.0 * n_tr * T + 2 * attn)
    return flops


def relative_cost(s: Setup) -> float:
    """A unitless time per token for ranking: FLOPs (+ the recomputed forward of checkpointed
    blocks) over the precision's relative speed."""
    T = s.seq_len
    base = train_flops(s, [T] * s.batch)
    n_ckpt = len(checkpoint_policy(s.grad_checkpoint, s.model.n_layers))
    n_mm, _ = matmul_params(s)
    block_fwd = 2.0 * (n_mm - s.model.vocab_size * s.model.dim) / max(s.model.n_layers, 1) * T + 2.0 * T * T * s.model.dim
    recompute = n_ckpt * block_fwd * s.batch
    pcie = 0.0
    if "optimizer" in s.offload_targets:  # every state crosses twice per optimizer step
        pcie = 2 * optimizer_state_bytes(s.optimizer, _trainable_shapes(s))
        pcie *= PCIE_FLOPS_PER_BYTE * PRECISION_SPEED[s.precision] / s.grad_accum  # per micro-batch
    # a base whose GEMMs run faster (fp8): its share of the matmul FLOPs at that rate (attention ignored)
    quant = _quantized(s)
    fast = quant.weights / n_mm * (1.0 - 1.0 / quant.gemm_speedup) if quant.weights and n_mm else 0.0
    return ((base + recompute) * (1.0 - fast) + pcie) / PRECISION_SPEED[s.precision] / (s.batch * T)


# ============================================================================= plan listing
def parse_bytes(text: str | int | float) -> int:
    """'24GiB', '24G', '80GB', '1.5TiB', '512MiB' or a plain number of bytes -> bytes. GB means
    10^9, GiB (and a bare G) 2^30."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?)([bB]?)\s*", str(text))
    if not m:
        raise ValueError(f"memory size {text!r}: expected a number with a unit, e.g. 24GiB, 80GB, 512MiB")
    num, unit, i, _ = m.groups()
    power = " KMGT".index(unit.upper()) if unit else 0
    base = 1000 if (unit and not i and m.group(4)) else 1024
    return int(float(num) * base**power)


def fmt_gib(n: float | None) -> str:
    return "–" if n is None else f"{n / GiB:.2f}"


def model_config(name_or_path: str, layers: int | None = None) -> ModelConfig:
    """A preset name or a checkpoint path (its config only; no weights are read)."""
    if name_or_path in PRESETS:
        cfg = PRESETS[name_or_path]
    else:
        cfg = _config_from_path(Path(name_or_path))
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers must be >= 1, got {layers}")
        cfg = cfg.replace(n_layers=layers)
    return cfg


def _config_from_path(p: Path) -> ModelConfig:
    from ..checkpoint import resolve

    if not p.exists():
        raise FileNotFoundError(f"{p}: no such checkpoint, and not a preset ({', '.join(sorted(PRESETS))})")
    kind, path = resolve(p)
    if kind == "hf":
        return ModelConfig.from_hf_config(json.loads((path / "config.json").read_text()), name=path.name)
    if kind == "meta":
        params = json.loads((path / "params.json").read_text())
        vocab = params.get("vocab_size", -1)
        if vocab is None or int(vocab) <= 0:
            params = {**params, "vocab_size": 32000}  # LLaMA-1/2 params.json say -1: the tokenizer's 32000
        return ModelConfig.from_meta_params(params, name=path.name)
    from ..checkpoint.gguf import _open, read_metadata

    reader = _open(path)
    meta = read_metadata(reader)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    return ModelConfig.from_gguf_metadata(meta, name=path.stem, tied=tied)


PLAN_CHECKPOINTING = ("off", "every:4", "every:2", "all")


def fits(p: Prediction, gpu_mem: int, host_mem: int | None = None) -> bool:
    """The predicted peak fits ``gpu_mem`` and, when ``host_mem`` is given, the pinned host copies
    (offloaded activations / optimizer state) fit it: page-locked memory cannot be swapped out."""
    return p.peak <= gpu_mem and (host_mem is None or p.host_bytes <= host_mem)


def plan(model: ModelConfig, gpu_mem: int, seq_len: int = 512, batch: int = 1, grad_accum: int = 8,
         lora_rank: int = 16, lora_targets: tuple[str, ...] = ("wq", "wv"), lora_dropout: float = 0.05,
         methods: tuple[str, ...] = ("lora", "full"), precisions: tuple[str, ...] = PRECISIONS,
         checkpointing: tuple[str, ...] = PLAN_CHECKPOINTING, optimizer: str = "adamw",
         device: str = "cuda", quantize: tuple[str, ...] = ("none",),
         offload: tuple[str, ...] = ("none",),
         full_optimizers: tuple[tuple[str, bool, bool], ...] | None = None,
         losses: tuple[str, ...] = ("full-logits",), compiled: bool = False,
         host_mem: int | None = None) -> list[tuple[Prediction, float, bool]]:
    """Every configuration as (prediction, relative cost, fits), fitting ones first, fastest first
    (:func:`fits`: ``gpu_mem``, and ``host_mem`` for the pinned host copies when given).
    Quantized bases are combined with LoRA only. ``full_optimizers``: the (optimizer, in backward,
    state offloaded) techniques to weigh for full fine-tuning (e.g. :data:`FULL_FT_OPTIMIZERS`;
    None: ``optimizer`` alone, as for LoRA); an in-backward row with ``grad_accum`` > 1 is planned
    as one micro-batch of ``batch x grad_accum`` rows (the same examples per step)."""
    rows = []
    for method, quant, prec, gc, off, loss in itertools.product(methods, quantize, precisions, checkpointing,
                                                                offload, losses):
        if gc.startswith("every:") and int(gc.split(":")[1]) >= model.n_layers:
            continue
        if quant != "none" and method != "lora":
            continue
        lora = LoRASpec(rank=lora_rank if method == "lora" else 0, dropout=lora_dropout, targets=tuple(lora_targets))
        techniques = full_optimizers if (method == "full" and full_optimizers) else ((optimizer, False, False),)
        for opt_name, in_bwd, opt_off in techniques:
            if in_bwd and prec == "fp16-amp":
                continue  # the loss scaler must see every gradient before any update
            s = Setup(model, seq_len=seq_len, batch=batch, grad_accum=grad_accum, grad_checkpoint=gc, precision=prec,
                      lora=lora, optimizer=opt_name, device=device, quantize=quant,
                      offload=_with_optimizer_offload(off, opt_off), loss=loss, compiled=compiled)
            if in_bwd:
                s = s.replace(batch=batch * grad_accum, grad_accum=1, optimizer_in_backward=True)
            p = predict(s)
            rows.append((p, relative_cost(s), fits(p, gpu_mem, host_mem)))
    rows.sort(key=lambda r: (not r[2], r[1], r[0].peak))
    return rows


def _with_optimizer_offload(offload: str, optimizer: bool) -> str:
    """``offload`` with "optimizer" added when ``optimizer``, spelled as TrainConfig stores it."""
    parts = {t for t in offload.split(",") if t in OFFLOAD_TARGETS} | ({"optimizer"} if optimizer else set())
    return ",".join(t for t in OFFLOAD_TARGETS if t in parts) or "none"


def cheapest_fitting(s: Setup, gpu_mem: int,
                     techniques: tuple[tuple[str, bool, bool], ...] = FULL_FT_OPTIMIZERS) -> Setup | None:
    """``s`` with the cheapest (by :func:`relative_cost`) optimizer technique whose predicted peak
    fits ``gpu_mem``; None when none does. ``s`` itself (its optimizer, no in-backward, its
    offload) is the first candidate; in-backward ones need ``s.grad_accum == 1`` and no fp16-amp
    (skipped otherwise: a bench cell keeps its own micro-batch and accumulation)."""
    best: tuple[float, Setup] | None = None
    for opt_name, in_bwd, opt_off in ((s.optimizer, s.optimizer_in_backward, "optimizer" in s.offload_targets),
                                      *techniques):
        if in_bwd and (s.grad_accum != 1 or s.precision == "fp16-amp"):
            continue
        c = s.replace(optimizer=opt_name, optimizer_in_backward=in_bwd,
                      offload=_with_optimizer_offload(s.offload.replace("optimizer", ""), opt_off))
        if predict(c).peak <= gpu_mem:
            cost = relative_cost(c)
            if best is None or cost < best[0]:
                best = (cost, c)
    return None if best is None else best[1]


# ======================================================================= longest sequence
@dataclass(frozen=True)
class LongestFit:
    """The longest ``seq_len`` (a multiple of ``step``) of a setup that the planner fits in ``gpu_mem``."""

    setup: Setup  # at batch 1 and the longest seq_len that fits (or ``step`` when none does)
    seq_len: int | None  # None: not even ``step`` tokens fit
    prediction: Prediction  # at ``seq_len`` (or at ``step`` when nothing fits)
    first_over: int | None  # the shortest probed seq_len that does not fit (None: the cap fits)
    probes: int  # dry runs made

    def to_dict(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "first_over": self.first_over, "probes": self.probes,
                "peak": self.prediction.peak, "prediction": self.prediction.to_dict()}


def longest_seq_len(setup: Setup, gpu_mem: int, step: int = 128, cap: int = 1 << 20,
                    host_mem: int | None = None) -> LongestFit:
    """Longest multiple of ``step`` up to ``cap`` whose prediction at ``setup.batch`` rows
    :func:`fits` ``gpu_mem`` (and ``host_mem``, when given), by a bracket [longest that fits, shortest
    that does not] narrowed to one step. The peak and the pinned bytes grow about linearly with
    seq_len, so each next length is where the line through two predictions meets the limit
    (:func:`_next_probe`): ~5 dry runs where doubling and bisection took ~2 log2(cap/step). Any
    length the planner fits and every longer one it does not give the same answer as bisection."""
    if step < 1 or cap < step:
        raise ValueError(f"seq_len step {step} and cap {cap}: need 1 <= step <= cap")
    seen: dict[int, Prediction] = {}

    def at(T: int) -> Prediction:  # each length is predicted once
        if T not in seen:
            seen[T] = predict(setup.replace(seq_len=T))
        return seen[T]

    def excess(T: int) -> float:
        """How far over the limit, as a fraction (what the interpolation follows; :func:`fits` decides)."""
        p = at(T)
        over = p.peak / gpu_mem - 1
        return max(over, p.host_bytes / host_mem - 1) if host_mem is not None else over

    if not fits(at(step), gpu_mem, host_mem):
        return LongestFit(setup.replace(seq_len=step), None, seen[step], step, len(seen))
    fit, over, sides = [step], None, ""
    while fit[-1] < cap and (over is None or over - fit[-1] > step):
        T = _next_probe(fit, over, sides, excess, step, cap)
        if fits(at(T), gpu_mem, host_mem):
            fit.append(T)
            sides += "f"
        else:
            over = T
            sides += "o"
    best = fit[-1]
    return LongestFit(setup.replace(seq_len=best), best, seen[best], over, len(seen))


def _next_probe(fit: list[int], over: int | None, sides: str, excess: Callable[[int], float], step: int,
                cap: int) -> int:
    """The next seq_len to predict, strictly inside (longest fit, shortest over) on the step grid.
    Unbracketed: extrapolate the line through the two longest fits (at most 64x on, doubling when it
    does not rise). Bracketed: the line through both ends, rounded up (a linear peak then closes the
    bracket with one more probe); the midpoint after two probes on the same side (regula falsi's slow
    side), so it never needs many more dry runs than bisection."""
    best = fit[-1]
    if over is None:
        if len(fit) < 2 or excess(best) <= excess(fit[-2]):
            return min(cap, 2 * best)
        prev = fit[-2]
        guess = best - excess(best) * (best - prev) / (excess(best) - excess(prev))
        return min(cap, max(best + step, min(64 * best, _up(guess, step))))
    if sides[-2:] in ("ff", "oo"):
        return max(best + step, (best + over) // 2 // step * step)
    e_fit, e_over = excess(best), excess(over)
    guess = best + (over - best) * (-e_fit) / (e_over - e_fit)
    return max(best + step, min((over - 1) // step * step, _up(guess, step)))


def _up(x: float, step: int) -> int:
    """``x`` rounded up to a multiple of ``step``."""
    return math.ceil(x / step) * step


def plan_longest(model: ModelConfig, gpu_mem: int, batch: int = 1, lora: LoRASpec = LoRASpec(),
                 methods: tuple[str, ...] = ("lora",), precisions: tuple[str, ...] = ("bf16",),
                 checkpointing: tuple[str, ...] = ("all",), quantize: tuple[str, ...] = ("none",),
                 offload: tuple[str, ...] = ("none",), losses: tuple[str, ...] = ("full-logits",),
                 optimizer: str = "adamw", device: str = "cuda", step: int = 128,
                 cap: int = 1 << 20, compiled: bool = False, host_mem: int | None = None) -> list[LongestFit]:
    """:func:`longest_seq_len` of every configuration, longest first (quantized bases with LoRA only)."""
    rows = []
    for method, quant, prec, gc, off, loss in itertools.product(methods, quantize, precisions, checkpointing,
                                                                offload, losses):
        if quant != "none" and method != "lora":
            continue
        spec = lora if method == "lora" else dataclasses.replace(lora, rank=0)
        s = Setup(model, seq_len=step, batch=batch, grad_accum=1, grad_checkpoint=gc, precision=prec, lora=spec,
                  optimizer=optimizer, device=device, quantize=quant, offload=off, loss=loss, compiled=compiled)
        rows.append(longest_seq_len(s, gpu_mem, step, cap, host_mem))
    rows.sort(key=lambda r: -(r.seq_len or 0))
    return rows


def _host_limit(host_mem: int | None) -> str:
    return "" if host_mem is None else f", pinned host memory {fmt_gib(host_mem)} GiB"


def format_longest(rows: list[LongestFit], gpu_mem: int, step: int = 128, host_mem: int | None = None) -> str:
    """The ``solotune plan --max-seq-len`` table."""
    if not rows:
        return "(no configuration)"
    s0 = rows[0].setup
    host = any(r.prediction.host_bytes for r in rows)  # pinned host RAM can be the limit of offloaded rows
    lines = [f"{s0.model.name}: {s0.model.n_layers} layers, micro-batch {s0.batch}; GPU memory {fmt_gib(gpu_mem)} GiB"
             f"{_host_limit(host_mem)}. "
             "Longest sequence that trains (planner), sizes in GiB.\n",
             "| # | method | precision | checkpointing | longest seq_len | peak there | params | activations | "
             "transients | " + "host (pinned) | " * host + "first over |", "|---:|---|---|---|" + "---:|" * (6 + host)]
    for i, r in enumerate(rows, 1):
        p, s = r.prediction, r.setup
        longest = "does not fit" if r.seq_len is None else f"{r.seq_len:,}"
        over = "–" if r.first_over is None else f"{r.first_over:,}"
        lines.append(f"| {i} | {s.label} | {s.precision} | {s.grad_checkpoint} | {longest} | {fmt_gib(p.peak)} | "
                     f"{fmt_gib(p.params_total)} | {fmt_gib(p.activations)} | {fmt_gib(p.transient_fb)} | "
                     + (f"{fmt_gib(p.host_bytes)} | " if host else "") + f"{over} |")
    lines.append(f"\nA bracket over seq_len narrowed to {step} tokens, each probe where the line through two dry runs "
                 "meets the limit (the peak grows about linearly with it); "
                 "`first over`: the shortest length probed that does not fit (– : the cap fits). "
                 "The peak is PyTorch's allocated bytes: the CUDA context and the caching allocator's slack come "
                 "on top, so leave a margin at the edge (run with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: "
                 "without it, rows this long fragment the allocator's memory).")
    lines.extend(_notes_lines([r.prediction for r in rows]))
    return "\n".join(lines)


def _notes_lines(predictions: list[Prediction]) -> list[str]:
    """The dry runs' notes (what they could not model as asked), each once."""
    notes = list(dict.fromkeys(n for p in predictions for n in p.notes))
    return ["\nNotes:"] + [f"- {n}" for n in notes] if notes else []


def format_plan(rows: list[tuple[Prediction, float, bool]], gpu_mem: int, show_all: bool = False,
                host_mem: int | None = None) -> str:
    """The ``solotune plan`` table (GiB)."""
    fit = [r for r in rows if r[2]]
    best = min((c for _, c, _ in rows), default=1.0)
    host = any(p.host_bytes for p, _, _ in rows)  # a host column only when something is offloaded
    head = ("| # | method | precision | checkpointing | peak | params | grads | optimizer | activations | "
            "weight copies | transients | " + "host (pinned) | " * host + "rel. time |\n"
            "|---:|---|---|---|" + "---:|" * (8 + host))
    lines = []

    def row(i: int, p: Prediction, cost: float) -> str:
        s = p.setup
        return (f"| {i} | {s.label} | {s.precision} | {s.grad_checkpoint} | {fmt_gib(p.peak)} | "
                f"{fmt_gib(p.params_total)} | {fmt_gib(p.grads)} | {fmt_gib(p.optimizer)} | {fmt_gib(p.activations)} | "
                f"{fmt_gib(p.weight_copies)} | {fmt_gib(p.peak - p.params_total - p.grads - p.optimizer - p.activations - p.weight_copies)} | "
                + (f"{fmt_gib(p.host_bytes)} | " if host else "") + f"{cost / best:.2f} |")

    if rows:
        s = rows[0][0].setup
        lines.append(f"{s.model.name}: {s.model.n_layers} layers, seq_len {s.seq_len}, micro-batch {s.batch}, "
                     f"gradient accumulation {s.grad_accum}; GPU memory {fmt_gib(gpu_mem)} GiB{_host_limit(host_mem)}. "
                     "Sizes in GiB."
                     + (" Compiled blocks and loss." if s.compiled else ""))
        if any(p.setup.optimizer_in_backward for p, _, _ in rows) and s.grad_accum > 1:
            lines.append(f"+in-backward rows need grad_accum 1: planned as micro-batches of {s.batch * s.grad_accum} "
                         f"rows (the same examples per optimizer step); their grads: one tensor's at a time.")
    lines.append(f"\nFits ({len(fit)} of {len(rows)}), fastest first:\n")
    if fit:
        lines.append(head)
        lines.extend(row(i + 1, p, c) for i, (p, c, _) in enumerate(fit))
    else:
        lines.append("(nothing fits)")
    rest = [r for r in rows if not r[2]]
    if rest and show_all:
        lines.append(f"\nDoes not fit ({len(rest)}):\n")
        lines.append(head)
        lines.extend(row(i + 1, p, c) for i, (p, c, _) in enumerate(rest))
    elif rest:
        lines.append(f"\n{len(rest)} more configurations do not fit (--all lists them).")
    if host:
        lines.append("\nWith +offload, activations are what stays on the GPU (+offload(optimizer): the optimizer state "
                     "too, and it is 0 there); host (pinned): the copies in host memory.")
    lines.extend(_notes_lines([p for p, _, _ in rows]))
    lines.append("\nrel. time: model FLOPs + recomputation over a per-precision speed factor "
                 f"({', '.join(f'{k} {v:g}x' for k, v in PRECISION_SPEED.items())}; an fp8 base's GEMMs 2x more); "
                 "a ranking, not a measurement.")
    return "\n".join(lines)
