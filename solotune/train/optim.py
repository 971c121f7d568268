"""Optimizers by name: one factory the loop builds from and the planner asks for state sizes.

A new optimizer is one :class:`OptimizerSpec` here: how to build it over the trainable parameters
and how many bytes of state (and update scratch) it keeps per parameter tensor. ``solotune plan``
and the measured anatomy then account for it with no other change.

Two options wrap any of them (``solotune/optim``), chosen by :func:`make_optimizer` so the loop
never asks which: ``in_backward`` (each parameter stepped from its gradient hook; grad_accum 1, no
clipping: ``TrainConfig.validate`` says so) and ``offload`` (states in pinned host memory, streamed
to the device for each parameter's update). Where the loop would clip, it calls
:func:`grad_norm_fn`'s function: the parallel context's clipping, or the in-backward optimizer's
report of the norm its hooks saw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..optim import AdamW8bit, HostStates, OptimizerInBackward, PerParamOptimizer
from ..optim import adamw8bit


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: weight decay on matrices only (not norms or vectors)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _adamw(groups: list[dict], lr: float, device: torch.device) -> torch.optim.Optimizer:
    # Fused kernel on CUDA (one launch for all parameters); the default foreach path elsewhere.
    fused = True if device.type == "cuda" else None
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=fused)


Shape = int | Sequence[int]  # a tensor's shape, or only its element count


def _adamw_state_bytes(numel: int, dtype: torch.dtype) -> int:
    # exp_avg + exp_avg_sq via zeros_like (the parameter's dtype: bf16 weights get bf16 state),
    # plus a 0-dim fp32 ``step`` tensor per parameter tensor.
    return 2 * numel * torch.empty((), dtype=dtype).element_size() + 4


def _adamw8bit(groups: list[dict], lr: float, device: torch.device) -> torch.optim.Optimizer:
    return AdamW8bit(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def _adamw8bit_state_bytes(shape: Shape, dtype: torch.dtype) -> int:
    # One scale per block of a row: exact for a shape; an element count alone is taken as a matrix
    # of rows of whole blocks (adamw8bit.state_bytes).
    return adamw8bit.state_bytes(shape if isinstance(shape, int) else tuple(shape))


def _no_scratch(numel: int, dtype: torch.dtype, device: str) -> int:
    # torch AdamW: fused on CUDA (in place); the CPU path's per-tensor temporaries (denominator, ...)
    return 0 if device == "cuda" else 2 * numel * torch.empty((), dtype=dtype).element_size()


def _adamw8bit_scratch(numel: int, dtype: torch.dtype, device: str) -> int:
    # On CUDA the Triton kernel updates in place (kernel "auto" picks it wherever Triton imports, as
    # on every GPU set-up of this project); the PyTorch path works through fp32 chunks.
    return 0 if device == "cuda" else adamw8bit.scratch_bytes(numel)


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    build: Callable[[list[dict], float, torch.device], torch.optim.Optimizer]
    state_bytes: Callable[[int, torch.dtype], int]  # (numel, param dtype) of one trainable tensor -> bytes
    description: str
    # (numel, dtype, "cuda"|"cpu") of the largest trainable tensor -> bytes of the update's working memory
    scratch_bytes: Callable[[int, torch.dtype, str], int] = _no_scratch
    # (shape, param dtype) -> bytes, where the state depends on more than the element count (8-bit
    # AdamW: one scale per block of a row); None: ``state_bytes`` of the shape's element count
    shaped_state_bytes: Callable[[tuple[int, ...], torch.dtype], int] | None = None

    def bytes_for(self, shape: Shape, dtype: torch.dtype) -> int:
        """State bytes of one trainable tensor given by its shape (exact) or its element count."""
        if isinstance(shape, int):
            return self.state_bytes(shape, dtype)
        if self.shaped_state_bytes is not None:
            return self.shaped_state_bytes(tuple(shape), dtype)
        return self.state_bytes(math.prod(shape), dtype)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("adamw", _adamw, _adamw_state_bytes, "torch AdamW; two moments in the parameter's dtype"),
    "adamw-8bit": OptimizerSpec("adamw-8bit", _adamw8bit, _adamw8bit_state_bytes,
                                "AdamW with blockwise 8-bit moments (solotune.optim.adamw8bit); ~2 bytes/parameter",
                                _adamw8bit_scratch, _adamw8bit_state_bytes),
}


def get_optimizer_spec(name: str) -> OptimizerSpec:
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ConfigError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}") from None


def make_optimizer(name: str, model: nn.Module, *, lr: float, weight_decay: float, device: torch.device,
                   in_backward: bool = False, offload: bool = False) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``model``'s trainable parameters; ``in_backward``: stepped from
    the gradient hooks; ``offload``: its state in pinned host memory (both: ``solotune/optim``)."""
    spec = get_optimizer_spec(name)
    groups = param_groups(model, weight_decay)
    if not (in_backward or offload):
        return spec.build(groups, lr, device)
    store = HostStates(device) if offload else None
    wrapper = OptimizerInBackward if in_backward else PerParamOptimizer
    return wrapper(groups, lambda gs: spec.build(gs, lr, device), store)


def grad_norm_fn(optimizer: torch.optim.Optimizer, par: Any) -> Callable[[list[torch.Tensor], float | None], float]:
    """What the step calls where it clips, ``(params, max_norm) -> grad norm``: the parallel
    context's global-norm clipping, or (optimizer in backward, whose gradients are gone by then)
    the norm of the gradients its hooks saw."""
    return optimizer.clip_grad_norm if isinstance(optimizer, OptimizerInBackward) else par.clip_grad_norm


def optimizer_state_bytes(name: str, params: Iterable[tuple[Shape, torch.dtype]]) -> int:
    """Bytes of optimizer state for trainable tensors given as (shape, dtype), after the first step
    (a numel in place of a shape: see :func:`solotune.optim.adamw8bit.state_bytes`)."""
    spec = get_optimizer_spec(name)
    return sum(spec.bytes_for(n, dt) for n, dt in params)


def optimizer_scratch_bytes(name: str, params: Iterable[tuple[int, torch.dtype]], device: str) -> int:
    """Working memory of the largest tensor's update (the update runs one tensor at a time)."""
    spec = get_optimizer_spec(name)
    return max((spec.scratch_bytes(n, dt, device) for n, dt in params), default=0)


# ------------------------------------------------------------------------------------ schedule
def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of ``lr`` for optimizer step ``step`` (0-based): linear warmup over ``warmup``
    steps to 1, then constant or cosine towards ``min_ratio`` (reached one step after the last)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def make_schedule(optimizer: torch.optim.Optimizer, *, warmup: int, total: int, schedule: str,
                  min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule of :func:`lr_factor` over ``total`` optimizer steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total, schedule, min_ratio))
