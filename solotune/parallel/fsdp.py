"""Sharded data parallelism with PyTorch's FSDP2 (``fully_shard``), one process per GPU under
``torchrun``: ``torchrun --nproc-per-node N -m solotune finetune ... --distributed fsdp``.

Nothing here is a home-made engine: sharding, all-gathers, reduce-scatters, mixed precision and
gradient-accumulation without communication are FSDP2's; sharded state dicts are DCP's
(``state_dict.py``; the checkpoint layout around them is ``solotune/train/sharded.py``'s).
This file decides *how* they are used:

Sharding. ``fully_shard`` on every TransformerBlock, then on the root (embeddings, final norm,
output head). Each parameter is split along dim 0 across the ranks (a DTensor); a block's weights
are all-gathered just before its forward and backward and freed after. Frozen LoRA bases are
sharded like any other weight, so a model that does not fit one GPU trains on several.

Mixed precision, from ``--precision``: the weights FSDP keeps (sharded) and the optimizer steps on
stay in the policy's ``param_dtype``; ``MixedPrecisionPolicy`` says in which dtype they are
all-gathered for compute and in which dtype gradients are reduced across ranks:

=========  ======================  ==========================  =================================
mode       sharded weights         all-gather / compute         gradient reduce-scatter
=========  ======================  ==========================  =================================
fp32       fp32                    fp32                         fp32
bf16-amp   fp32                    bf16 (+ autocast, as 1 GPU)  fp32
fp16-amp   fp32                    fp16 (+ autocast, scaler)    fp32 (found-inf agreed by all ranks)
bf16       bf16 (LoRA adapters 32) as stored                    fp32, then rounded to the weights'
=========  ======================  ==========================  =================================

QLoRA (a 4-bit NF4 base implementing ``solotune.peft.LinearBase``, passed through
``apply_lora(base_factory=...)``; no NF4 base exists yet) -- the plan: NF4 bases are *replicated*,
not sharded. Every rank keeps the whole quantized base (70B in NF4 is ~35 GB, it fits one H200)
and only the adapters are sharded; the bases are then passed to
``fully_shard(..., ignored_params=...)``, so no base weight is ever all-gathered (a 4x cheaper
all-gather than bf16 would still be traffic on every forward and backward for nothing that
trains). Sharding NF4 bases through a tensor subclass with FSDP2's ``fsdp_pre_all_gather`` /
``fsdp_post_all_gather`` hooks is the fallback for a base that does not fit one GPU. Until then
:meth:`FSDPContext.wrap` refuses non-floating-point (quantized) weights with a clear error.

Data. ``TrainConfig.batch_size`` is the global micro-batch: every rank draws the same seeded order
and takes every N-th example of each micro-batch (:meth:`FSDPContext.share`), so N ranks see
exactly the examples one process would. The loss of a window is normalised by its target-token
count summed over all ranks, and FSDP's reduce-scatter averages gradients over ranks, so each
rank's loss is multiplied by N (``grad_sum_factor``): the summed gradient is then the
single-process gradient of the same global batch. Gradient accumulation disables the
reduce-scatter on all but the window's last micro-batch (``set_requires_gradient_sync``): one
reduce-scatter per optimizer step. The price: between micro-batches every rank holds its
unsharded gradients (in the reduce dtype) -- negligible for LoRA, the full model's size for full
fine-tuning (use ``grad_accum=1`` and a larger ``batch_size`` when that does not fit).

Random weights (``random_init``, benchmarks): the model is built on the meta device, sharded, and
only the local shards are materialised, so a 70B architecture never exists unsharded anywhere.
The shards are filled from the very same seeded draws as :func:`solotune.model.build_model`
(drawn one full parameter at a time on the device and sliced), so the weights do not depend on the
number of ranks. Checkpoints with real weights are loaded whole on every rank and then sharded
block by block.

Rank 0 alone prints, writes metrics, summaries, checkpoint metadata and ``final/`` (gathered to
full tensors: the same files as a single-GPU run). Sample generations are skipped.

Ctrl-C: torchrun hands SIGINT to every rank, not at the same instant. During the loop it only sets
a flag; after each optimizer step the ranks agree on it (one tiny all-reduce) and all stop after
the same step, write one checkpoint and exit. torchrun kills workers that are still running 30 s
after the signal, so a long step plus its checkpoint may not make it: ``--save-every`` is the
safety net for big models.

Every process keeps NVLink SHARP / multicast off (``NCCL_NVLS_ENABLE=0``,
``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``, ``NVSHMEM_DISABLE_NVLS=1``; set unless already set).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import math
import os
import signal
import threading
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import DeviceError

try:  # torch >= 2.6
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:  # torch 2.5
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard

NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class NoCUDAError(DeviceError, RuntimeError):
    """distributed=fsdp on cuda without a CUDA device (a RuntimeError, as it was before)."""


def set_nvls_off() -> None:
    """NVLink multicast off in this process and the ones it starts (values already set win)."""
    for k, v in NVLS_OFF.items():
        os.environ.setdefault(k, v)


def mixed_precision(policy: Any) -> MixedPrecisionPolicy:
    """FSDP's all-gather / reduce dtypes for a :class:`~solotune.train.precision.PrecisionPolicy`."""
    if policy.autocast_dtype is None and policy.param_dtype not in (torch.bfloat16, torch.float16):
        return MixedPrecisionPolicy()  # fp32, fp64: nothing is cast
    # amp: gather in the autocast dtype (the matmuls run in it anyway); pure bf16: gather as stored.
    # Gradients are summed in fp32 either way: a bf16 sum of N ranks' gradients loses bits for nothing.
    return MixedPrecisionPolicy(param_dtype=policy.autocast_dtype, reduce_dtype=torch.float32)


class FSDPContext:
    """The parallel context for ``distributed="fsdp"`` (see :mod:`solotune.parallel` for the interface).

    Joins the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``, ``LOCAL_RANK``): NCCL on CUDA, gloo on CPU. Without those variables it runs as
    a group of one. The group is left on exit if this context created it (a caller's stays)."""

    kind = "fsdp"

    def __init__(self, device: torch.device) -> None:
        self.requested = device
        self.device = device
        self.rank, self.world_size, self.local_rank = 0, 1, 0
        self.mesh: Any = None
        self._owns_group = False
        self._stop = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grad_sum_factor(self) -> int:
        return self.world_size

    # ----------------------------------------------------------- set-up
    def __enter__(self) -> "FSDPContext":
        set_nvls_off()
        cuda = self.requested.type == "cuda"
        if cuda and not torch.cuda.is_available():
            raise NoCUDAError("distributed=fsdp on cuda, but no CUDA device is available")
        self.local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
        if cuda:
            # "cuda" always means this rank's own GPU: cuda:LOCAL_RANK.
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            backend = "nccl" if cuda else "gloo"
            if all(k in os.environ for k in TORCHRUN_ENV):
                dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
            else:  # not under torchrun: a group of one (e.g. resuming a sharded run on one GPU)
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            self._owns_group = True
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(self.device.type, (self.world_size,))
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if self._owns_group and dist.is_initialized():
            # The sharded model is garbage now (FSDP's state and modules reference each other):
            # collect it while the interpreter is alive, so no pending gloo/NCCL work holding
            # tensors is left to be destroyed at interpreter exit (a SIGABRT with gloo).
            gc.collect()
            if exc_type is None:
                dist.barrier()  # leave together: no rank tears down while another still talks
            dist.destroy_process_group()
            self._owns_group = False

    # ------------------------------------------------------------------ model
    def load_model(self, cfg: Any, policy: Any, model: nn.Module | None, tokenizer: Any,
                   load: Callable[..., tuple[nn.Module, Any]]) -> tuple[nn.Module, Any]:
        """``load(cfg, policy, device, model, tokenizer)`` is the loop's loader. Random weights (and
        a caller's model on the meta device): on the meta device, materialised shard by shard in
        :meth:`wrap`. Anything else: whole on every rank."""
        on_meta = (model is None and cfg.random_init) or (model is not None and _on_meta(model))
        return load(cfg, policy, torch.device("meta") if on_meta else self.device, model, tokenizer)

    def wrap(self, model: nn.Module, cfg: Any, policy: Any) -> nn.Module:
        """``fully_shard`` each block, then the root; materialise a meta-device model's shards."""
        for name, p in model.named_parameters():
            if not p.is_floating_point():
                raise NotImplementedError(
                    f"distributed=fsdp: parameter {name} is {p.dtype} (quantized?); quantized bases are not "
                    "supported yet (planned: replicated on every rank, see solotune/parallel/fsdp.py)")
        mp = mixed_precision(policy)
        layers = getattr(model, "layers", None)
        if layers is None:
            raise TypeError(f"distributed=fsdp expects solotune's Transformer (with .layers), got {type(model).__name__}")
        for block in layers:
            fully_shard(block, mesh=self.mesh, mp_policy=mp)
        # The root's weights (embeddings, head) are used first in backward: keep them gathered
        # between forward and backward instead of gathering them twice.
        fully_shard(model, mesh=self.mesh, mp_policy=mp, reshard_after_forward=False)
        if _on_meta(model):
            model.to_empty(device=self.device)
            init_random_shards(model, cfg.seed, self.device)
        return model

    # ------------------------------------------------------------------- data
    def share(self, indices: Sequence[int]) -> list[int]:
        """Every ``world_size``-th example of a micro-batch, starting at this rank."""
        return list(indices)[self.rank::self.world_size]

    @contextlib.contextmanager
    def accumulate(self, model: nn.Module, last: bool) -> Iterator[None]:
        """Reduce-scatter gradients only after the window's last micro-batch; before it, each rank
        accumulates its unsharded gradients locally."""
        model.set_requires_gradient_sync(last)
        yield

    # ------------------------------------------------------------- collectives
    def all_reduce_sum(self, *values: float) -> list[float]:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, value: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float | None) -> float:
        """Clip by the norm of the full gradient (DTensor reduces the shards' norms across ranks)."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    def make_scaler(self, policy: Any, device_type: str) -> Any:
        """fp16: the scaler must skip a step on every rank when any rank's shard overflowed
        (FSDP's ShardedGradScaler all-reduces its found-inf flag)."""
        scaler = policy.make_scaler(device_type)
        if getattr(scaler, "scaler", None) is not None:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            inner = scaler.scaler
            scaler.scaler = ShardedGradScaler(device_type, init_scale=inner.get_scale(),
                                              growth_interval=inner.get_growth_interval())
        return scaler

    # ------------------------------------------------------------------ Ctrl-C
    @contextlib.contextmanager
    def interrupts(self) -> Iterator[None]:
        """During the loop Ctrl-C only raises a flag; :meth:`check_interrupt` then stops all ranks
        after the same optimizer step (torchrun passes the signal to every rank, not at the same
        instant), so the checkpoint written on the way out is consistent."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self._stop = False

        def flag(*_: Any) -> None:
            self._stop = True

        previous = signal.signal(signal.SIGINT, flag)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)

    def check_interrupt(self) -> None:
        """Raise KeyboardInterrupt on every rank when any rank was interrupted (a collective call)."""
        if self.all_reduce_sum(float(self._stop))[0] > 0:
            raise KeyboardInterrupt

    # ------------------------------------------------------------ state dicts
    sharded = True  # weights and optimizer state live in shards: checkpoints go through DCP

    def full_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full tensors of the (sharded) ``state`` on the CPU of rank 0, in its order; ``{}`` on the
        other ranks. A collective call: every rank, same names, same order."""
        full = {}
        for name, t in state.items():
            t = t.full_tensor() if hasattr(t, "full_tensor") else t  # all-gathers this tensor's shards
            if self.is_main:
                full[name] = t.detach().cpu()
            del t
        return full


# ================================================================================== helpers
def _on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _local_shard(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """The slice of ``full`` that this rank holds of the sharded ``param`` (FSDP2 shards dim 0 in
    ``torch.chunk`` pieces)."""
    if not hasattr(param, "device_mesh"):
        return full
    mesh, placements = param.device_mesh, param.placements
    piece = full
    for dim_mesh, placement in enumerate(placements):
        if placement.is_shard():
            chunks = torch.chunk(piece, mesh.size(dim_mesh), dim=placement.dim)
            coord = mesh.get_local_rank(dim_mesh)
            piece = chunks[coord] if coord < len(chunks) else piece.narrow(placement.dim, 0, 0)
    return piece


@torch.no_grad()
def _fill(param: torch.Tensor, full: torch.Tensor, name: str) -> None:
    local = param.to_local() if hasattr(param, "to_local") else param
    piece = _local_shard(param, full)
    if tuple(piece.shape) != tuple(local.shape):
        raise RuntimeError(f"{name}: local shard {tuple(local.shape)} but the slice is {tuple(piece.shape)}")
    local.copy_(piece)


@torch.no_grad()
def init_random_shards(model: nn.Module, seed: int, device: torch.device) -> None:
    """Fill a sharded, freshly ``to_empty``-ed model with the weights
    ``build_model(cfg, seed=seed)`` + ``apply_lora(generator=Generator().manual_seed(seed))`` give
    on one device (the loop's random-init path), whatever the number of ranks.

    Mirrors ``Transformer.init_weights`` (norms 1, everything else N(0, 0.02) from one generator
    on the device, in parameter order) and ``LoRALinear.reset_lora_parameters`` (A ~ U(+-1/sqrt(in))
    drawn in fp32 on the CPU in module order, B = 0). Each parameter is drawn whole (at most one
    parameter in memory at a time: 0.5 GB for a 70B embedding in bf16) and sliced to the shard."""
    from ..peft import lora_modules

    lora = {id(m.lora_a) for _, m in lora_modules(model)} | {id(m.lora_b) for _, m in lora_modules(model)}
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if id(p) in lora:
            continue
        shape = tuple(p.shape)
        if name.endswith("norm.weight"):
            full = torch.ones(shape, dtype=p.dtype, device=device)
        else:
            full = torch.empty(shape, dtype=p.dtype, device=device).normal_(0.0, 0.02, generator=gen)
        _fill(p, full, name)
    lora_gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, m in lora_modules(model):
        bound = 1.0 / math.sqrt(m.in_features)
        a = torch.empty(tuple(m.lora_a.shape), dtype=torch.float32).uniform_(-bound, bound, generator=lora_gen)
        _fill(m.lora_a, a.to(device=device, dtype=m.lora_a.dtype), f"{name}.lora_a")
        _fill(m.lora_b, torch.zeros(tuple(m.lora_b.shape), dtype=m.lora_b.dtype, device=device), f"{name}.lora_b")


__all__ = ["FSDPContext", "NVLS_OFF", "set_nvls_off", "mixed_precision", "init_random_shards"]
