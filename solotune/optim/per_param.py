"""One inner optimizer per trainable parameter, behind the ``torch.optim.Optimizer`` interface the
loop, the schedule and the checkpoints already use: the base of optimizer-in-backward
(``in_backward.py``: each parameter is stepped from its gradient hook) and of optimizer-state
offload (``offload.py``: each parameter's state is streamed to the device for its update).

* ``param_groups`` is the list of the inner optimizers' own groups (one per parameter), so the
  learning-rate schedule (``LambdaLR`` sets ``group["lr"]``) reaches every inner optimizer.
* ``state`` maps each parameter that has state to its inner optimizer's state dict (the same dict
  objects), so the measured anatomy counts it as it counts any optimizer's state (and it is empty
  before the first update, as torch's: ``torch.distributed.checkpoint.state_dict`` initialises an
  empty optimizer's state by a step of zero gradients before it builds loading templates).
* ``state_dict()`` is torch's format (``state`` by parameter position, one group per parameter), so
  DCP's ``get_state_dict`` / ``set_state_dict`` handle it like any optimizer's: FSDP checkpoints
  save and reshard it. Loading restores each inner optimizer through its own ``load_state_dict``
  (8-bit AdamW: bit for bit); the earlier ``{"per_parameter": [...]}`` format still loads.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .store import DeviceStates, StateStore

BuildInner = Callable[[list[dict]], torch.optim.Optimizer]


class PerParamOptimizer(torch.optim.Optimizer):
    """Inner optimizers built by ``build`` over one parameter each, in the order of ``groups``
    (each inner group keeps its group's hyperparameters: weight decay on matrices only...).
    ``store``: where the states live between updates (default: on the parameter's device)."""

    def __init__(self, groups: list[dict], build: BuildInner, store: StateStore | None = None) -> None:
        inner: dict[torch.Tensor, torch.optim.Optimizer] = {}
        for g in groups:
            for p in g["params"]:
                inner[p] = build([{**g, "params": [p]}])
        if not inner:
            raise ValueError("no trainable parameters to optimize")
        super().__init__([{"params": list(inner)}], {})  # torch's bookkeeping (hooks, step patching)
        self.params = list(inner)
        self.inner = inner
        self.store = store if store is not None else DeviceStates()
        self._link()

    def _link(self) -> None:
        """Point ``param_groups``/``state`` at the inner optimizers' (again after loading: torch's
        ``load_state_dict`` replaces both)."""
        self.param_groups = [self.inner[p].param_groups[0] for p in self.params]
        self.state = {p: self.inner[p].state[p] for p in self.params if self.inner[p].state.get(p)}

    # ------------------------------------------------------------------ updates
    @torch.no_grad()
    def step_param(self, p: torch.Tensor, next_p: torch.Tensor | None = None) -> None:
        """Update ``p`` from its gradient with its inner optimizer; the store brings its state to
        the device and back (``next_p``: the parameter updated next, whose state may be prefetched)."""
        state = self.inner[p].state[p]
        self.store.fetch(p, state)
        if next_p is not None:
            self.store.prefetch(next_p, self.inner[next_p].state[next_p])
        self.inner[p].step()
        self.state.setdefault(p, self.inner[p].state[p])  # its first update created it
        self.store.release(p, state)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Every parameter that has a gradient, in order."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        todo = [p for p in self.params if p.grad is not None]
        for i, p in enumerate(todo):
            self.step_param(p, todo[i + 1] if i + 1 < len(todo) else None)
        self.store.flush()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    # -------------------------------------------------------------- state dicts
    def state_dict(self) -> dict[str, Any]:
        """torch's format: ``param_groups`` (the inner groups, one parameter each) and ``state`` by position."""
        self.store.flush()  # every pending copy to the host is complete before the tensors are read
        return super().state_dict()

    def upgrade_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """A saved state (either format) in torch's format with every inner state in its optimizer's
        current layout (8-bit AdamW: ``AdamW8bit.upgrade_state_dict``): what FSDP's loading of a
        single-process checkpoint puts onto the shards."""
        state, groups = {}, []
        for i, (p, sd) in enumerate(zip(self.params, _per_parameter(state_dict, len(self.params)))):
            upgrade = getattr(self.inner[p], "upgrade_state_dict", None)
            sd = upgrade(sd) if upgrade is not None else sd
            if 0 in sd["state"]:
                state[i] = sd["state"][0]
            groups.append({**sd["param_groups"][0], "params": [i]})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        per_param = _per_parameter(state_dict, len(self.params))
        for p, sd in zip(self.params, per_param):
            self.inner[p].load_state_dict(sd)
            self.store.adopt(p, self.inner[p].state[p])
        self._link()


def _per_parameter(state_dict: Any, n: int) -> list[dict[str, Any]]:
    """The ``n`` inner optimizers' state dicts of a saved ``state_dict`` (torch's format, or the
    earlier ``{"per_parameter": [...]}``), in parameter order."""
    expect = f"optimizer state: expected {n} per-parameter states (a run with the same optimizer options)"
    if isinstance(state_dict, dict) and isinstance(state_dict.get("per_parameter"), list):
        saved = state_dict["per_parameter"]
        if len(saved) != n:
            raise ValueError(f"{expect}, got {len(saved)}")
        return saved
    groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
    if not isinstance(groups, list) or len(groups) != n or any(len(g.get("params", ())) != 1 for g in groups):
        got = f"{len(groups)} groups" if isinstance(groups, list) else type(state_dict).__name__
        raise ValueError(f"{expect}, got {got}")
    state = state_dict.get("state", {})
    out = []
    for g in groups:
        (i,) = g["params"]
        out.append({"state": {0: state[i]} if i in state else {}, "param_groups": [{**g, "params": [0]}]})
    return out
