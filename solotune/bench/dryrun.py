"""Dry run of one training micro-batch on fake tensors: what the planner measures instead of a replica.

The real model (:class:`solotune.model.Transformer`), set up as the training loop sets it up (weights
in the precision policy's dtype, :func:`solotune.peft.apply_lora` with the policy's adapter dtype,
the checkpointing policy, train mode), runs one forward and the loop's loss on
``FakeTensorMode`` tensors: real shapes, dtypes, views and storages, but no data and no memory (a
3-block 7B forward takes a few tenths of a second of CPU). Every tensor autograd packs for backward goes through the measured
anatomy's own :class:`~solotune.bench.anatomy.SavedTensorLedger` (by storage; activations vs
autocast's weight copies; parameters excluded), so the planner counts exactly what the anatomy
measures, from the code that trains: a new technique in the model, LoRA or the loss is predicted
as soon as it exists, with no second model to keep in step.

The fake tensors are CPU tensors (a CPU-only torch cannot fake CUDA ones: CUDA autocast and
autograd need the CUDA runtime), so autocast runs as CPU autocast, which casts this model's ops
(linear, SDPA) as CUDA autocast does. Two kernels differ on CUDA; for a ``device="cuda"`` dry run
they are swapped in (:class:`_CudaKernels`), everything else is the CPU code path:

* dropout: CUDA's fused kernel (``native_dropout``) keeps a bool mask; the CPU path multiplies by a
  noise tensor in the input's dtype.
* attention: CUDA (sm80+, no cuDNN attention: the loop's choice) runs flash attention in 16 bits,
  which also keeps its RNG state on the GPU (24 bytes), and the memory-efficient kernel in fp32
  (flash has no fp32), whose log-sum-exp rows are padded to 32 and whose RNG seed/offset live on
  the host (not counted, as the anatomy does not count host tensors). Both are called as aten ops
  on the fake tensors, so their saved tensors come from PyTorch's own meta kernels. Head dims that
  are not multiples of 8 are padded for flash, as CUDA's SDPA does (its padded copies are saved).

Quantized bases (QLoRA, ``quantize="nf4"|"int8"|"fp8"``): the block linears are swapped for the real
:class:`~solotune.quant.linear.NF4Linear` / ``Int8Linear`` / ``Fp8Linear`` before LoRA wraps them, as ``api.load``
does, and their buffers are faked like the parameters; their forward and backward (the PyTorch
dequantization path, CPU tensors) run on fake tensors as they are. The only real tensors they
touch are NF4's constant tables (levels, dynamic map), which the fake mode is allowed to convert.
Their custom autograd Function saves nothing of [out, in] size, so the ledger sees what it sees on
the GPU; the dequantized weight is a transient the planner adds (:func:`quantized`). The fp8 base
dequantizes nothing (its GEMMs take the codes); its per-row quantized activations are transients
of one matmul, as a 16-bit linear's output is, and are not modelled.

Compiled blocks (``compiled_blocks``: the loop's ``Transformer.compile_blocks``, Inductor): a block
that is not checkpointed saves what Inductor's min-cut partitioner keeps, not what eager autograd
keeps (it recomputes the pointwise work, keeps the matmul and attention outputs, no fp32 copies of
the normed inputs). The dry run learns that from the real block: :func:`_block_graph` traces it
(parameters and buffers as graph inputs, as dynamo lifts them) through AOTAutograd with Inductor's
decompositions, joint-graph passes and partitioner (``torch._inductor.compile_fx.partition_fn``)
on fake tensors of the dry run's shapes, under the same autocast and CUDA kernels, and the block
then runs that forward graph, saving exactly the partitioner's saved values through
``ctx.save_for_backward`` (:class:`_AsCompiledBlockFn`), where the ledger sees them by storage as
it sees Inductor's. One graph per input signature (the parameters are its inputs), cached across
dry runs; a block it cannot trace runs eager and the dry run says so (``DryRun.notes``). Checked
byte for byte against compiled training steps on CPU (tests/bench/test_plan_compiled.py) and against
the committed 7B H200 cells (tests/bench/test_plan_vs_measured.py). A checkpointed compiled block
keeps its inputs, as the eager one.

Activation offload: :class:`~solotune.train.offload.ActivationOffload` cannot run here (it moves
plain ``torch.Tensor`` storages only, and every tensor here is a ``FakeTensor``), so the dry run
records, per storage, what it would move: activations (not weight copies; parameters and buffers
are never counted) of at least its ``min_bytes`` (:attr:`Saved.offloadable`, and the largest one).

Shapes: B batch, T tokens per row, V vocab.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import operator
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ..config import ModelConfig
from ..kernels import apply_kernels
from ..model import Transformer
from ..peft import LoRALinear, LoRASpec, apply_lora
from ..data import IGNORE_INDEX
from ..train.loss import get_loss, logits_rows, shifted_targets
from ..quant.load import quantized_modules, swap_in_quantized  # at import: building its tables needs real tensors
from ..train.config import QUANTIZE
from ..train.offload import ActivationOffload
from ..train.precision import PrecisionPolicy
from .anatomy import SavedTensorLedger, autocast_cached

# The part of the model a saved tensor belongs to, by the block child it was saved in.
_BLOCK_PARTS = {"attention": "attention", "feed_forward": "mlp", "attention_norm": "norm", "ffn_norm": "norm"}

# ActivationOffload's defaults, read from it so the prediction follows the code: storages below
# min_bytes stay on the device; max_in_flight device-to-host copies may be pending at once.
_OFFLOAD_DEFAULTS = inspect.signature(ActivationOffload.__init__).parameters
OFFLOAD_MIN_BYTES: int = _OFFLOAD_DEFAULTS["min_bytes"].default
OFFLOAD_MAX_IN_FLIGHT: int = _OFFLOAD_DEFAULTS["max_in_flight"].default
QUANTIZE_KINDS = QUANTIZE  # one source: solotune.train.config


# ============================================================================ the model set-up
def training_model(cfg: ModelConfig, policy: PrecisionPolicy, lora: LoRASpec, quantize: str = "none") -> Transformer:
    """``cfg``'s model as the training loop prepares it: every weight in the policy's dtype, the
    block linears swapped for frozen quantized ones (``quantize`` "nf4" | "int8" | "fp8", LoRA only; compute
    dtype the policy's ``param_dtype``, as ``api.load``), then either LoRA adapters (in the policy's
    adapter dtype; everything else frozen) or every weight trainable; train mode. Built on whatever
    device/mode is current (meta, fake)."""
    model = Transformer(cfg).to(policy.param_dtype)
    if quantize != "none":
        if not lora.enabled:
            raise ValueError(f"quantize {quantize!r} needs LoRA: a quantized base cannot be trained")
        swap_in_quantized(model, quantize, compute_dtype=policy.param_dtype)
    if lora.enabled:
        apply_lora(model, lora.targets, lora.rank, lora.alpha, lora.dropout, lora_dtype=policy.adapter_dtype)
    else:
        model.requires_grad_(True)
    return model.train()


class _AsCompiledCrossEntropy(torch.autograd.Function):
    """The dry run's stand-in for Inductor's compiled full-logits loss (``get_loss(compiled=True)``):
    the same sum, saving what that graph keeps for backward — the 16-bit logits [N, V] and the
    per-token logsumexp [N] (fp32) with the targets — where eager keeps the fp32 log-softmax. Its
    backward rewrites the logits' buffer as d logits, so no other [N, V] tensor appears (loss alone,
    7B head, 4096 tokens: 250 MiB peak compiled vs 1,468 eager, results/frontier2-h200/run1/kernels/)."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lse = torch.logsumexp(logits.float(), dim=-1)
        valid = targets != IGNORE_INDEX
        picked = logits.float().gather(1, torch.where(valid, targets, 0)[:, None])[:, 0]
        ctx.save_for_backward(logits, lse, targets)
        return torch.where(valid, lse - picked, 0).sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, lse, targets = ctx.saved_tensors
        return (logits.float() - lse[:, None]).exp().mul(grad).to(logits.dtype), None


def as_compiled_full_logits(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """``full_logits_loss`` as a compiled run holds it (see :class:`_AsCompiledCrossEntropy`)."""
    logits = head(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        return _AsCompiledCrossEntropy.apply(logits.flatten(0, 1), shifted_targets(labels).flatten())


def forward_loss(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, policy: PrecisionPolicy,
                 device_type: str, loss: str = "full-logits", compiled_loss: bool = False) -> torch.Tensor:
    """One micro-batch as the training loop runs it up to ``backward()``: the forward under the
    policy's autocast with the loss ``loss`` (``solotune.train.loss.LOSSES``) owning the head —
    with ``compiled_loss``, the memory model of its compiled form — normalised and scaled by the
    policy's loss scaler. tokens, labels [B, T] -> the tensor backward starts from."""
    loss_fn = as_compiled_full_logits if compiled_loss else get_loss(loss)
    with policy.autocast(device_type):
        total = model(tokens, head=functools.partial(loss_fn, labels=labels))  # fp32 sum over targets
    n_targets = max(labels.numel(), 1)  # a Python number, as in the loop: the division saves nothing
    return policy.make_scaler(device_type).scale(total / n_targets)


# ============================================================================== the result
@dataclass(frozen=True)
class Saved:
    """Bytes saved for backward: activations (also by the part of the model that saved them) and
    autocast's weight copies."""

    activations: int = 0
    weight_copies: int = 0
    by_part: tuple[tuple[str, int], ...] = ()  # (part, activation bytes), sorted by part
    offloadable: int = 0  # activation bytes in storages >= OFFLOAD_MIN_BYTES (what ActivationOffload moves)
    largest_offloadable: int = 0  # the largest such storage

    def __add__(self, other: "Saved") -> "Saved":
        parts = dict(self.by_part)
        for k, v in other.by_part:
            parts[k] = parts.get(k, 0) + v
        return Saved(self.activations + other.activations, self.weight_copies + other.weight_copies,
                     tuple(sorted(parts.items())), self.offloadable + other.offloadable,
                     max(self.largest_offloadable, other.largest_offloadable))

    def __mul__(self, k: int) -> "Saved":
        return Saved(k * self.activations, k * self.weight_copies, tuple((p, k * v) for p, v in self.by_part if k),
                     k * self.offloadable, self.largest_offloadable if k else 0)

    @property
    def total(self) -> int:
        return self.activations + self.weight_copies


@dataclass(frozen=True)
class DryRun:
    """What one forward + loss saves for backward, split by who saved it.

    Every saved storage belongs to exactly one of: ``outside`` (no block: embedding, head, loss),
    ``blocks[i]`` (saved by block i alone; a checkpointed block's inputs, which ``checkpoint()``
    saves just before running it, count as the block's), ``shared`` (saved by several blocks: the
    RoPE angles; part "shared"). ``standalone[i]``: everything block i saves, shared storages included, which is
    what its recomputation saves when it is checkpointed (meaningful for blocks that are not).
    ``inputs[i]``: block i's tensor inputs, less the shared storages: what ``checkpoint()`` keeps of
    it (recorded whether or not it is checkpointed).
    """

    outside: Saved
    shared: Saved
    blocks: tuple[Saved, ...]
    standalone: tuple[int, ...]
    inputs: tuple[Saved, ...]  # per block: its tensor inputs that no other block saves (what checkpoint() keeps)
    # The loss's logits transients, for the rows it holds at once (``loss.logits_rows``: all B*T
    # tokens for full-logits, one chunk for the chunked losses; for fused-linear-ce, whose gradient
    # pass runs inside its forward chunk by chunk, the same one-chunk sizes are an upper bound).
    logits: int  # the logits [rows, V] in the head's compute dtype
    logits_fp32: int  # the loss's fp32 copy of the logits (0 when they are fp32 already)
    loss_grads: int  # d(log_softmax) and d(logits), [rows, V] each, in the loss's dtype
    head_grad: int  # the output head's weight gradient (0 when it is frozen)
    notes: tuple[str, ...] = ()  # what the dry run could not model as asked (e.g. a block it could not trace)

    @property
    def saved(self) -> Saved:
        total = self.outside + self.shared
        for b in self.blocks:
            total = total + b
        return total


# ====================================================================== CUDA's kernels on CPU
class _CudaKernels(TorchFunctionMode):
    """Swap in the kernels CUDA runs where their saved tensors differ from the CPU ones (see the
    module docstring). ``forget``: called with the tensors that live on the host on CUDA."""

    def __init__(self, forget: Callable[[torch.Tensor], None]) -> None:
        super().__init__()
        self.forget = forget

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.dropout:
            return self._dropout(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            return self._sdpa(*args, **kwargs)
        return func(*args, **kwargs)

    @staticmethod
    def _dropout(x: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
        # at::dropout on a CUDA tensor: the fused kernel whenever 0 < p < 1
        if training and 0.0 < p < 1.0 and not inplace and x.numel() > 0:
            return torch.native_dropout(x, p, True)[0]
        return F.dropout(x, p, training, inplace)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, is_causal: bool = False, **rest: Any) -> torch.Tensor:
        if attn_mask is not None or dropout_p or rest:
            return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, **rest)
        dev = q.device.type
        if torch.is_autocast_enabled(dev):  # autocast casts SDPA's inputs (we call the kernels directly)
            q, k, v = (t.to(torch.get_autocast_dtype(dev)) for t in (q, k, v))
        if q.dtype in (torch.float16, torch.bfloat16):
            # flash attention; its RNG state (uint64 seed [2] + offset) is a device tensor, kept for
            # backward (the int64 seed/offset scalars of older torch versions live on the host)
            head_dim = q.shape[-1]
            if head_dim % 8:  # as CUDA's SDPA does: pad to a multiple of 8 (the padded copies are saved)
                pad = -head_dim % 8
                q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
            out, _, _, _, _, _, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
                q, k, v, 0.0, is_causal, False, scale=head_dim ** -0.5)
            if seed.dtype != torch.uint64:
                self.forget(seed)
                self.forget(offset)
            return out[..., :head_dim]
        # fp32: the memory-efficient kernel; its seed/offset scalars live on the host
        lse = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        out, _, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, lse, 0.0, is_causal)
        self.forget(seed)
        self.forget(offset)
        return out


# ================================================================= compiled blocks (Inductor)
# The attention ops whose RNG seed/offset outputs (at these indices) CUDA keeps on the host when they
# are not uint64 device tensors (see _CudaKernels): not counted, as the anatomy does not count them.
_HOST_RNG_OUTPUTS = {"_scaled_dot_product_flash_attention": (6, 7), "_scaled_dot_product_efficient_attention": (2, 3)}


@dataclass(frozen=True)
class _BlockGraph:
    """A block's forward as the min-cut partitioner leaves it: ``forward(*params, x, cos, sin)`` ->
    (block output, *saved for backward); ``host``: the saved positions that live on the host on CUDA."""

    forward: torch.fx.GraphModule
    host: tuple[int, ...]


class _AsCompiledBlockFn(torch.autograd.Function):
    """Runs a :class:`_BlockGraph` and saves exactly the partitioner's saved values for backward
    (as Inductor's compiled function does: ``ctx.save_for_backward``, so the anatomy's pack hook
    sees them, by storage). The dry run never runs backward."""

    @staticmethod
    def forward(ctx: Any, graph: _BlockGraph, forget: Callable[[torch.Tensor], None], *flat: torch.Tensor) -> torch.Tensor:
        out, *saved = graph.forward(*flat)
        ctx.save_for_backward(*(t for t in saved if isinstance(t, torch.Tensor)))
        for i in graph.host:
            forget(saved[i])
        return out

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise RuntimeError("a dry run has no backward")


def _signature(flat: list[torch.Tensor]) -> tuple:
    """What a traced graph is specialised on: every input's shape, strides, dtype and requires_grad,
    and the autocast state it was traced under."""
    dev = "cpu"
    amp = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
    return amp, tuple((tuple(t.shape), t.stride(), t.dtype, t.requires_grad) for t in flat)


def _trace_block(layer: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> _BlockGraph:
    """Trace ``layer`` (eager forward, as torch.compile sees it: parameters as graph inputs)
    through AOTAutograd with Inductor's decompositions, joint-graph passes and min-cut partitioner
    (``torch._inductor.compile_fx.partition_fn``) on these fake inputs; keep the forward graph."""
    from torch._functorch.aot_autograd import aot_function
    from torch._inductor.compile_fx import partition_fn
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.virtualized import V
    from torch.nn.utils.stateless import _reparametrize_module

    names = list(params)
    kept: dict[str, Any] = {}

    def partition(joint: torch.fx.GraphModule, inputs: Any, **kw: Any) -> Any:
        # parameters and buffers are static inputs, as dynamo marks them: saving them costs nothing
        kw["static_lifetime_input_indices"] = list(range(len(names)))
        return partition_fn(joint, inputs, **kw)

    def fw_compiler(gm: torch.fx.GraphModule, example_inputs: Any) -> torch.fx.GraphModule:
        kept["fw"] = gm
        return gm

    def block(flat_params: list[torch.Tensor], x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        with _reparametrize_module(layer, dict(zip(names, flat_params))):
            return layer._forward(x, cos, sin, None, None)

    fn = aot_function(block, fw_compiler, lambda gm, _: gm, partition_fn=partition,
                      decompositions=select_decomp_table(), num_params_buffers=len(names))
    # Inductor's joint-graph passes read the fake mode from its virtualized state (compile_fx sets
    # it); an inner pair of no-op hooks: nothing the tracing packs reaches the ledger
    with V.set_fake_mode(x.fake_mode), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        fn(list(params.values()), x, cos, sin)
    gm = kept["fw"]
    return _BlockGraph(gm, _host_outputs(gm))


def _host_outputs(gm: torch.fx.GraphModule) -> tuple[int, ...]:
    """Positions (among the saved values) of attention RNG seeds/offsets that CUDA keeps on the host."""
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0][1:]
    host = []
    for i, n in enumerate(out):
        if isinstance(n, torch.fx.Node) and n.target is operator.getitem and isinstance(n.args[0], torch.fx.Node):
            src, idx = n.args[0].target, n.args[1]
            name = getattr(getattr(src, "overloadpacket", None), "__name__", "")
            val = n.meta.get("val")
            if idx in _HOST_RNG_OUTPUTS.get(name, ()) and isinstance(val, torch.Tensor) and val.dtype != torch.uint64:
                host.append(i)
    return tuple(host)


@functools.lru_cache(maxsize=64)  # a pure function of its arguments: plans ask for the same block again and again
def _block_graph(cfg: ModelConfig, policy: PrecisionPolicy, lora: LoRASpec, quantize: str, kernels: str, device: str,
                 names: tuple[str, ...], signature: tuple) -> _BlockGraph | str:
    """The traced graph of ``cfg``'s block for inputs of this :func:`_signature` (the block's
    parameters and buffers ``names``, then x, cos, sin), on a block of its own (built as
    :func:`dry_run` builds the model, in a fake mode of its own: the graph holds no tensors, so any
    dry run can run it); the error, as text, when it cannot be traced."""
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

    (amp, amp_dtype), metas = signature
    try:  # outside the asking dry run's fake mode: the meta model is built as dry_run builds it
        with unset_fake_temporarily(), torch.device("meta"):
            model = training_model(cfg.replace(n_layers=1), policy, lora, quantize)
        if device == "cuda":
            apply_kernels(model, kernels, available=lambda *tensors: True)
        with unset_fake_temporarily(), FakeTensorMode(allow_non_fake_inputs=quantize != "none"):
            _fake_parameters(model)
            layer = model.layers[0]
            params = {**dict(layer.named_parameters()), **dict(layer.named_buffers())}
            if tuple(params) != names:
                raise RuntimeError(f"block parameters {tuple(params)} differ from the dry run's {names}")
            x, cos, sin = (torch.empty_strided(shape, stride, dtype=dtype).requires_grad_(grad)
                           for shape, stride, dtype, grad in metas[len(names):])
            forget_nothing = lambda t: None  # noqa: E731 - host tensors are found in the graph (_host_outputs)
            with _kernels(device, forget_nothing), torch.autocast("cpu", dtype=amp_dtype, enabled=amp):
                return _trace_block(layer, params, x, cos, sin)
    except Exception as e:  # noqa: BLE001 - any tracing failure: the dry run models the eager block
        msg = str(e).splitlines()[0][:160] if str(e) else ""
        return f"{type(e).__name__}: {msg}"


class _AsCompiledBlock:
    """A block's forward in a compiled run without checkpointing: the traced graph of its input
    signature (:func:`_block_graph`: the parameters are graph inputs, so one graph serves every block
    of that signature) run under :class:`_AsCompiledBlockFn`. What it cannot trace runs the eager
    block, and says so in ``notes``."""

    def __init__(self, layer: nn.Module, graph_for: Callable[[tuple[str, ...], tuple], _BlockGraph | str],
                 forget: Callable[[torch.Tensor], None], notes: list[str]) -> None:
        self.layer, self.graph_for, self.forget, self.notes = layer, graph_for, forget, notes
        self.eager = layer.forward

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Any = None,
                 cache_pos: Any = None) -> torch.Tensor:
        if mask is not None or cache_pos is not None or not torch.is_grad_enabled():
            return self.eager(x, cos, sin, mask, cache_pos)
        # buffers too (a quantized base's codes and scales): graph inputs, as dynamo lifts them
        params = {**dict(self.layer.named_parameters()), **dict(self.layer.named_buffers())}
        flat = [*params.values(), x, cos, sin]
        graph = self.graph_for(tuple(params), _signature(flat))
        if isinstance(graph, str):
            self.notes.append(f"compiled block not traced ({graph}); modelled as the eager block (an upper bound)")
            return self.eager(x, cos, sin, mask, cache_pos)
        try:
            with torch.autocast("cpu", enabled=False):  # the graph holds autocast's casts already
                return _AsCompiledBlockFn.apply(graph, self.forget, *flat)
        except Exception as e:  # noqa: BLE001 - a graph that does not run here: the eager block (nothing was saved)
            self.notes.append(f"compiled block graph did not run ({type(e).__name__}); modelled as the eager block")
            return self.eager(x, cos, sin, mask, cache_pos)


# ============================================================================= the dry run
@dataclass
class _Storage:
    nbytes: int
    copy: bool  # an autocast weight copy (else an activation)
    part: str  # where it was first saved
    blocks: set[int]  # the blocks that saved it


class _Recorder:
    """The pack hook: the anatomy's ledger decides what counts; this notes which part of the
    model, and which block, saved each storage (module hooks keep the stack of running modules)."""

    def __init__(self, model: Transformer) -> None:
        self.ledger = SavedTensorLedger(model)
        self.storages: dict[int, _Storage] = {}
        self.n_blocks = len(model.layers)
        self.stack: list[tuple[str, nn.Module]] = []  # modules whose forward is running
        self.pending: list[int] = []  # saved by the model itself: checkpoint inputs of the next block
        self.inputs: list[dict[int, int]] = [{} for _ in model.layers]  # per block: its tensor inputs' storages
        self.hooks = []
        for name, m in model.named_modules():
            self.hooks.append(m.register_forward_pre_hook(functools.partial(self._enter, name)))
            self.hooks.append(m.register_forward_hook(self._leave))

    def _enter(self, name: str, module: nn.Module, args: Any) -> None:
        self.stack.append((name, module))
        top = name.split(".")
        if len(top) == 2 and top[0] == "layers":
            i = int(top[1])
            for key in self.pending:  # what checkpoint() saved just before running this block
                self.storages[key].blocks.add(i)
                self.storages[key].part = "checkpoint inputs"
            self.pending.clear()
            for t in args:
                c = self.ledger.classify(t) if isinstance(t, torch.Tensor) else None
                if c is not None:
                    self.inputs[i][c[0]] = c[1]

    def _leave(self, module: nn.Module, args: Any, out: Any) -> None:
        self.stack.pop()

    def close(self) -> None:
        for h in self.hooks:
            h.remove()

    def where(self) -> tuple[str, int | None]:
        """(part, block index) of the module now running; block -1: the model itself (a block's
        checkpoint inputs when a block runs next, else the head and loss)."""
        if not self.stack:
            return "head+loss", None  # the loss and the loss scaler, outside the model
        name = self.stack[-1][0]
        if name == "":
            return "head+loss", -1
        top = name.split(".")
        if top[0] != "layers":
            return ("embedding" if top[0] == "tok_embeddings" else "head+loss"), None
        lora = [n for n, m in self.stack if isinstance(m, LoRALinear)]
        if lora and not name.startswith(lora[-1] + ".base"):
            return "lora", int(top[1])
        return (_BLOCK_PARTS.get(top[2], top[2]) if len(top) > 2 else "block"), int(top[1])

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        c = self.ledger.add(t)
        if c is not None:
            key, n, copy = c
            part, block = self.where()
            st = self.storages.setdefault(key, _Storage(n, copy, part, set()))
            if block == -1:
                self.pending.append(key)
            elif block is not None:
                st.blocks.add(block)
        return t

    def forget(self, t: torch.Tensor) -> None:
        key = t.untyped_storage()._cdata
        self.ledger.saved.pop(key, None)
        self.storages.pop(key, None)

    def result(self) -> tuple[Saved, Saved, tuple[Saved, ...], tuple[int, ...], tuple[Saved, ...]]:
        """(outside, shared, per block, standalone per block, inputs per block)."""
        def saved(group: list[_Storage]) -> Saved:
            parts: dict[str, int] = {}
            for st in group:
                if not st.copy:
                    parts[st.part] = parts.get(st.part, 0) + st.nbytes
            big = [st.nbytes for st in group if not st.copy and st.nbytes >= OFFLOAD_MIN_BYTES]
            return Saved(sum(st.nbytes for st in group if not st.copy), sum(st.nbytes for st in group if st.copy),
                         tuple(sorted(parts.items())), sum(big), max(big, default=0))

        assert sum(st.nbytes for st in self.storages.values()) == self.ledger.activations + self.ledger.weight_copies
        every = list(self.storages.values())
        outside = saved([st for st in every if not st.blocks])
        shared = saved([dataclasses.replace(st, part="shared") for st in every if len(st.blocks) > 1])
        blocks = tuple(saved([st for st in every if st.blocks == {i}]) for i in range(self.n_blocks))
        standalone = tuple(sum(st.nbytes for st in every if i in st.blocks) for i in range(self.n_blocks))
        shared_keys = {key for key, st in self.storages.items() if len(st.blocks) > 1}

        def kept(ins: dict[int, int]) -> Saved:  # what checkpoint() keeps of a block: its unshared inputs
            sizes = [v for key, v in ins.items() if key not in shared_keys]
            big = [v for v in sizes if v >= OFFLOAD_MIN_BYTES]
            n = sum(sizes)
            return Saved(n, 0, (("checkpoint inputs", n),) if n else (), sum(big), max(big, default=0))

        return outside, shared, blocks, standalone, tuple(kept(ins) for ins in self.inputs)


@functools.lru_cache(maxsize=512)  # a pure function of its (hashable) arguments; plan() asks again and again
def dry_run(cfg: ModelConfig, policy: PrecisionPolicy, lora: LoRASpec, checkpointed: frozenset[int], batch: int, seq_len: int,
            device: str, quantize: str = "none", loss: str = "full-logits", kernels: str = "off",
            compiled_loss: bool = False, compiled_blocks: bool = False) -> DryRun:
    """One forward + loss of ``cfg`` (at its own depth; blocks ``checkpointed`` recomputed in
    backward) on fake tensors, as the training loop runs it on ``device`` ("cuda" | "cpu"), under
    the anatomy's saved-tensor hooks. ``compiled_blocks``: the blocks that are not checkpointed
    save what Inductor's partitioner keeps (:class:`_AsCompiledBlock`); a checkpointed compiled
    block keeps its inputs, as the eager one."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.device("meta"):  # build, cast and wrap on meta: nothing is allocated or initialised
        model = training_model(cfg, policy, lora, quantize)
    model.checkpoint_blocks(checkpointed)  # any set of blocks, not only the named policies
    if device == "cuda":  # the fused kernels run on CUDA only: their ops' fake implementations run here
        apply_kernels(model, kernels, available=lambda *tensors: True)
    # NF4's dequantization indexes real constant tables (module-level levels and dynamic map):
    # let the fake mode convert those; nothing else in the model is a real tensor.
    with FakeTensorMode(allow_non_fake_inputs=quantize != "none"):
        _fake_parameters(model)
        rec = _Recorder(model)
        notes: list[str] = []
        if compiled_blocks:
            graph_for = functools.partial(_block_graph, cfg, policy, lora, quantize, kernels, device)
            for i, layer in enumerate(model.layers):
                if i not in checkpointed:
                    layer.forward = _AsCompiledBlock(layer, graph_for, rec.forget, notes)
        tokens = torch.zeros(batch, seq_len, dtype=torch.long)
        labels = torch.zeros(batch, seq_len, dtype=torch.long)
        with _kernels(device, rec.forget), torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t):
            _check_autocast(policy)
            forward_loss(model, tokens, labels, policy, "cpu", loss, compiled_loss)
        rec.close()
        head = model.output.weight
        head_dtype = policy.autocast_dtype or head.dtype  # the head matmul's output (autocast's, else the weight's)
        loss_dtype = torch.promote_types(head_dtype, torch.float32)  # the losses work in fp32 (fp64 stays)
        n_logits = logits_rows(loss, batch * seq_len) * cfg.vocab_size
        outside, shared, blocks, standalone, inputs = rec.result()
        if compiled_loss:  # the logits are saved (counted above) and become d logits in place: no transients
            return DryRun(outside, shared, blocks, standalone, inputs, logits=0, logits_fp32=0, loss_grads=0,
                          head_grad=head.numel() * head.element_size() if head.requires_grad else 0,
                          notes=tuple(dict.fromkeys(notes)))
        return DryRun(outside, shared, blocks, standalone, inputs, logits=n_logits * head_dtype.itemsize,
                      logits_fp32=n_logits * loss_dtype.itemsize if loss_dtype != head_dtype else 0,
                      # fused linear-CE makes its gradients in the forward (saved: in the ledger)
                      loss_grads=0 if loss == "fused-linear-ce" else 2 * n_logits * loss_dtype.itemsize,
                      head_grad=head.numel() * head.element_size() if head.requires_grad else 0,
                      notes=tuple(dict.fromkeys(notes)))


def _check_autocast(policy: PrecisionPolicy) -> None:
    if policy.autocast_dtype is not None:
        with policy.autocast("cpu"):
            if not torch.is_autocast_enabled("cpu"):
                raise RuntimeError(f"this torch has no CPU autocast for {policy.autocast_dtype}: cannot plan {policy.name}")


def _fake_parameters(model: Transformer) -> None:
    """Replace every meta parameter by a fresh fake CPU one of the same shape, dtype and
    requires_grad (``to_empty`` without converting each meta tensor; tied weights stay tied), and
    every buffer (the quantized linears' codes and scales) by a fake CPU one."""
    fresh: dict[int, nn.Parameter] = {}
    for m in model.modules():
        for name, p in m._parameters.items():
            if p is not None:
                if id(p) not in fresh:
                    fresh[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
                m._parameters[name] = fresh[id(p)]
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = torch.empty(b.shape, dtype=b.dtype)


def _kernels(device: str, forget: Callable[[torch.Tensor], None]) -> Any:
    return _CudaKernels(forget) if device == "cuda" else contextlib.nullcontext()


# ================================================================= a block's backward, traced
class _LiveBytes(TorchDispatchMode):
    """The bytes of every storage made under it that is still referenced, and their peak: each op's
    outputs are counted once per storage and dropped when the last tensor object viewing it dies
    (tensor objects live as long as the C++ tensor: autograd's saved and in-flight tensors included).
    Views of storages made before (weights, inputs) are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.live = self.peak = 0

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key not in self.refs:
            self.refs[key], self.sizes[key] = 0, st.nbytes()
            self.live += self.sizes[key]
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        weakref.finalize(t, self._drop, key)

    def _drop(self, key: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage()._cdata
                if key in self.refs or key not in inputs:  # a view of a storage made outside is not ours
                    self._track(t)
        return out


@functools.lru_cache(maxsize=128)
def block_backward(cfg: ModelConfig, policy: PrecisionPolicy, lora: LoRASpec, checkpointed: bool, batch: int,
                   seq_len: int, device: str, quantize: str = "none", kernels: str = "off") -> int:
    """Bytes one eager block's backward holds at its peak beyond what it and the other blocks saved
    for it: the incoming gradient [B, T, C], the gradients and temporaries of its ops as autograd
    makes and frees them, and (``checkpointed``) its recomputed saved tensors as backward consumes
    them — the phase traced as a whole on fake tensors (:class:`_LiveBytes`), not summed.

    A block whose input needs a gradient (every block but an untrained embedding's first), on its
    own: the peak of (recompute +) backward minus what was live once its forward returned."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..model import rope_cos_sin

    with torch.device("meta"):
        model = training_model(cfg.replace(n_layers=1), policy, lora, quantize)
    if device == "cuda":
        apply_kernels(model, kernels, available=lambda *tensors: True)
    with FakeTensorMode(allow_non_fake_inputs=quantize != "none"):
        _fake_parameters(model)
        layer = model.layers[0]
        dtype = model.tok_embeddings.weight.dtype  # the residual stream's dtype (the embedding's output)
        x = torch.empty(batch, seq_len, cfg.dim, dtype=dtype, requires_grad=True)
        positions = torch.arange(seq_len).expand(batch, seq_len)
        meter = _LiveBytes()
        with _kernels(device, lambda t: None), meter:
            with policy.autocast("cpu"):
                cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, dtype)
                # checkpointed, the forward keeps only its inputs (as checkpoint() does), and backward's
                # first unpack recomputes the whole block with gradients before its ops run backward
                with torch.set_grad_enabled(not checkpointed):
                    y = layer(x, cos, sin, None, None)
            before = meter.live  # the block's output stands for the next block's input: in the ledger
            if checkpointed:
                del y  # the recomputed output takes its place (and is dropped in a real run: one [B, T, C] over)
                with policy.autocast("cpu"):
                    y = layer(x, cos, sin, None, None)
            y.backward(torch.empty_like(y))
        return meter.peak - before


# ========================================================================= any depth, cheaply
@dataclass(frozen=True)
class Activations:
    """What a micro-batch saves for backward at the model's full depth, and the transients the
    planner's peak model needs."""

    saved: Saved
    recompute: int  # the largest checkpointed block's recomputation: its saved tensors + copies
    logits: int
    logits_fp32: int
    loss_grads: int
    head_grad: int
    # Offload: the offloadable bytes saved outside the blocks (embedding, head, loss: saved last, so
    # still pending, and reused in place, when backward starts), and the largest offloadable storage
    # of the blocks (what moves back and forth during the backward).
    outside_offloadable: int = 0
    largest_block_offloadable: int = 0
    notes: tuple[str, ...] = ()  # DryRun.notes of the dry runs it came from
    # activation bytes saved outside the blocks (head, loss): consumed, and freed, before any block's backward
    outside: int = 0


def activations(cfg: ModelConfig, policy: PrecisionPolicy, lora: LoRASpec, checkpointed: frozenset[int], batch: int,
                seq_len: int, device: str, quantize: str = "none", loss: str = "full-logits",
                kernels: str = "off", compiled_loss: bool = False, compiled_blocks: bool = False) -> Activations:
    """:func:`dry_run` of the full depth, from one dry run of 3 blocks.

    Blocks are identical, and block i >= 1 saves the same whatever its position: its own tensors
    (or, checkpointed, its inputs) plus the storages every block shares (RoPE's angles). Only
    block 0 differs (its input, the embedding, needs no gradient unless the embedding is trained).
    So a model of blocks [plain, checkpointed, plain] measures each kind once, and the full depth is
    block 0 + n_checkpointed x block 1 + n_plain x block 2, plus the shared storages and everything
    outside the blocks once. A checkpointed block 0 keeps its inputs: the run checks that this is
    what checkpointing block 1 kept, else it runs [checkpointed, checkpointed, plain] to measure it.
    The recomputation of a checkpointed block saves what the block saves plain (blocks 0 and 2).
    A depth of 3 or less is run as it is. tests/bench/test_dryrun.py checks all of this against
    full-depth dry runs.
    """
    L = cfg.n_layers
    ckpt = frozenset(checkpointed)
    run = functools.partial(dry_run, policy=policy, lora=lora, batch=batch, seq_len=seq_len, device=device,
                            quantize=quantize, loss=loss, kernels=kernels, compiled_loss=compiled_loss,
                            compiled_blocks=compiled_blocks)
    if L <= 3:
        d = run(cfg, checkpointed=ckpt)
        saved = d.saved
        ref = run(cfg, checkpointed=frozenset()) if ckpt else d  # what each block saves when recomputed
        recompute = max((ref.standalone[i] for i in ckpt), default=0)
        largest = max([d.shared.largest_offloadable] + [b.largest_offloadable for b in d.blocks])
        return Activations(saved, recompute, d.logits, d.logits_fp32, d.loss_grads, d.head_grad,
                           d.outside.offloadable, largest, tuple(dict.fromkeys(d.notes + ref.notes)),
                           d.outside.activations)
    d = run(cfg.replace(n_layers=3), checkpointed=frozenset({1}))
    first, notes = d.blocks[0], d.notes
    if 0 in ckpt:
        same_rule = d.inputs[1] == d.blocks[1]
        if same_rule:
            first = d.inputs[0]
        else:
            d01 = run(cfg.replace(n_layers=3), checkpointed=frozenset({0, 1}))
            first, notes = d01.blocks[0], notes + d01.notes
    n_ckpt = len(ckpt - {0})
    saved = d.outside + d.shared + first + d.blocks[1] * n_ckpt + d.blocks[2] * (L - 1 - n_ckpt)
    recompute = max([d.standalone[0]] * (0 in ckpt) + [d.standalone[2]] * (n_ckpt > 0), default=0)
    blocks = [d.shared, first] + [d.blocks[1]] * (n_ckpt > 0) + [d.blocks[2]] * (L - 1 - n_ckpt > 0)
    return Activations(saved, recompute, d.logits, d.logits_fp32, d.loss_grads, d.head_grad,
                       d.outside.offloadable, max(b.largest_offloadable for b in blocks), tuple(dict.fromkeys(notes)),
                       d.outside.activations)


# ======================================================================== parameters (meta)
def parameters(cfg: ModelConfig, policy: PrecisionPolicy, lora: LoRASpec,
               quantize: str = "none") -> list[tuple[str, int, torch.dtype, bool]]:
    """Every parameter tensor of the training model once (a tied head once): (name, numel, dtype,
    trainable), from the real modules built on the meta device. Quantized weights are buffers, not
    parameters: see :func:`quantized`."""
    return list(_parameters(cfg, policy, lora, quantize))


@functools.lru_cache(maxsize=64)
def shapes(cfg: ModelConfig, policy: PrecisionPolicy, lora: LoRASpec, quantize: str = "none") -> dict[str, tuple[int, ...]]:
    """Every parameter's shape by name (as :func:`parameters` names them): what the optimizer state
    sizes depend on (8-bit AdamW keeps one scale per block of a row)."""
    with torch.device("meta"):
        model = training_model(cfg, policy, lora, quantize)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


@functools.lru_cache(maxsize=64)
def _parameters(cfg: ModelConfig, policy: PrecisionPolicy, lora: LoRASpec,
                quantize: str = "none") -> tuple[tuple[str, int, torch.dtype, bool], ...]:
    with torch.device("meta"):
        model = training_model(cfg, policy, lora, quantize)
    return tuple((n, p.numel(), p.dtype, p.requires_grad) for n, p in model.named_parameters())


@dataclass(frozen=True)
class Quantized:
    """The quantized linears of a training model (all zero without quantization)."""

    storage: int = 0  # bytes of every quantized module's buffers (codes and scales: ``weight_bytes()``)
    weights: int = 0  # elements of the weights they stand for (sum of out * in)
    largest: int = 0  # elements of the largest one, [out, in]
    compute_dtype: torch.dtype | None = None  # what the forward dequantizes into (autocast's dtype when on)
    transient_per_weight: float | None = None  # the module's transient_bytes_per_weight (None: dequantizes)
    gemm_speedup: float = 1.0  # the module's gemm_speedup (fp8 GEMMs: 2)

    @property
    def dequantized(self) -> int:
        """Bytes of the largest weight-sized transient of one quantized matmul: the weight dequantized
        [out, in] (forward, and again in backward for grad_x), or what a base that multiplies its codes
        makes (fp8: nothing; fp8-lean: the transposed codes in backward)."""
        if self.compute_dtype is None:
            return 0
        per = self.compute_dtype.itemsize if self.transient_per_weight is None else self.transient_per_weight
        return int(self.largest * per)


@functools.lru_cache(maxsize=64)
def quantized(cfg: ModelConfig, policy: PrecisionPolicy, lora: LoRASpec, quantize: str = "none") -> Quantized:
    """The quantized storage of the training model, from the real modules built on the meta device."""
    if quantize == "none":
        return Quantized()
    with torch.device("meta"):
        model = training_model(cfg, policy, lora, quantize)
    mods = list(quantized_modules(model).values())
    sizes = [m.out_features * m.in_features for m in mods]
    return Quantized(sum(m.weight_bytes() for m in mods), sum(sizes), max(sizes, default=0),
                     policy.autocast_dtype or policy.param_dtype, mods[0].transient_bytes_per_weight if mods else None,
                     mods[0].gemm_speedup if mods else 1.0)


def autocast_cache(cfg: ModelConfig, policy: PrecisionPolicy, lora: LoRASpec, quantize: str = "none") -> list[tuple[str, int]]:
    """(name, numel) of the weights autocast keeps a 16-bit copy of during the forward (trainable
    fp32 matmul weights), from the real modules built on the meta device."""
    return list(_autocast_cache(cfg, policy, lora, quantize))


@functools.lru_cache(maxsize=64)
def _autocast_cache(cfg: ModelConfig, policy: PrecisionPolicy, lora: LoRASpec,
                    quantize: str = "none") -> tuple[tuple[str, int], ...]:
    with torch.device("meta"):
        model = training_model(cfg, policy, lora, quantize)
    return tuple((name, p.numel()) for name, p in autocast_cached(model))
