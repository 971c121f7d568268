"""The frozen base of a :class:`~solotune.peft.LoRALinear`: an interface, so that a quantized linear
(NF4, int8, ...) can stand where a plain ``nn.Linear`` does (QLoRA).

``LoRALinear`` talks to its base only through :class:`LinearBase`. A quantized base is an
``nn.Module`` that implements it (and is what ``LoRALinear.base`` holds); a plain ``nn.Linear``
stays itself in the module tree (same state-dict names, same FSDP sharding) and is seen through
:class:`PlainLinearBase`, a view. Shapes: x [..., in] -> y [..., out]; weight [out, in].
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn


@runtime_checkable
class LinearBase(Protocol):
    """What ``LoRALinear`` asks of its frozen base.

    in_features, out_features: the shapes (x [..., in] -> y [..., out]).
    dtype: the compute dtype: that of ``forward``'s output and of :meth:`dequantize`.
    device: where the stored weight lives (the adapters are put there too).
    writable: :meth:`write_weight` works, so ``merge()`` can fold the delta in place. A quantized
        base is not: rounding a merged weight back to 4 bits would lose the delta; its merge
        belongs to the export path, which writes 16-bit weights (``LoRALinear.merged_weight``).
    """

    in_features: int
    out_features: int

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def writable(self) -> bool: ...

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] in :attr:`dtype` (or the autocast dtype)."""
        ...

    def dequantize(self) -> torch.Tensor:
        """The weight [out, in] in :attr:`dtype` (a new tensor unless the base stores it as is)."""
        ...

    def weight_bytes(self) -> int:
        """Bytes the stored weight takes (scales and other quantization state included)."""
        ...

    def write_weight(self, weight: torch.Tensor) -> None:
        """Store ``weight`` [out, in] (only when :attr:`writable`)."""
        ...


class PlainLinearBase:
    """:class:`LinearBase` of a plain ``nn.Linear`` (or any module with a ``weight`` [out, in],
    ``in_features`` and ``out_features``): a view; the module itself stays in the model."""

    def __init__(self, module: nn.Module) -> None:
        for attr in ("weight", "in_features", "out_features"):
            if not hasattr(module, attr):
                raise TypeError(f"LoRALinear base {type(module).__name__} has no {attr!r}")
        self.module = module

    @property
    def in_features(self) -> int:
        return int(self.module.in_features)

    @property
    def out_features(self) -> int:
        return int(self.module.out_features)

    @property
    def dtype(self) -> torch.dtype:
        return self.module.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.module.weight.device

    @property
    def writable(self) -> bool:
        return isinstance(self.module, nn.Linear) and self.module.weight.is_floating_point()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def dequantize(self) -> torch.Tensor:
        """The weight itself (no copy)."""
        return self.module.weight

    def weight_bytes(self) -> int:
        w = self.module.weight
        return w.numel() * w.element_size()

    @torch.no_grad()
    def write_weight(self, weight: torch.Tensor) -> None:
        self.module.weight.copy_(weight)


def as_linear_base(module: nn.Module) -> LinearBase:
    """``module`` itself when it implements :class:`LinearBase`, else the view of a plain Linear."""
    if isinstance(module, LinearBase):
        return module
    return PlainLinearBase(module)


__all__ = ["LinearBase", "PlainLinearBase", "as_linear_base"]
