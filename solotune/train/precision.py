"""Precision policies: what dtype the weights live in, what the forward computes in, and whether the
loss is scaled. The training loop only ever talks to a :class:`PrecisionPolicy` and its
:class:`LossScaler`, so no precision branches leak into the loop.

=========  ============  ==============  ==============  =========================================
mode       base weights  trainable       forward         notes
=========  ============  ==============  ==============  =========================================
fp32       fp32          fp32            fp32            reference
fp16-amp   fp32          fp32            fp16 autocast   GradScaler; overflowed steps are skipped
bf16-amp   fp32          fp32            bf16 autocast   bf16 has fp32's range: no scaling needed
bf16       bf16          bf16 / fp32*    bf16 weights    pure bf16: half the weight memory, no autocast
=========  ============  ==============  ==============  =========================================

\\* Pure bf16 with LoRA keeps the adapters in fp32. They are <1% of the weights, so it costs almost
nothing, and it matters: an AdamW update of lr=1e-4 is far below bf16's resolution (8 mantissa bits,
relative step 2^-8 = 0.004) for any weight that has moved away from zero, so bf16 adapters would stop
learning after the first steps. The base matmuls run in bf16; ``LoRALinear`` runs its small
adapter path in the adapters' fp32 and casts the result back to bf16 (what PEFT does with
``autocast_adapter_dtype=True``). No autocast is needed: every weight is already in its dtype. In full
fine-tuning every weight is trainable and pure bf16 means bf16 weights *and* bf16 optimizer state:
that is the point of the mode (memory), and its rounding cost is what the benchmarks measure.

Everywhere: RMSNorm statistics, RoPE angles and attention softmax run in fp32 inside the model,
and the loss is computed from fp32 logits.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, ContextManager

import torch

# Short dtype names, as results, reports and the planner write them.
DTYPE_NAMES: dict[torch.dtype, str] = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                                       torch.float64: "fp64"}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"`` (``str(dtype)`` for a dtype without a short name)."""
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


@dataclass(frozen=True)
class PrecisionPolicy:
    """Every precision fact of one mode: dtypes, byte widths, autocast, loss scaling. Code that needs
    one (the loop, FSDP's mixed precision, the bench cells, the planner) asks the policy."""

    name: str
    param_dtype: torch.dtype  # frozen base weights (and every weight in full fine-tuning)
    adapter_dtype: torch.dtype  # LoRA adapter weights
    autocast_dtype: torch.dtype | None  # forward compute dtype under torch.autocast; None = no autocast
    loss_scaling: bool  # dynamic loss scaling (fp16 only: its 5-bit exponent underflows small grads)

    @property
    def amp(self) -> bool:
        """The forward runs under ``torch.autocast`` (weights stay in ``param_dtype``)."""
        return self.autocast_dtype is not None

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the base matmuls run in: the autocast dtype, else the weights' own."""
        return self.autocast_dtype if self.autocast_dtype is not None else self.param_dtype

    @property
    def param_bytes(self) -> int:
        """Bytes per element of a base weight (every weight in full fine-tuning)."""
        return self.param_dtype.itemsize

    @property
    def adapter_bytes(self) -> int:
        """Bytes per element of a LoRA adapter weight."""
        return self.adapter_dtype.itemsize

    @property
    def compute_bytes(self) -> int:
        """Bytes per element of an activation the base matmuls produce."""
        return self.compute_dtype.itemsize

    @property
    def param_dtype_name(self) -> str:
        return dtype_name(self.param_dtype)

    @property
    def adapter_dtype_name(self) -> str:
        return dtype_name(self.adapter_dtype)

    @property
    def compute_dtype_name(self) -> str:
        return dtype_name(self.compute_dtype)

    def autocast(self, device_type: str) -> ContextManager[Any]:
        """Context for the model forward (never the loss: that is computed from fp32 logits)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.autocast_dtype)

    def make_scaler(self, device_type: str) -> "LossScaler":
        return AmpLossScaler(device_type) if self.loss_scaling else LossScaler()


POLICIES: dict[str, PrecisionPolicy] = {
    "fp32": PrecisionPolicy("fp32", torch.float32, torch.float32, None, False),
    "fp16-amp": PrecisionPolicy("fp16-amp", torch.float32, torch.float32, torch.float16, True),
    "bf16-amp": PrecisionPolicy("bf16-amp", torch.float32, torch.float32, torch.bfloat16, False),
    "bf16": PrecisionPolicy("bf16", torch.bfloat16, torch.float32, None, False),
    # Not a training mode: float64 everywhere, the reference the equivalence tests compare against.
    "fp64": PrecisionPolicy("fp64", torch.float64, torch.float64, None, False),
}


# The modes a run may choose (fp64 is the tests' reference only).
TRAINING_PRECISIONS: tuple[str, ...] = tuple(n for n in POLICIES if n != "fp64")


def get_policy(name: str) -> PrecisionPolicy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown precision {name!r}; choose from {', '.join(POLICIES)}") from None


class LossScaler:
    """No scaling: ``scale`` is the identity and every step is taken.

    The interface the loop uses (the same for :class:`AmpLossScaler`)::

        scaler.scale(loss).backward()      # per micro-batch
        scaler.unscale_(optimizer)         # before clipping, so the norm is of the true gradients
        took_step = scaler.step(optimizer) # False when the step was skipped (non-finite gradients)
    """

    skipped_steps: int = 0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        optimizer.step()
        return True

    def check_finite(self, loss: float, step: int) -> None:
        """Without a loss scaler nothing would skip a non-finite update: stop before it poisons the weights."""
        if not math.isfinite(loss):
            raise FloatingPointError(f"step {step}: training loss is {loss}; lower the lr, or use fp32/bf16-amp")

    def get_scale(self) -> float:
        return 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))


class AmpLossScaler(LossScaler):
    """Dynamic loss scaling via ``torch.amp.GradScaler``.

    GradScaler skips ``optimizer.step`` when the unscaled gradients hold an inf/NaN and then halves
    its scale; it grows the scale again after ``growth_interval`` clean steps. A skipped step is
    therefore exactly a step after which the scale went down; we count those.
    """

    def __init__(self, device_type: str, init_scale: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.skipped_steps = 0
        self.scaler = torch.amp.GradScaler(device_type, init_scale=init_scale, growth_interval=growth_interval)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        took = self.scaler.get_scale() >= before
        self.skipped_steps += 0 if took else 1
        return took

    def check_finite(self, loss: float, step: int) -> None:
        pass  # an overflowed fp16 step is the scaler's to skip (and count), not an error

    def get_scale(self) -> float:
        return float(self.scaler.get_scale())

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "grad_scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
