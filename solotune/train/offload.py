"""Activation offload (``--offload activations``): tensors saved for backward go to host memory
during the forward and come back during the backward, bit for bit.

With gradient checkpointing, what a checkpointed block keeps for backward is its inputs: the hidden
state h [B, T, C], the RoPE cos/sin [B, T, 1, D/2] (one storage shared by every block) and, for
packed rows, the document mask. Moving them to pinned host memory leaves about one block's worth of
saved activations on the GPU, for B*T*C*(bytes per element) per layer over PCIe each way, copied on
a side stream while the compute stream goes on.

Mechanism: a ``torch.autograd.graph.saved_tensors_hooks`` context (:class:`ActivationOffload`),
entered around one micro-batch's forward + backward.

* **What moves.** Storages of activations on the training device of at least ``min_bytes``. Not
  parameters or buffers, nor views of them (same storage: a weight kept for backward costs nothing),
  nor autocast's 16-bit weight copies (``W.t()`` of a cast weight: the rule of
  ``bench/anatomy.py``, so what moves is what the anatomy calls activations), nor tensors on
  another device (the CPU RNG scalars CUDA attention saves), nor anything saved during backward.
  A storage moves once however many views of it are saved (the cos/sin of every block: one copy)
  and comes back with each view's dtype, offset, size and strides, so backward reads tensors
  identical in bits and layout to the ones it saved.
* **Forward (pack).** The side stream waits for the compute stream, copies the storage into pinned
  host memory (non-blocking) and records an event. The context keeps the device storage referenced
  until it *retires* the copy: the compute stream waits for the event, then the reference is
  dropped, so the allocator hands that memory to later compute only after the copy has read it (no
  ``record_stream``: memory is returned at a known point, not whenever the allocator next polls).
  At most ``max_in_flight`` copies are pending; the oldest is retired as a new one starts.
* **Host memory.** PyTorch's caching host allocator rounds every pinned allocation up to a power
  of two, so one buffer per storage would lock up to twice its bytes of RAM (a 310k-token row's
  2.5 GB block input takes 4 GiB: 128 GiB for 32 blocks). Each host copy is therefore a list of
  pinned pieces whose sizes are powers of two summing to the storage's bytes
  (:func:`host_piece_sizes`): exact, and the same sizes every step, which the allocator's cache
  reuses. The allocator also keeps each piece alive until the copies that use it have finished.
* **Backward (unpack).** The first unpack gives the still-pending storages (the last ones saved:
  the loss and the last blocks, needed first) to their entries as they are: no round trip. Every
  other entry comes back once, either prefetched (the side stream copies it; the compute stream
  waits for its event before use) or on demand on the compute stream (after waiting for its
  device-to-host copy). Each unpack prefetches the entry saved just before the one unpacked, which
  is what backward needs next: with checkpointing, unpacking block i's input starts the copy of
  block i-1's input, which overlaps block i's recomputation and backward. A brought-back storage
  lives as long as the saved tensors that use it (it dies with the autograd nodes that hold them).

Checkpointing (``torch.utils.checkpoint(use_reentrant=False)``, as ``Transformer.forward`` calls it):
the checkpoint saves its inputs (h, cos, sin, mask) through the *ambient* hooks, i.e. these, and
installs its own hooks for everything inside the block; torch calls only the innermost hooks, so a
checkpointed block's internal tensors are never seen here. In backward, the recomputation runs
under checkpoint's recomputation hooks (never these) and fetches its inputs by unpacking them, which
is where they come back. Blocks that are not checkpointed save their internals through these hooks
and they are offloaded like anything else: correct, but PCIe-bound, so offload pays with
checkpointing ``all`` (or ``every:K``) and is wasteful with ``off``.

Autocast: the hooks see whatever dtype autocast produced and copy bytes, so nothing changes
numerically; checkpoint re-enters the forward's autocast state for the recomputation by itself.

Other hooks: tensors this context does not offload are handed to the hooks that were active when it
was entered (torch would otherwise call only these), so a measurement around it
(``AnatomyInstrument.forward_context``) sees exactly what stays on the device.

Not with FSDP2 (``parallel/``): its unsharded weights are plain tensors over all-gather buffers that
it frees by resizing their storage after each block, so they would be copied as activations while
being freed. Activation offload is a one-GPU technique; the config should refuse the pair.

On CPU the "host" copy goes into separate (unpinned) CPU pieces and back, so the whole mechanism
(selection, dedup, views, pieces, retiring, prefetch) runs in the CPU tests and a CPU run is an
exact pass-through.
"""

from __future__ import annotations

import collections
import contextlib
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

OFFLOAD_KINDS: tuple[str, ...] = ("none", "activations")

_HALF = (torch.float16, torch.bfloat16)
HOST_PIECE_BYTES = 64 << 20  # largest pinned piece: ~3 ms of PCIe, a few µs of launch per copy
_SMALLEST_PIECE = 512
HOST_RESERVE_BYTES = 2 << 30  # host RAM left to everything else when pinning more

class HostOutOfMemory(torch.OutOfMemoryError):
    """The host ran out of RAM to pin for offloaded activations (not the GPU: the remedies differ)."""


Pack = Callable[[torch.Tensor], Any]
Unpack = Callable[[Any], torch.Tensor]


def offload_context(kind: str, model: nn.Module, device: torch.device | str, *, min_bytes: int | None = None,
                    max_in_flight: int | None = None) -> contextlib.AbstractContextManager:
    """The context to enter around each micro-batch's forward + backward: a ``nullcontext`` for
    ``"none"``, an :class:`ActivationOffload` for ``"activations"``. Build it once per run (it owns
    the side stream) and enter it once per micro-batch."""
    if kind in ("none", "", None):
        return contextlib.nullcontext()
    if kind == "activations":
        kw = {k: v for k, v in (("min_bytes", min_bytes), ("max_in_flight", max_in_flight)) if v is not None}
        return ActivationOffload(model, device, **kw)
    raise ValueError(f"offload {kind!r}: expected one of {', '.join(OFFLOAD_KINDS)}")


@dataclass
class OffloadStats:
    """What the hooks did, summed over every window (``with`` block) of one :class:`ActivationOffload`.

    Invariant once every saved tensor has been unpacked: ``offloaded_bytes == reloaded_bytes +
    reused_bytes``.
    """

    windows: int = 0  # times the context was entered (micro-batches)
    saved: int = 0  # tensors autograd saved in the forward while the context was active
    offloaded: int = 0  # distinct storages copied to the host
    offloaded_bytes: int = 0
    reloaded_bytes: int = 0  # copied back to the device (prefetched or on demand)
    reused_bytes: int = 0  # still pending at the first unpack: used where they were, no copy back
    prefetched: int = 0  # copies back started ahead of their unpack
    kept: int = 0  # distinct activation storages below min_bytes, left on the device
    kept_bytes: int = 0
    host_bytes: int = 0  # host copies alive now
    host_peak_bytes: int = 0  # most host bytes alive at once


class _Entry:
    """One offloaded device storage: its host copy, and the device copy once it is back."""

    __slots__ = ("window", "source", "nbytes", "host", "copied", "device", "ready", "seq", "__weakref__")

    def __init__(self, window: "_Window", source: torch.UntypedStorage, nbytes: int) -> None:
        self.window = window  # for the pack order (prefetch)
        self.source = weakref.ref(source)  # identity of the original storage (dedup), never kept alive
        self.nbytes = nbytes
        self.host: list[torch.Tensor] | None = None  # uint8 pieces (host_piece_sizes); pinned on CUDA
        self.copied: torch.cuda.Event | None = None  # device-to-host copy finished (None on CPU)
        self.device: torch.Tensor | None = None  # uint8 [nbytes] on the device once back (or reused)
        self.ready: torch.cuda.Event | None = None  # prefetch finished; None = usable on the compute stream
        self.seq = -1  # last position in the window's pack order


class _Saved:
    """What autograd keeps for one offloaded saved tensor: its entry and how to view it."""

    __slots__ = ("entry", "dtype", "offset", "size", "stride")

    def __init__(self, entry: _Entry, t: torch.Tensor) -> None:
        self.entry, self.dtype = entry, t.dtype
        self.offset, self.size, self.stride = t.storage_offset(), t.size(), t.stride()


class _Passed:
    """A saved tensor left on the device, as packed by the hooks that were active outside (if any)."""

    __slots__ = ("value", "unpack")

    def __init__(self, value: Any, unpack: Unpack | None) -> None:
        self.value, self.unpack = value, unpack


class _Window:
    """State of one ``with`` block: dedup maps, the pack order, the copies not yet retired."""

    def __init__(self) -> None:
        self.entries: dict[int, weakref.ref[_Entry]] = {}  # storage key -> entry
        self.kept: dict[int, weakref.ref[torch.UntypedStorage]] = {}  # storages counted as kept
        self.order: list[weakref.ref[_Entry]] = []  # one slot per offloaded pack (an entry's latest is its seq)
        self.pending: collections.deque[tuple[_Entry, torch.Tensor]] = collections.deque()  # (entry, device bytes)


def host_piece_sizes(nbytes: int, largest: int = HOST_PIECE_BYTES) -> list[int]:
    """Sizes of the pinned buffers that hold ``nbytes`` (a power-of-two ``largest``): whole
    ``largest`` pieces, then the rest's binary digits from the top, the last at least 512 bytes.
    They sum to ``nbytes`` exactly unless the rest ends in under 512 bytes (then < 512 more)."""
    if largest < _SMALLEST_PIECE or largest & (largest - 1):
        raise ValueError(f"largest piece {largest} must be a power of two >= {_SMALLEST_PIECE}")
    sizes = [largest] * (nbytes // largest)
    rest = nbytes % largest
    while rest > _SMALLEST_PIECE:
        sizes.append(1 << (rest.bit_length() - 1))
        rest -= sizes[-1]
    if rest:
        sizes.append(_SMALLEST_PIECE)
    return sizes


def _in_backward() -> bool:
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def _outer_hooks() -> tuple[Pack, Unpack] | None:
    """The saved-tensor hooks active right now (the ones ours will hide), if torch tells us."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(False) if top is not None else None


def _available_host_bytes() -> int | None:
    """The host RAM the kernel can still give (``MemAvailable`` of /proc/meminfo); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cached_pinned_bytes() -> int:
    """Pinned bytes torch's caching host allocator holds but has not handed out (0 where unknown)."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    try:
        st = stats() if stats is not None else {}
        if "allocated_bytes.current" not in st or "active_bytes.current" not in st:
            return 0  # an older torch's statistics: assume nothing cached (the check is then stricter)
        return max(0, int(st["allocated_bytes.current"]) - int(st["active_bytes.current"]))
    except (RuntimeError, TypeError, ValueError):
        return 0


def _host_empty(nbytes: int, pin: bool) -> torch.Tensor:
    """A uint8 [nbytes] host buffer, pinned when ``pin`` (torch's caching host allocator)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)


def _copy_pieces(pieces: list[torch.Tensor], dev: torch.Tensor, *, to_host: bool) -> None:
    """Copy uint8 ``dev`` [n] into (``to_host``) or out of the host ``pieces``, in order, on the
    current stream; non-blocking (pinned pieces make it asynchronous on CUDA)."""
    offset, n = 0, dev.numel()
    for piece in pieces:
        k = min(piece.numel(), n - offset)
        if to_host:
            piece[:k].copy_(dev[offset:offset + k], non_blocking=True)
        else:
            dev[offset:offset + k].copy_(piece[:k], non_blocking=True)
        offset += k


def _bytes_of(storage: torch.UntypedStorage, device: torch.device) -> torch.Tensor:
    """A uint8 [nbytes] tensor over the whole storage (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage)


class ActivationOffload:
    """Offload saved activations to host memory for the forward + backward run inside ``with``.

    model: its parameters and buffers are never offloaded; its 2-D weight shapes identify
        autocast's weight copies (re-read at every ``with``, so swapped modules are seen).
    device: the training device (``cuda[:i]`` copies to pinned memory on a side stream; ``cpu``
        copies to unpinned pieces, for tests).
    min_bytes: storages smaller than this stay on the device (a copy's fixed cost outweighs them;
        the default keeps per-token scalars like RMSNorm's [B, T, 1] statistics of short rows).
    max_in_flight: device-to-host copies that may be pending before the compute stream waits for the
        oldest; each pins its device storage until then. 0 = every copy is waited for at once.
    host_piece_bytes: the largest pinned piece of a host copy (a power of two; see the module doc).
    """

    def __init__(self, model: nn.Module, device: torch.device | str, *, min_bytes: int = 1 << 16,
                 max_in_flight: int = 2, host_piece_bytes: int = HOST_PIECE_BYTES) -> None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"activation offload supports cuda and cpu devices, not {device}")
        if min_bytes < 0 or max_in_flight < 0:
            raise ValueError(f"min_bytes ({min_bytes}) and max_in_flight ({max_in_flight}) must be >= 0")
        self.model, self.device = model, device
        self.min_bytes, self.max_in_flight = min_bytes, max_in_flight
        host_piece_sizes(0, host_piece_bytes)  # validates it
        self.host_piece_bytes = host_piece_bytes
        self.stats = OffloadStats()
        self._cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self._cuda else None
        self._window: _Window | None = None
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self._outer: tuple[Pack, Unpack] | None = None
        self._model_storages: set[int] = set()
        self._weight_shapes: set[tuple[int, int]] = set()

    # --------------------------------------------------------------------- context
    def __enter__(self) -> "ActivationOffload":
        if self._window is not None:
            raise RuntimeError("ActivationOffload is already active (enter it once per micro-batch)")
        tensors = [*self.model.parameters(), *self.model.buffers()]
        # Wrapper subclasses (DTensor shards, quantized weights) have no plain storage to compare.
        self._model_storages = {t.untyped_storage()._cdata for t in tensors if type(t) in (torch.Tensor, nn.Parameter)}
        self._weight_shapes = {tuple(p.shape) for m in self.model.modules() if not isinstance(m, nn.Embedding)
                               for p in m.parameters(recurse=False) if p.ndim == 2}
        self._outer = _outer_hooks()
        self._window = _Window()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        self.stats.windows += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._hooks is not None and self._window is not None
        self._hooks.__exit__(*exc)
        # A forward without its backward inside: the copies still pending are retired, so backward
        # (whenever it runs) brings everything back from the host.
        while self._window.pending:
            self._retire(*self._window.pending.popleft())
        self._hooks, self._window, self._outer = None, None, None

    # ------------------------------------------------------------------------ pack
    def _pack(self, t: torch.Tensor) -> Any:
        if _in_backward():
            return self._pass(t)  # double backward / reentrant recomputation: not ours to move
        self.stats.saved += 1
        if not self._is_activation(t):
            return self._pass(t)
        win = self._window
        assert win is not None
        st = t.untyped_storage()
        key = st._cdata
        ref = win.entries.get(key)
        entry = ref() if ref is not None else None
        if entry is None or entry.source() is not st:  # a new storage (a dead one's key may be reused)
            n = st.nbytes()
            if n == 0 or n < self.min_bytes:
                kept = win.kept.get(key)
                if kept is None or kept() is not st:
                    win.kept[key] = weakref.ref(st)
                    self.stats.kept += 1
                    self.stats.kept_bytes += n
                return self._pass(t)
            entry = self._offload(win, st, n)
            win.entries[key] = weakref.ref(entry)
        entry.seq = len(win.order)
        win.order.append(weakref.ref(entry))
        return _Saved(entry, t)

    def _pass(self, t: torch.Tensor) -> _Passed:
        if self._outer is None:
            return _Passed(t, None)
        pack, unpack = self._outer
        return _Passed(pack(t), unpack)

    def _is_activation(self, t: torch.Tensor) -> bool:
        """Plain strided tensor on our device that is not a parameter/buffer storage nor an autocast
        weight copy (W.t() of a 16-bit cast of a weight: anatomy's rule)."""
        if type(t) is not torch.Tensor or t.layout != torch.strided or t.device != self.device:
            return False  # nn.Parameter itself, tensor subclasses (quantized bases), sparse, other devices
        if t.is_conj() or t.is_neg() or t.is_quantized:
            return False  # lazy bits a storage copy would not carry
        if t.untyped_storage()._cdata in self._model_storages:
            return False
        n = t.untyped_storage().nbytes()
        return not (t.dtype in _HALF and t.dim() == 2 and t.stride() == (1, t.shape[0])
                    and (t.shape[1], t.shape[0]) in self._weight_shapes and n == t.numel() * t.element_size())

    def _offload(self, win: _Window, st: torch.UntypedStorage, n: int) -> _Entry:
        entry = _Entry(win, st, n)
        src = _bytes_of(st, self.device)
        entry.host = self._host_pieces(n)
        if self._cuda:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))  # src is computed
            with torch.cuda.stream(self._stream):
                _copy_pieces(entry.host, src, to_host=True)
            entry.copied = torch.cuda.Event()
            entry.copied.record(self._stream)
        else:
            _copy_pieces(entry.host, src, to_host=True)
        self._note_host(entry.host)
        self.stats.offloaded += 1
        self.stats.offloaded_bytes += n
        win.pending.append((entry, src))
        while len(win.pending) > self.max_in_flight:
            self._retire(*win.pending.popleft())
        return entry

    def _host_pieces(self, n: int) -> list[torch.Tensor]:
        """Host buffers for ``n`` bytes. Running out of host RAM is raised as an out-of-memory error
        naming the host (the training loop reports it in its one line): before locking more than
        the host has available, less ``HOST_RESERVE_BYTES`` (page-locked memory cannot be swapped:
        past that the kernel's OOM killer would end the run with no word), or when pinning fails."""
        held = self.stats.host_bytes
        if held + n > self.stats.host_peak_bytes:  # beyond what earlier windows held (the allocator's cache)
            free = _available_host_bytes()
            if free is not None and self._cuda:
                free += _cached_pinned_bytes()  # pinned blocks torch's allocator holds free (an earlier run's)
            if free is not None and n > free - HOST_RESERVE_BYTES:
                raise HostOutOfMemory(self._host_oom(n, f"{free / 2**30:.2f} GiB available"))
        try:
            return [_host_empty(k, self._cuda) for k in host_piece_sizes(n, self.host_piece_bytes)]
        except RuntimeError as e:
            if "out of memory" not in str(e).lower():
                raise
            raise HostOutOfMemory(self._host_oom(n, "pinning failed")) from e

    def _host_oom(self, n: int, why: str) -> str:
        return (f"pinned host memory: could not lock {n / 2**30:.2f} GiB more for offloaded activations ({why}, "
                f"{self.stats.host_bytes / 2**30:.2f} GiB held; `solotune plan --host-mem` checks the RAM needed)")

    def _retire(self, entry: _Entry, src: torch.Tensor) -> None:
        """The compute stream waits for the copy; then dropping ``src`` lets the allocator reuse it."""
        if entry.copied is not None:
            torch.cuda.current_stream(self.device).wait_event(entry.copied)
        del src

    def _note_host(self, pieces: list[torch.Tensor]) -> None:
        n = sum(p.numel() for p in pieces)
        self.stats.host_bytes += n
        self.stats.host_peak_bytes = max(self.stats.host_peak_bytes, self.stats.host_bytes)
        weakref.finalize(pieces[0], self._host_freed, n)  # the pieces are dropped together

    def _host_freed(self, n: int) -> None:
        self.stats.host_bytes -= n

    # ---------------------------------------------------------------------- unpack
    def _unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, _Passed):
            return packed.unpack(packed.value) if packed.unpack is not None else packed.value
        entry = packed.entry
        win = entry.window
        if win.pending:  # the first unpack of this window: backward has started
            self._hand_back_pending(win)
        if entry.device is None:
            self._bring_back(entry, prefetch=False)
        if entry.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(entry.ready)
            entry.ready = None
        self._prefetch_before(entry)
        return torch.empty(0, dtype=packed.dtype, device=self.device).set_(
            entry.device.untyped_storage(), packed.offset, packed.size, packed.stride)

    def _hand_back_pending(self, win: _Window) -> None:
        """Copies not retired yet still have their device storage: use it, drop the host copy. The
        compute stream waits for the copy first, so the storage is freed safely whenever it dies."""
        while win.pending:
            entry, src = win.pending.popleft()
            if entry.copied is not None:
                torch.cuda.current_stream(self.device).wait_event(entry.copied)
            entry.device, entry.host = src, None
            self.stats.reused_bytes += entry.nbytes

    def _bring_back(self, entry: _Entry, *, prefetch: bool) -> None:
        assert entry.host is not None
        # Allocated on the compute stream, so the allocator orders its reuse with compute.
        dev = torch.empty(entry.nbytes, dtype=torch.uint8, device=self.device)
        if not self._cuda:
            _copy_pieces(entry.host, dev, to_host=False)
        else:
            compute = torch.cuda.current_stream(self.device)
            if prefetch:
                self._stream.wait_stream(compute)  # dev's memory may still be read by queued compute
                with torch.cuda.stream(self._stream):  # after the D2H copy: same stream, in order
                    _copy_pieces(entry.host, dev, to_host=False)
                entry.ready = torch.cuda.Event()
                entry.ready.record(self._stream)
                dev.record_stream(self._stream)  # safe even if the entry dies before it is unpacked
            else:
                compute.wait_event(entry.copied)
                _copy_pieces(entry.host, dev, to_host=False)
        entry.device = dev
        entry.host = None  # the caching host allocator keeps pinned memory until its copies finish
        self.stats.reloaded_bytes += entry.nbytes

    def _prefetch_before(self, entry: _Entry) -> None:
        """Start bringing back the entry packed just before ``entry`` (the next one backward needs)."""
        order = entry.window.order
        for i in range(entry.seq - 1, -1, -1):
            prev = order[i]()
            if prev is not None and prev.seq == i:  # alive, and this slot is its latest pack
                if prev.device is None and prev.host is not None:
                    self._bring_back(prev, prefetch=True)
                    self.stats.prefetched += 1
                return
