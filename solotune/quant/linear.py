"""Frozen quantized linears that implement :class:`solotune.peft.base.LinearBase`, so a
``LoRALinear`` can wrap them (QLoRA): :class:`NF4Linear`, :class:`Int8Linear` and :class:`Fp8Linear`
(which computes in float8 instead of dequantizing: :mod:`solotune.quant.fp8`).

x [..., in] -> y [..., out] = x @ W'.T with W' = dequantize() [out, in] in the compute dtype:
the autocast dtype when autocast is on for x's device, else ``compute_dtype``. No bias.

Memory: the forward dequantizes W' for its matmul and drops it; the backward dequantizes again
for grad_x = grad_y @ W' (the ``solotune::quant_linear`` custom op, :mod:`solotune.quant.ops`,
which ``torch.compile`` captures in the block's graph). A plain ``F.linear(x, W')`` would keep
W' alive for its backward: one 16-bit copy of every quantized layer between forward and
backward, i.e. the 16-bit model back. No gradient ever flows to the quantized weight.

Stored state is buffers (``.to(device)`` moves them; ``state_dict`` has them). The fp32 scales
are kept as their int32 bit patterns: ``model.to(torch.bfloat16)`` casts every floating buffer
and would silently round the scales; an integer buffer it leaves alone.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fp8 import FP8, dequantize_fp8, fp8_linear, quantize_fp8
from .int8 import dequantize_int8, quantize_int8
from .dequant import dequantize_nf4
from .nf4_fp8 import nf4_fp8_linear, nf4_row_scales
from .ops import quant_linear
from .nf4 import BLOCKSIZE, SCALE_BLOCKSIZE, NF4Weight, nf4_storage_shapes, quantize_nf4, tables_on


def _bits(t: torch.Tensor) -> torch.Tensor:
    """fp32 tensor -> its int32 bit pattern (same storage size)."""
    return t.to(torch.float32).contiguous().view(torch.int32)


def _fp32(bits: torch.Tensor) -> torch.Tensor:
    return bits.view(torch.float32)


class QuantizedLinear(nn.Module):
    """What NF4 and int8 share: shapes, compute dtype, the frozen forward, the LinearBase surface."""

    writable = False  # merging into 4/8 bits would lose the delta: merge is the export path's
    # bytes per weight of the transient its matmul makes, in the compute dtype's units: a dequantizing
    # base makes the whole [out, in] weight (None = the compute dtype's itemsize); see the planner
    transient_bytes_per_weight: float | None = None
    # its GEMMs' rate against the compute dtype's (ranking in `plan` only): fp8 tensor cores run at twice bf16's
    gemm_speedup: float = 1.0

    def __init__(self, in_features: int, out_features: int, compute_dtype: torch.dtype) -> None:
        super().__init__()
        if not compute_dtype.is_floating_point:
            raise TypeError(f"compute dtype must be floating point, got {compute_dtype}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.compute_dtype = compute_dtype

    # --------------------------------------------------------------- LinearBase
    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device

    def dequantize_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out, in] in ``dtype`` (a new tensor)."""
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The weight [out, in] in the compute dtype (a new tensor)."""
        return self.dequantize_as(self.compute_dtype)

    def weight_bytes(self) -> int:
        """Bytes of every stored tensor (codes and scales); shapes only, so it works on meta."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def write_weight(self, weight: torch.Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} is not writable; merge via LoRALinear.merged_weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] in the autocast dtype (autocast on) or the compute dtype.

        Traced for inference (compiling, no grad: a compiled decode step) it is plain PyTorch ops
        (:meth:`traced_linear`), which Inductor may fuse into one pass over the quantized bytes;
        everywhere else (training, compiled or not; eager inference) the custom op, which keeps
        nothing [out, in] for backward."""
        dtype = self.output_dtype(x)
        if torch.compiler.is_compiling() and not torch.is_grad_enabled():
            return self.traced_linear(x.to(dtype), dtype)
        tensors, meta = self.op_inputs()
        return quant_linear(x.to(dtype), self.kind, tensors, meta, dtype)

    def output_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The autocast dtype when autocast is on for x's device, else the compute dtype."""
        dev = x.device.type
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.compute_dtype

    def traced_linear(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x [..., in] (in ``dtype``) -> [..., out]: the dequantization in traceable PyTorch ops, then the matmul."""
        return F.linear(x, self.dequantize_traceable(dtype))

    def dequantize_traceable(self, dtype: torch.dtype) -> torch.Tensor:
        """:meth:`dequantize_as` in PyTorch ops only (no hand-written kernel), for a traced graph."""
        return self.dequantize_as(dtype)

    def op_inputs(self) -> tuple[list[torch.Tensor], list[int]]:
        """The stored tensors and integer shape facts :data:`solotune.quant.ops.DEQUANTIZERS` takes."""
        raise NotImplementedError

    # ------------------------------------------------------------------ filling
    def load_weight(self, weight: torch.Tensor) -> None:
        """Quantize ``weight`` [out, in] (on its own device) into this module, replacing the
        buffers (so a module built on the meta device is filled without copying)."""
        raise NotImplementedError

    def _check_shape(self, weight: torch.Tensor) -> None:
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"{type(self).__name__}: weight {list(weight.shape)} given, "
                             f"expected [{self.out_features}, {self.in_features}]")

    def _set(self, **tensors: torch.Tensor) -> None:
        for name, t in tensors.items():
            if tuple(t.shape) != tuple(self._buffers[name].shape):
                raise ValueError(f"{name}: shape {list(t.shape)}, expected {list(self._buffers[name].shape)}")
            self._buffers[name] = t

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"compute_dtype={self.compute_dtype}")


class NF4Linear(QuantizedLinear):
    """A frozen NF4 + double-quantized weight (bitsandbytes' layout, see :mod:`solotune.quant.nf4`).

    Buffers: ``codes`` uint8 [ceil(n/2)], ``qabsmax`` uint8 [nb], ``absmax2_bits`` int32 [ceil(nb/256)]
    and ``offset_bits`` int32 [1] (fp32 bit patterns), n = out * in, nb = ceil(n/64).
    ``NF4Linear(in, out, dtype, device="meta")`` makes an empty one to fill with :meth:`load_weight`.
    """

    kind = "nf4"  # the name anatomy and planner file its storage under

    def __init__(self, in_features: int, out_features: int, compute_dtype: torch.dtype = torch.bfloat16, *,
                 device: torch.device | str | None = None, blocksize: int = BLOCKSIZE,
                 scale_blocksize: int = SCALE_BLOCKSIZE) -> None:
        super().__init__(in_features, out_features, compute_dtype)
        self.blocksize, self.scale_blocksize = blocksize, scale_blocksize
        s = nf4_storage_shapes(self.in_features * self.out_features, blocksize, scale_blocksize)
        self.register_buffer("codes", torch.empty(s["codes"], dtype=torch.uint8, device=device))
        self.register_buffer("qabsmax", torch.empty(s["qabsmax"], dtype=torch.uint8, device=device))
        self.register_buffer("absmax2_bits", torch.empty(s["absmax2"], dtype=torch.int32, device=device))
        self.register_buffer("offset_bits", torch.empty(1, dtype=torch.int32, device=device))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, compute_dtype: torch.dtype | None = None, **kw) -> "NF4Linear":
        """Quantize ``weight`` [out, in] (on its device); compute dtype defaults to the weight's."""
        m = cls(weight.shape[1], weight.shape[0], compute_dtype or weight.dtype, device="meta", **kw)
        m.load_weight(weight)
        return m

    def load_weight(self, weight: torch.Tensor) -> None:
        self._check_shape(weight)
        q = quantize_nf4(weight, self.blocksize, self.scale_blocksize)
        self._set(codes=q.codes, qabsmax=q.qabsmax, absmax2_bits=_bits(q.absmax2), offset_bits=_bits(q.offset))

    @property
    def nf4(self) -> NF4Weight:
        """The stored weight as an :class:`NF4Weight` (views of the buffers)."""
        return NF4Weight(self.codes, self.qabsmax, _fp32(self.absmax2_bits), _fp32(self.offset_bits),
                         torch.Size((self.out_features, self.in_features)), self.blocksize, self.scale_blocksize,
                         tables_on(self.codes.device))

    def dequantize_as(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_nf4(self.nf4, dtype)

    def dequantize_traceable(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_nf4(self.nf4, dtype, backend="torch")  # not the Triton kernel: Inductor fuses these ops

    def op_inputs(self) -> tuple[list[torch.Tensor], list[int]]:
        # The level tables are not op inputs: the op looks them up (quant.nf4.tables_on).
        return ([self.codes, self.qabsmax, self.absmax2_bits, self.offset_bits],
                [self.out_features, self.in_features, self.blocksize, self.scale_blocksize])


class NF4Fp8Linear(NF4Linear):
    """:class:`NF4Linear` storage (QLoRA's bytes) multiplied in fp8: each call turns the NF4 codes straight
    into e4m3 codes of a stored fp32 scale per output row (one Triton pass on CUDA) and runs the fp8 GEMM
    (:mod:`solotune.quant.nf4_fp8`); its activations and output gradients are quantized per row, as
    :class:`Fp8Linear`'s. Two roundings of the weight (NF4, then e4m3), for Hopper's fp8 rate on the matmuls.

    Buffers: :class:`NF4Linear`'s + ``fp8_scale_bits`` and ``fp8_inv_scale_bits`` int32 [out] (fp32 bit
    patterns: the dequantized weight's row absmax / 448 and its reciprocal, 8 bytes per row)."""

    kind = "nf4-fp8"
    transient_bytes_per_weight = 1.0  # the e4m3 codes of the linear being multiplied (either layout)
    gemm_speedup = 2.0  # as Fp8Linear's (the per-call conversion not counted)

    def __init__(self, in_features: int, out_features: int, compute_dtype: torch.dtype = torch.bfloat16, **kw) -> None:
        super().__init__(in_features, out_features, compute_dtype, **kw)
        for name in ("fp8_scale_bits", "fp8_inv_scale_bits"):
            self.register_buffer(name, torch.empty(self.out_features, dtype=torch.int32, device=self.codes.device))

    def load_weight(self, weight: torch.Tensor) -> None:
        super().load_weight(weight)
        scale, inv_scale = nf4_row_scales(self.nf4)
        self._set(fp8_scale_bits=_bits(scale), fp8_inv_scale_bits=_bits(inv_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] in the autocast or compute dtype; the GEMM itself runs in fp8 with a
        bf16 output (the only output _scaled_mm's rowwise scaling gives)."""
        tensors, meta = self.op_inputs()
        y = nf4_fp8_linear(x.to(torch.bfloat16), [*tensors, self.fp8_scale_bits, self.fp8_inv_scale_bits], meta)
        return y.to(self.output_dtype(x))


class Int8Linear(QuantizedLinear):
    """A frozen int8 weight with an fp32 absmax scale per output channel (:mod:`solotune.quant.int8`).

    Buffers: ``qweight`` int8 [out, in], ``scale_bits`` int32 [out] (fp32 bit patterns).
    """

    kind = "int8"  # the name anatomy and planner file its storage under

    def __init__(self, in_features: int, out_features: int, compute_dtype: torch.dtype = torch.bfloat16, *,
                 device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, compute_dtype)
        self.register_buffer("qweight", torch.empty(self.out_features, self.in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale_bits", torch.empty(self.out_features, dtype=torch.int32, device=device))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, compute_dtype: torch.dtype | None = None) -> "Int8Linear":
        m = cls(weight.shape[1], weight.shape[0], compute_dtype or weight.dtype, device="meta")
        m.load_weight(weight)
        return m

    def load_weight(self, weight: torch.Tensor) -> None:
        self._check_shape(weight)
        q, scale = quantize_int8(weight)
        self._set(qweight=q, scale_bits=_bits(scale))

    @property
    def scale(self) -> torch.Tensor:
        """fp32 [out] (a view of the stored bits)."""
        return _fp32(self.scale_bits)

    def dequantize_as(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scale, dtype)

    def op_inputs(self) -> tuple[list[torch.Tensor], list[int]]:
        return [self.qweight, self.scale_bits], [self.out_features, self.in_features]

    def traced_linear(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The int8 weight cast in the matmul, the per-channel scale applied to its output in fp32:
        Inductor fuses it into one pass that reads the int8 bytes (at batch 1 about half the bytes
        per token of a 16-bit weight)."""
        y = F.linear(x, self.qweight.to(dtype))  # |q| <= 127: exact in any float dtype
        return (y.float() * self.scale).to(dtype)


class Fp8Linear(QuantizedLinear):
    """A frozen float8 (e4m3) weight with an fp32 scale per output channel, multiplied in float8:
    the forward and the backward are fp8 GEMMs over per-row quantized activations / output
    gradients (:mod:`solotune.quant.fp8`; ``torch._scaled_mm`` on CUDA >= sm89, an fp32 reference
    path elsewhere). Speed, not memory: the codes are kept in both layouts cuBLAS needs.

    Buffers: ``qweight_bits`` uint8 [out, in] and ``qweight_t_bits`` uint8 [in, out] (e4m3 bit
    patterns: ``model.to(dtype)`` casts floating buffers, fp8 included, and would undo them),
    ``scale_bits`` int32 [out] (fp32 bit patterns).
    """

    kind = "fp8"  # the name anatomy and planner file its storage under
    transposed = True  # keep q.T for the backward's GEMM (Fp8LeanLinear: make it there)
    transient_bytes_per_weight = 0.0  # multiplies its codes as stored: nothing weight-sized is made
    gemm_speedup = 2.0  # Hopper / Ada fp8 tensor cores: twice the dense bf16 rate

    def __init__(self, in_features: int, out_features: int, compute_dtype: torch.dtype = torch.bfloat16, *,
                 device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, compute_dtype)
        self.register_buffer("qweight_bits", torch.empty(self.out_features, self.in_features, dtype=torch.uint8,
                                                         device=device))
        if self.transposed:
            self.register_buffer("qweight_t_bits", torch.empty(self.in_features, self.out_features,
                                                               dtype=torch.uint8, device=device))
        self.register_buffer("scale_bits", torch.empty(self.out_features, dtype=torch.int32, device=device))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, compute_dtype: torch.dtype | None = None) -> "Fp8Linear":
        m = cls(weight.shape[1], weight.shape[0], compute_dtype or weight.dtype, device="meta")
        m.load_weight(weight)
        return m

    def load_weight(self, weight: torch.Tensor) -> None:
        self._check_shape(weight)
        q, scale = quantize_fp8(weight)
        layouts = {"qweight_t_bits": q.t().contiguous().view(torch.uint8)} if self.transposed else {}
        self._set(qweight_bits=q.view(torch.uint8), scale_bits=_bits(scale), **layouts)

    @property
    def qweight(self) -> torch.Tensor:
        """e4m3 [out, in] (a view of the stored bits)."""
        return self.qweight_bits.view(FP8)

    @property
    def scale(self) -> torch.Tensor:
        """fp32 [out] (a view of the stored bits)."""
        return _fp32(self.scale_bits)

    def dequantize_as(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_fp8(self.qweight, self.scale, dtype)

    def op_inputs(self) -> tuple[list[torch.Tensor], list[int]]:
        return [self.qweight_bits, self.scale_bits], [self.out_features, self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] in the autocast or compute dtype, through fp8 GEMMs (training and
        inference alike: the per-row quantization of x is part of the forward)."""
        q_t = self.qweight_t_bits.view(FP8) if self.transposed else None
        return fp8_linear(x.to(self.output_dtype(x)), self.qweight, q_t, self.scale)


class Fp8LeanLinear(Fp8Linear):
    """:class:`Fp8Linear` at 1 byte per weight: only q [out, in] is stored; each backward transposes it
    into a transient [in, out] for its GEMM (the 16-bit model's weights in half the bytes)."""

    kind = "fp8-lean"
    transposed = False
    transient_bytes_per_weight = 1.0  # the transposed codes, in backward


QUANTIZED_LINEARS: dict[str, type[QuantizedLinear]] = {"nf4": NF4Linear, "nf4-fp8": NF4Fp8Linear, "int8": Int8Linear,
                                                       "fp8": Fp8Linear, "fp8-lean": Fp8LeanLinear}

__all__ = ["QuantizedLinear", "NF4Linear", "NF4Fp8Linear", "Int8Linear", "Fp8Linear", "Fp8LeanLinear", "QUANTIZED_LINEARS"]
