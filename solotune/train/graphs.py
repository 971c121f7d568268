"""What a training step does around compiled blocks that replay CUDA graphs (``--compile
blocks-cudagraphs``: ``torch.compile(mode="reduce-overhead")``, for launch-bound small micro-batches).

CUDA-graph trees hand out outputs that live in a private memory pool and are overwritten by a later
replay. Two of a step's tensors outlive a replay:

* a gradient: when ``.grad`` is None, autograd *steals* the backward graph's output as the new
  ``.grad``, and the next micro-batch's replay overwrites it (the accumulated gradient is silently
  lost, or torch raises "accessing tensor output of CUDAGraphs that has been overwritten"). With a
  ``.grad`` already in place, autograd adds into it instead: so the trainable parameters keep
  materialised (zeroed, not freed) gradients while graphs replay;
* nothing else a step keeps (losses are detached copies), so each micro-batch's forward starts a new
  graph generation (``cudagraph_mark_step_begin``), which frees the previous one's outputs.

Forwards without gradients (validation, samples) run the blocks eagerly instead (:meth:`GraphSteps.outside`):
with no backward pending, the trees take each block's call of the one shared block graph for a new
generation and overwrite the previous block's output, the very input of that call.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import torch


class GraphSteps:
    """The step's two hooks for graph replay; with ``replay=False`` they do nothing (plain runs)."""

    def __init__(self, params: Sequence[torch.Tensor], replay: bool) -> None:
        self.params = list(params)
        self.replay = replay

    @property
    def grads_to_none(self) -> bool:
        """``zero_grad(set_to_none=...)`` after an update: replayed graphs need gradients kept in place."""
        return not self.replay

    def before_forward(self) -> None:
        """Before each micro-batch's forward: a new graph generation, gradients materialised."""
        if not self.replay:
            return
        torch.compiler.cudagraph_mark_step_begin()
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def outside(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` (a no-grad pass over the model) run with the compiled blocks' original eager code
        while graphs replay (``torch.compiler.set_stance``, torch >= 2.6); ``fn`` itself otherwise."""
        if not self.replay or not hasattr(torch.compiler, "set_stance"):
            return fn

        @functools.wraps(fn)
        def eager(*args: Any, **kwargs: Any) -> Any:
            with torch.compiler.set_stance("force_eager"):
                return fn(*args, **kwargs)

        return eager


NO_GRAPHS = GraphSteps((), replay=False)

__all__ = ["GraphSteps", "NO_GRAPHS"]
