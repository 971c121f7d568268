"""One optimizer step = one accumulation window: the unit that ``torch.compile``, fused kernels and
other optimizers target. Everything around it (set-up, evaluation, logging, saving) is ``loop.py``.

The loss is the mean next-token cross-entropy over the *target* tokens of the whole window: each
micro-batch contributes ``sum of its token losses / target tokens in the window``, so k
micro-batches of one example give exactly the gradient of one batch of k examples (plain
per-micro-batch means would weight a short answer's tokens more than a long one's).
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ..data.batch import Batch
from .graphs import NO_GRAPHS, GraphSteps
from .interrupts import deferred_signals
from .loss import HeadLoss
from .precision import PrecisionPolicy
from .run_state import TrainState


@dataclass(frozen=True)
class StepContext:
    """What a step needs besides the window and the state; built once per run."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    params: list[torch.Tensor]  # trainable parameters (clipped together)
    policy: PrecisionPolicy
    loss_fn: HeadLoss
    par: Any  # the parallel context (solotune/parallel): one process = no-ops
    device: torch.device
    max_grad_norm: float | None
    forward_context: Callable[[], contextlib.AbstractContextManager] | None = None  # instrument hook
    before_update: Callable[[nn.Module, torch.optim.Optimizer, int], None] | None = None  # instrument hook
    offload: contextlib.AbstractContextManager = contextlib.nullcontext()  # train/offload.py, entered per micro-batch
    # (params, max_norm) -> grad norm, where the step clips (train/optim.grad_norm_fn); None: par.clip_grad_norm
    clip_grad_norm: Callable[[list[torch.Tensor], float | None], float] | None = None
    graphs: GraphSteps = NO_GRAPHS  # train/graphs.py: compiled blocks replaying CUDA graphs


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean over the window's target tokens (all ranks)
    lr: float  # the learning rate this step used
    grad_norm: float
    took_step: bool  # False: fp16-amp skipped the update (non-finite gradients)
    tokens: int  # non-padding tokens of the window (all ranks)
    target_tokens: int
    seconds: float


def train_step(ctx: StepContext, state: TrainState, window: Sequence[Batch]) -> StepResult:
    """Run one accumulation window and the update; advance ``state`` by one committed step."""
    t0 = time.perf_counter()
    par, scaler, opt = ctx.par, state.scaler, ctx.optimizer
    n_targets, n_tokens = (int(v) for v in par.all_reduce_sum(sum(b.num_targets for b in window),
                                                              sum(b.num_tokens for b in window)))
    loss_sum = _window_loss(ctx, scaler, window, n_targets)
    loss = par.all_reduce_sum(loss_sum.item())[0] / max(n_targets, 1)
    scaler.check_finite(loss, state.step + 1)
    if ctx.before_update:
        ctx.before_update(ctx.model, opt, state.step + 1)
    lr = opt.param_groups[0]["lr"]
    with deferred_signals():  # an update and its bookkeeping are never cut in half by Ctrl-C
        scaler.unscale_(opt)
        grad_norm = (ctx.clip_grad_norm or par.clip_grad_norm)(ctx.params, ctx.max_grad_norm)
        took_step = scaler.step(opt)
        state.scheduler.step()
        opt.zero_grad(set_to_none=ctx.graphs.grads_to_none)
        dt = time.perf_counter() - t0
        state.step += 1
        state.tokens += n_tokens
        state.target_tokens += n_targets
        state.runtime_s += dt
        state.commit()
    return StepResult(loss, lr, grad_norm, took_step, n_tokens, n_targets, dt)


def _window_loss(ctx: StepContext, scaler: Any, window: Sequence[Batch], n_targets: int) -> torch.Tensor:
    """Forward + backward of every micro-batch; returns the window's fp64 loss sum (this rank)."""
    par = ctx.par
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for j, batch in enumerate(window):
        batch = batch.to(ctx.device)
        ctx.graphs.before_forward()
        hook = ctx.forward_context() if ctx.forward_context else contextlib.nullcontext()
        # The instrument's hook is outermost, so the anatomy sees what the offload leaves on the device.
        with hook, ctx.offload, par.accumulate(ctx.model, last=j == len(window) - 1):
            with ctx.policy.autocast(ctx.device.type):
                micro = ctx.model(batch, head=functools.partial(ctx.loss_fn, labels=batch.labels))
            # Normalise by the whole window's target count: k micro-batches == one batch of k.
            # (grad_sum_factor: FSDP averages the ranks' gradients; this makes it their sum.)
            share = micro * par.grad_sum_factor if par.grad_sum_factor != 1 else micro
            scaler.scale(share / max(n_targets, 1)).backward()
        loss_sum += micro.detach()
        del micro
    return loss_sum
