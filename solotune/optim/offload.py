"""Optimizer-state offload (``--offload optimizer``): every parameter's optimizer state lives in
pinned host memory and visits the device only for that parameter's update.

:class:`HostStates` is the state store of a :class:`~solotune.optim.per_param.PerParamOptimizer`
(``store.py``'s interface). Around the update of parameter p:

* **fetch**: p's state comes to the device: the copy prefetched earlier (the compute stream waits
  for its event), or a copy made now.
* **prefetch**: the state of the parameter updated next starts its host-to-device copy on a side
  stream, overlapping p's update (and, in backward, the backward of the layers still to come).
* **release**: after the update the side stream waits for the compute stream and copies the state
  back into its pinned host buffers (allocated at the first update, when the inner optimizer has
  created its state on the device); the device copies stay referenced until the copy is retired
  (the compute stream waits for its event, then the reference goes), so the allocator hands that
  memory to later compute only after the copy read it. At most ``max_in_flight`` are pending.
* **flush** (the end of ``optimizer.step()``, ``state_dict()``): the host waits for every copy.

The update itself runs on the device with the inner optimizer (fused AdamW, 8-bit AdamW): the
weights and their gradients never leave it, only the state crosses PCIe, twice per step (8-bit
AdamW: ~2 bytes per parameter each way; fp32 AdamW moments: 8). With optimizer-in-backward the
updates run in the gradient hooks, so the copies overlap the backward of the earlier layers.
No fp32 master weights are kept: the update is computed in fp32 from the parameter as it is
(pure bf16 rounds each update once, as on the device).

Host memory (:class:`HostArena`): torch's caching host allocator rounds every pinned allocation up
to a power of two, so one pinned tensor per state would lock up to twice its bytes (a 7B w1's
45 MB 8-bit moment takes 64 MiB: ~30% more RAM over the whole model). The host tensors are views
packed into a few pinned slabs instead (each slab a power of two, so it is exact), at most
``ARENA_SLAB_BYTES`` each once the states outgrow that.

On CPU the "host" copy goes into unpinned slabs, so the whole mechanism runs in the CPU tests and
is an exact pass-through (``tests/optim/test_in_backward.py``: offloaded == on-device, bit for bit).

Device memory: the states of at most ``max_in_flight + 2`` parameters at once (the one updated,
the one prefetched, the pending copies back), i.e. a few times the largest tensor's state.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

import torch

ARENA_SLAB_BYTES = 256 << 20  # the largest slab that holds several states (a bigger state gets its own)
_ALIGN = 512  # bytes between views: any dtype's alignment, and the allocator's smallest pinned block


class HostArena:
    """Host tensors carved from (pinned) uint8 slabs, first fit, one set of slabs per dtype (torch.save
    refuses views of one storage as different dtypes, and the trainer state is saved so). A new slab
    is a power of two: at least the tensor, at least the bytes of that dtype handed out so far (the
    slabs double, so a small store stays small), at most ``slab_bytes`` unless the tensor is larger.
    Views are never freed one by one: the slabs live as long as the store (as the states do)."""

    def __init__(self, pin: bool, slab_bytes: int = ARENA_SLAB_BYTES) -> None:
        self.pin, self.slab_bytes = pin, slab_bytes
        self.slabs: dict[torch.dtype, list[_Slab]] = {}

    @property
    def reserved_bytes(self) -> int:
        """Host bytes the slabs hold (what is locked when pinned)."""
        return sum(s.buf.numel() for slabs in self.slabs.values() for s in slabs)

    def empty_like(self, t: torch.Tensor) -> torch.Tensor:
        """An uninitialised contiguous host tensor of ``t``'s shape and dtype."""
        n = t.numel() * t.element_size()
        need = max(_ALIGN, -(-n // _ALIGN) * _ALIGN)
        slabs = self.slabs.setdefault(t.dtype, [])
        slab = next((s for s in slabs if s.buf.numel() - s.used >= need), None)
        if slab is None:
            size = max(need, min(self.slab_bytes, sum(s.buf.numel() for s in slabs)))
            slab = _Slab(torch.empty(1 << (size - 1).bit_length(), dtype=torch.uint8, pin_memory=self.pin))
            slabs.append(slab)
        start = slab.used
        slab.used += need
        return slab.buf[start:start + n].view(t.dtype).view(t.shape)


@dataclass
class _Slab:
    buf: torch.Tensor  # uint8 [2**k], pinned on CUDA
    used: int = 0  # bytes handed out (aligned)


class HostStates:
    """Optimizer states in (pinned) host memory, streamed to ``device`` for each update."""

    def __init__(self, device: torch.device | str, max_in_flight: int = 2) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.max_in_flight = max(1, int(max_in_flight))
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.arena = HostArena(pin=self.cuda)
        self.host: dict[int, dict[str, torch.Tensor]] = {}  # id(p) -> its state's host tensors (arena views)
        self.ready: dict[int, tuple[dict[str, torch.Tensor], Any]] = {}  # prefetched: (device tensors, event)
        self.pending: collections.deque[tuple[Any, dict[str, torch.Tensor]]] = collections.deque()
        self.moved_bytes = 0  # bytes copied either way (tests, benchmarks)

    # ------------------------------------------------------------------ copies
    def _to_device(self, host: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
        """Start the host-to-device copies on the side stream; (device tensors, event)."""
        dev = {k: torch.empty_like(v, device=self.device) for k, v in host.items()}  # on the compute stream
        self.moved_bytes += sum(v.nbytes for v in host.values())
        if not self.cuda:
            for k, v in host.items():
                dev[k].copy_(v)
            return dev, None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # dev's memory is free for us
        with torch.cuda.stream(self.stream):
            for k, v in host.items():
                dev[k].copy_(v, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        return dev, ev

    def _host_like(self, t: torch.Tensor) -> torch.Tensor:
        return self.arena.empty_like(t)

    def _tensors(self, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in state.items() if torch.is_tensor(v)}

    # --------------------------------------------------------------- interface
    def prefetch(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        key = id(p)
        if key in self.host and key not in self.ready:
            self.ready[key] = self._to_device(self.host[key])

    def fetch(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        key = id(p)
        if key not in self.host:
            return  # the first update: the inner optimizer creates the state on the device
        dev, ev = self.ready.pop(key) if key in self.ready else self._to_device(self.host[key])
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)
        state.update(dev)

    def release(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        dev = self._tensors(state)
        key = id(p)
        if key not in self.host:
            self.host[key] = {k: self._host_like(v) for k, v in dev.items()}
        host = self.host[key]
        self.moved_bytes += sum(v.nbytes for v in dev.values())
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the update is done
            with torch.cuda.stream(self.stream):
                for k, v in dev.items():
                    host[k].copy_(v, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.stream)
            self.pending.append((ev, dev))
            while len(self.pending) > self.max_in_flight:
                self._retire()
        else:
            for k, v in dev.items():
                host[k].copy_(v)
        state.update(host)

    def _retire(self) -> None:
        ev, _dev = self.pending.popleft()
        torch.cuda.current_stream(self.device).wait_event(ev)  # later compute may reuse _dev's memory

    def adopt(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        """A loaded state (on the device): its host buffers, filled synchronously."""
        dev = self._tensors(state)
        if not dev:
            return
        self.host[id(p)] = {k: self._host_like(v).copy_(v) for k, v in dev.items()}
        self.ready.pop(id(p), None)
        state.update(self.host[id(p)])

    def flush(self) -> None:
        while self.pending:
            ev, _ = self.pending.popleft()
            ev.synchronize()
        for _, ev in self.ready.values():  # a prefetch nobody used (a parameter without a gradient)
            if ev is not None:
                ev.synchronize()
        self.ready.clear()
