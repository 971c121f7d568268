"""8-bit AdamW (``--optimizer adamw-8bit``): AdamW whose two moments are stored blockwise-quantized
(``blockwise.py``: a signed dynamic map for the first moment, an unsigned one for the second), so
the state is ~2.03 bytes per parameter instead of 8 (fp32) or 4 (bf16 moments).

One update of a parameter p with gradient g (decoupled weight decay, bias-corrected, as
``torch.optim.AdamW``), computed in fp32 whatever p's dtype, ~``CHUNK`` elements at a time (whole
rows), so the fp32 scratch is a few chunk-sized tensors, never p-sized::

    m, v   = deq(m8), deq(v8)
    m      = b1 m + (1 - b1) g
    v      = b2 v + (1 - b2) g^2
    p      = p (1 - lr wd) - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    m8, v8 = q(m), q(v)

``kernel``: "torch" (the reference above), "triton" (``triton_adamw8bit.py``: the same update in
one launch per tensor) or "auto" (default: Triton for CUDA tensors when it imports, else torch).

Which tensors are 8-bit: matrices (``ndim >= 2``) of at least ``min_8bit_size`` elements. Smaller
ones (norm weights of small models, LoRA factors) and every 1-D tensor keep fp32 moments: their
quantization would save little and cost accuracy (bitsandbytes' default threshold is the same
4096), and a vector's blocks could not follow a row split (below).

State layout (``optimizer.state[p]``): ``step`` (int) and either ``m_codes``/``v_codes`` (uint8,
**p's shape**) with ``m_absmax``/``v_absmax`` (fp32 ``[rows, ceil(cols / BLOCK)]``, rows = p's dim
0, cols the rest: ``blockwise.scale_shape``), or ``exp_avg``/``exp_avg_sq`` (fp32, p's shape).
Quantization blocks run along a row and never cross into the next, so every state tensor splits
along dim 0 exactly as p does. Under FSDP2 (p a DTensor sharded ``Shard(0)``) each state tensor is
a DTensor with p's mesh and placements over this rank's rows, the update runs on the local shards
(``to_local()``: no communication), and DCP / ``get_state_dict`` save and reshard the state to any
number of ranks like plain AdamW's -- one process included: the single-process state is the same
global tensors. (A row costs one extra partial block when cols is not a multiple of BLOCK.)

``load_state_dict`` restores every state tensor in its saved dtype, bit for bit (torch's
``Optimizer.load_state_dict`` would cast uint8 codes and fp32 scales to the parameter's dtype).
States saved in the earlier flat layout (codes [numel], scales [ceil(numel / BLOCK)], blocks
running across rows) are converted where that is exact -- matrices whose cols are a multiple of
BLOCK (every Llama matrix: the blocks were the same), 1-D tensors (their dequantized moments
become the fp32 ones) -- and refused with one line otherwise (:func:`upgrade_state`).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch

from . import blockwise

CHUNK = 1 << 22  # elements per fp32 working chunk (a multiple of blockwise.BLOCK)
MIN_8BIT_SIZE = 4096
_CODE_KEYS = ("m_codes", "m_absmax", "v_codes", "v_absmax")


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: writes land in it); a plain tensor as is."""
    return t.to_local() if hasattr(t, "to_local") else t


def _shaped_like(p: torch.Tensor, local: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``local`` (this rank's rows of a state tensor of global ``shape``) as a DTensor placed like
    ``p`` when p is one, else ``local`` itself. Only row splits (Shard(0)) and replication keep the
    state's rows aligned with p's."""
    if not hasattr(p, "device_mesh"):
        return local
    from torch.distributed.tensor import DTensor

    for pl in p.placements:
        if not (pl.is_replicate() or (pl.is_shard() and pl.dim == 0)):
            raise NotImplementedError(f"AdamW8bit: parameter placement {pl} (only Shard(0) and Replicate)")
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=torch.Size(shape),
                              stride=stride)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with blockwise 8-bit moments; the ``torch.optim.AdamW`` hyperparameters."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, min_8bit_size: int = MIN_8BIT_SIZE,
                 kernel: str = "auto") -> None:
        if kernel not in ("auto", "torch", "triton"):
            raise ValueError(f"AdamW8bit kernel {kernel!r}: expected auto, torch or triton")
        if lr <= 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or weight_decay < 0:
            raise ValueError(f"AdamW8bit: bad hyperparameters lr={lr} betas={betas} eps={eps} wd={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.min_8bit_size = int(min_8bit_size)
        self.kernel = kernel
        self._maps: dict[tuple[str, bool], tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ maps per device
    def _map(self, device: torch.device, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        key = (str(device), signed)
        if key not in self._maps:
            qmap = blockwise.dynamic_map(signed, device)
            self._maps[key] = (qmap, blockwise.midpoints(qmap))
        return self._maps[key]

    def quantized(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s moments are stored in 8 bits (decided on the global shape: every rank agrees)."""
        return quantized(p.shape, self.min_8bit_size)

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        state["step"] = 0
        local = _local(p)
        if self.quantized(p):
            scales = blockwise.scale_shape(p.shape)
            zero_m = int(torch.searchsorted(self._map(p.device, True)[1], torch.zeros((), device=p.device)))
            # Codes of 0 (signed: the middle of the map; unsigned: 0) with absmax 0: exact zeros.
            # This rank's rows of each (its shard of p's rows; all of them in one process).
            codes = lambda fill: torch.full(local.shape, fill, dtype=torch.uint8, device=local.device)
            absmax = lambda: torch.zeros((local.shape[0], scales[1]), dtype=torch.float32, device=local.device)
            state["m_codes"] = _shaped_like(p, codes(zero_m), p.shape)
            state["m_absmax"] = _shaped_like(p, absmax(), scales)
            state["v_codes"] = _shaped_like(p, codes(0), p.shape)
            state["v_absmax"] = _shaped_like(p, absmax(), scales)
        else:
            for k in ("exp_avg", "exp_avg_sq"):
                state[k] = _shaped_like(p, torch.zeros(local.shape, dtype=torch.float32, device=local.device), p.shape)
        return state

    # ------------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        if p.grad.is_sparse:
            raise RuntimeError("AdamW8bit does not support sparse gradients")
        state = self.state[p] if len(self.state[p]) else self._init_state(p)
        state["step"] += 1
        t = state["step"]
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        hp = (lr, b1, b2, eps, wd, 1.0 - b1**t, (1.0 - b2**t) ** 0.5)
        pl, gl = _local(p), _local(p.grad)  # this rank's rows (FSDP: the shard; its gradient is sharded alike)
        if not self.quantized(p):
            _adamw_fp32(pl, gl, _local(state["exp_avg"]), _local(state["exp_avg_sq"]), *hp)
            return
        if not pl.is_contiguous():
            raise RuntimeError("AdamW8bit needs contiguous parameters")
        if pl.numel() == 0:  # a rank that holds none of p's rows
            return
        local = {k: _local(state[k]) for k in _CODE_KEYS}
        smap, umap = self._map(p.device, True), self._map(p.device, False)
        if self._use_triton(p):
            from .triton_adamw8bit import adamw8bit_update_triton

            adamw8bit_update_triton(pl, gl, local, (smap, umap), hp)
            return
        rows, cols = pl.shape[0], pl.numel() // pl.shape[0]
        pf, gf = pl.view(rows, cols), gl.reshape(rows, cols)  # p is contiguous (a parameter); the grad may be a view
        mc, vc = local["m_codes"].view(rows, cols), local["v_codes"].view(rows, cols)
        ma, va = local["m_absmax"], local["v_absmax"]
        # Whole rows per chunk, so that the fp32 working set (rows padded to whole blocks) is ~CHUNK.
        width = cols if cols <= blockwise.BLOCK else ma.shape[1] * blockwise.BLOCK
        step = max(1, CHUNK // width)
        for lo in range(0, rows, step):
            hi = min(lo + step, rows)
            m = blockwise.dequantize(mc[lo:hi], ma[lo:hi], smap[0])
            v = blockwise.dequantize(vc[lo:hi], va[lo:hi], umap[0])
            chunk = pf[lo:hi]
            p32 = chunk.float()
            _adamw_fp32(p32, gf[lo:hi], m, v, *hp)
            if p32.data_ptr() != chunk.data_ptr():  # 16-bit p: round the fp32 result once
                chunk.copy_(p32)
            mc[lo:hi], ma[lo:hi] = blockwise.quantize(m, *smap)
            vc[lo:hi], va[lo:hi] = blockwise.quantize(v, *umap)

    def _use_triton(self, p: torch.Tensor) -> bool:
        if self.kernel == "torch":
            return False
        from .triton_adamw8bit import triton_available

        if self.kernel == "triton":
            if not triton_available():
                raise RuntimeError("AdamW8bit(kernel='triton'): triton is not installed")
            return True
        return p.is_cuda and triton_available()

    # -------------------------------------------------------------------- state dicts
    def upgrade_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` (this optimizer's, keyed by parameter position) with every state in this
        layout (:func:`upgrade_state`); raises ValueError naming the parameter where it cannot be."""
        saved = state_dict["state"]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        state = dict(saved)
        for i, p in zip(ids, params):
            if i in saved:
                state[i] = upgrade_state(saved[i], tuple(p.shape), self.quantized(p), f"parameter {i}")
        return {**state_dict, "state": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loading (groups, ids), then every state value as saved: codes stay uint8 and
        scales fp32 (bit for bit), on the parameter's device (DTensors as loaded: already sharded)."""
        state_dict = self.upgrade_state_dict(state_dict)
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            if i in saved:
                self.state[p] = {k: v.to(device=p.device, copy=True) if torch.is_tensor(v) else v
                                 for k, v in saved[i].items()}


def quantized(shape: Sequence[int], min_8bit_size: int = MIN_8BIT_SIZE) -> bool:
    """Whether a parameter of ``shape`` gets 8-bit moments: a matrix of >= ``min_8bit_size`` elements."""
    return len(shape) >= 2 and math.prod(shape) >= min_8bit_size


def upgrade_state(st: dict[str, Any], shape: tuple[int, ...], is_8bit: bool, name: str) -> dict[str, Any]:
    """One parameter's saved state in this layout. States in it pass through; the flat layout of
    earlier versions (codes [numel], scales [ceil(numel / BLOCK)]) is converted where that is exact
    and refused with one line (ValueError) otherwise."""
    has_codes = "m_codes" in st
    if not has_codes:
        if is_8bit and "exp_avg" in st:
            raise ValueError(f"8-bit AdamW state of {name} {list(shape)}: saved with fp32 moments, but this "
                             "optimizer keeps 8-bit ones for it (a different min_8bit_size?)")
        return st
    codes, absmax = st["m_codes"], st["m_absmax"]
    rest = {k: v for k, v in st.items() if k not in _CODE_KEYS}
    if not is_8bit:
        if len(shape) >= 2:
            raise ValueError(f"8-bit AdamW state of {name} {list(shape)}: saved with 8-bit moments, but this "
                             "optimizer keeps fp32 ones for it (a different min_8bit_size?)")
        # The flat layout quantized large vectors; their dequantized moments are what the next
        # update would have read: they become the fp32 moments.
        qs, qu = blockwise.dynamic_map(True, codes.device), blockwise.dynamic_map(False, codes.device)
        return {**rest, "exp_avg": blockwise.dequantize(codes.reshape(-1), absmax.reshape(-1), qs).view(shape),
                "exp_avg_sq": blockwise.dequantize(st["v_codes"].reshape(-1), st["v_absmax"].reshape(-1), qu).view(shape)}
    scales = blockwise.scale_shape(shape)
    if tuple(codes.shape) == tuple(shape) and tuple(absmax.shape) == scales:
        return st
    rows, cols = blockwise.row_shape(shape)
    if codes.dim() == 1 and codes.numel() == rows * cols and absmax.numel() == math.prod(scales) \
            and cols % blockwise.BLOCK == 0:
        # Rows of whole blocks: the flat blocks were exactly the per-row ones.
        return {**rest, "m_codes": codes.view(shape), "m_absmax": absmax.view(scales),
                "v_codes": st["v_codes"].view(shape), "v_absmax": st["v_absmax"].view(scales)}
    raise ValueError(
        f"8-bit AdamW state of {name} {list(shape)}: codes {list(codes.shape)} and scales {list(absmax.shape)} "
        f"are not this layout (codes {list(shape)}, scales {list(scales)}); a flat-layout state whose blocks "
        f"cross rows ({cols} columns, not a multiple of {blockwise.BLOCK}) cannot be converted exactly: resume "
        "from a newer checkpoint or start the optimizer afresh")


def _adamw_fp32(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, lr: float, b1: float, b2: float,
                eps: float, wd: float, bc1: float, bc2_sqrt: float) -> None:
    """One AdamW update in place on fp32 ``p``, ``m``, ``v`` (same shape); ``g`` any float dtype.
    The order of operations is torch.optim.AdamW's single-tensor path."""
    g = g.float()
    if wd:
        p.mul_(1.0 - lr * wd)
    m.lerp_(g, 1.0 - b1)
    v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
    denom = (v.sqrt() / bc2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-lr / bc1)


def state_bytes(shape: int | Sequence[int], min_8bit_size: int = MIN_8BIT_SIZE) -> int:
    """Bytes of state :class:`AdamW8bit` keeps for one parameter tensor of ``shape`` (the int
    ``step`` is not a tensor); under FSDP the sum over the ranks' shards. An int (the element
    count only) is counted as a matrix whose rows are whole blocks -- exact for every Llama matrix,
    but 1-D tensors of >= ``min_8bit_size`` elements keep fp32 moments: pass shapes to be exact."""
    if isinstance(shape, int):
        numel = shape
        if numel < min_8bit_size:
            return 2 * 4 * numel
        return 2 * (numel + 4 * blockwise.n_blocks(numel))
    shape = tuple(int(d) for d in shape)
    if not quantized(shape, min_8bit_size):
        return 2 * 4 * math.prod(shape)
    return 2 * blockwise.quantized_bytes(shape)


def scratch_bytes(numel: int) -> int:
    """fp32 working memory of one update of a tensor of ``numel`` elements: dequantized m, v, the
    fp32 parameter, gradient, sqrt and denominator of one chunk, plus the quantizer's int64
    indices and scaled copy (an upper bound)."""
    n = min(numel, CHUNK)
    return n * (6 * 4 + 8 + 4)
