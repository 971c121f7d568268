"""``solotune bench --optimizer auto``: each full fine-tuning cell trains with the cheapest
optimizer technique (8-bit states, optimizer in backward, state offload: ``plan.FULL_FT_OPTIMIZERS``)
that the planner predicts to fit the cell's memory (``--memory-limit``, else the GPU's).

The prediction is made for the cell's ``seq_len`` cap (its longest possible example: the bound
the cell must fit) and must leave :data:`HEADROOM` of the memory free: the planner is checked to within 5% of the
measured peak, and ``--memory-limit`` caps what the caching allocator *reserves*, a few percent
more than what it hands out; the rank is :func:`solotune.bench.plan.relative_cost` (ties keep
the earlier technique: the plain step, which can clip). A cell nothing fits keeps plain AdamW
(and runs out of memory: the table shows it as such).
"""

from __future__ import annotations

import dataclasses

import torch

from .cell import CellSpec

HEADROOM = 0.08  # fraction of the memory a chosen technique's predicted peak must leave free


def with_cheapest_optimizer(spec: CellSpec, gpu_mem: int | None) -> CellSpec:
    """``spec`` with ``optimizer`` / ``optimizer_in_backward`` / ``offload`` set to plan's cheapest
    fitting technique for ``gpu_mem`` bytes (None: the first CUDA device's memory)."""
    from .cell import planner_setup
    from .plan import cheapest_fitting, model_config

    if gpu_mem is None:
        if not torch.cuda.is_available():
            return spec
        gpu_mem = torch.cuda.get_device_properties(0).total_memory
    cfg = model_config(spec.model, spec.layers)
    s = planner_setup(spec, cfg, spec.seq_len, torch.device("cpu" if spec.device == "cpu" else "cuda"))
    best = cheapest_fitting(s, int(gpu_mem * (1 - HEADROOM)))
    if best is None:
        return spec
    return dataclasses.replace(spec, optimizer=best.optimizer, optimizer_in_backward=best.optimizer_in_backward,
                               offload=best.offload)
