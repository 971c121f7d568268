"""Optimizer in backward (``--optimizer-in-backward``): every parameter is updated from its
post-accumulate-grad hook the moment backward has produced its gradient, and the gradient is freed
right after, so the full set of gradients never exists (for full fine-tuning of 7B in bf16 that is
12.6 GiB that is never allocated).

The loop does not change: ``train_step`` still calls ``optimizer.step()`` and ``zero_grad()``,
which here only wait for the last copies (with state offload) and drop nothing (every gradient is
already gone). The learning rate an update uses is the group's ``lr`` when its hook runs, i.e. the
same step's rate as in the plain loop (the schedule steps after the update in both).

Rules (``TrainConfig.validate`` refuses the rest with one line):

* **No accumulation** (``grad_accum`` must be 1): the hook of micro-batch 1 would update the weights
  before micro-batch 2 saw them. (There is no cheap alternative: keeping the gradients across
  micro-batches is exactly the memory this removes.)
* **No global-norm clipping** (``max_grad_norm`` must be 0/None): the norm of the whole gradient is
  known only after the last parameter was updated. The loop's ``grad_norm`` is still reported:
  :meth:`OptimizerInBackward.clip_grad_norm` returns the norm of the gradients the hooks saw
  (accumulated per parameter, in fp32, from each gradient's own norm) and clips nothing.
* **No fp16 loss scaling** (fp16-amp): the scaler must see every gradient before it may skip a step.

Under FSDP2 the hooks are registered on the *sharded* parameters (DTensors), which autograd never
sees (it differentiates the all-gathered unsharded ones). FSDP2 itself runs them: after the
reduce-scatter of a block (``foreach_reduce`` in ``torch/distributed/fsdp/_fully_shard/
_fsdp_collectives.py``) it assigns each sharded gradient and right after calls that parameter's
post-accumulate-grad hooks (on CUDA on the post-reduce stream, ordered after the reduce-scatter;
the default stream waits for it before the next forward). So each rank updates its shard from
the reduced gradient the moment it exists, one parameter at a time, and the sharded gradients of
only one block ever exist. The reported norm sums each rank's local squares and all-reduces once
per step (:meth:`OptimizerInBackward.clip_grad_norm`).

Evaluation runs under ``torch.no_grad()``: no gradients, so no hooks fire. The hooks hold the
optimizer weakly and :meth:`close` removes them; a backward on the model after the run (and after
the optimizer is gone or closed) updates nothing.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from .per_param import BuildInner, PerParamOptimizer
from .store import StateStore


class OptimizerInBackward(PerParamOptimizer):
    """A :class:`PerParamOptimizer` whose parameters step themselves during backward."""

    def __init__(self, groups: list[dict], build: BuildInner, store: StateStore | None = None) -> None:
        super().__init__(groups, build, store)
        self._sq: torch.Tensor | None = None  # sum of squared gradient norms since the last clip_grad_norm
        self._order: list[torch.Tensor] = []  # the order hooks ran in during the last backward
        self._next: dict[int, torch.Tensor] = {}  # id(p) -> the parameter whose hook ran after p's last time
        ref = weakref.ref(self)
        self._handles = [p.register_post_accumulate_grad_hook(_hook(ref)) for p in self.params]

    def _on_grad(self, p: torch.Tensor) -> None:
        g = p.grad.detach()
        norm = torch.linalg.vector_norm(g.to_local() if hasattr(g, "to_local") else g).float()  # this rank's shard
        self._sq = norm * norm if self._sq is None else self._sq + norm * norm
        self._order.append(p)
        self.step_param(p, self._next.get(id(p)))  # prefetch what came next in the last backward
        p.grad = None  # the point: this gradient is gone before the next one is complete

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """The updates happened in backward: wait for the store's copies; learn the hook order. A
        gradient that is still there was not produced by backward (torch's state-dict code sets
        zero gradients and steps to create an empty optimizer's state): it is stepped now."""
        if closure is not None:
            raise RuntimeError("optimizer in backward: step(closure) is not supported")
        if self._order:
            self._next = {id(a): b for a, b in zip(self._order, self._order[1:])}
            self._order = []
        for p in self.params:
            if p.grad is not None:
                self.step_param(p)
        self.store.flush()
        return None

    def clip_grad_norm(self, params: Any, max_norm: float | None) -> float:
        """The norm of the gradients the hooks saw since the last call (clips nothing: see the module
        docstring); the loop calls it where it would clip."""
        if max_norm is not None:
            raise RuntimeError("optimizer in backward cannot clip by the global norm (max_grad_norm must be None)")
        sq, self._sq = self._sq, None
        mesh = next((p.device_mesh for p in self.params if hasattr(p, "device_mesh")), None)
        if mesh is not None:  # sharded (FSDP2, a 1-D mesh): sum the ranks' squares; every rank calls this
            import torch.distributed as dist

            sq = sq if sq is not None else torch.zeros((), device=self.params[0].device)
            dist.all_reduce(sq, group=mesh.get_group())
        return 0.0 if sq is None else float(sq.sqrt())

    def close(self) -> None:
        """Remove the gradient hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []


def _hook(ref: "weakref.ref[OptimizerInBackward]") -> Any:
    def hook(p: torch.Tensor) -> None:
        opt = ref()
        if opt is not None and opt._handles:
            opt._on_grad(p)

    return hook
