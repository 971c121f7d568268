"""LoRA (Hu et al. 2021) for solotune's Transformer: a wrapper around a frozen Linear, and helpers
to apply / save / load / merge adapters.

Shapes: x [..., in], A = ``lora_a`` [r, in], B = ``lora_b`` [out, r];
y = base(x) + (dropout(x) @ A.T @ B.T) * alpha / r. The base is a :class:`~solotune.peft.base.LinearBase`:
a plain ``nn.Linear``, or a quantized linear that implements the interface (``apply_lora(base_factory=...)``).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import LinearBase, as_linear_base
from .spec import LORA_TARGETS, LoRASpec  # noqa: F401  (LORA_TARGETS re-exported)

# (canonical module name, the frozen nn.Linear) -> the base to wrap, e.g. a quantized LinearBase module
BaseFactory = Callable[[str, nn.Module], nn.Module]


class LoRALinear(nn.Module):
    """``base(x) + scale * B(A(dropout(x)))`` with ``base`` frozen.

    ``base`` is kept as-is (``self.base``) and used only through the :class:`LinearBase` interface
    (:attr:`linear_base`): a plain ``nn.Linear`` (seen through a view), or a module that implements
    the interface itself, e.g. a quantized linear (QLoRA).

    ``lora_dtype`` (default: the base weight's dtype) lets a precision policy keep adapters in fp32
    under a bf16 base; the LoRA path then runs in ``lora_dtype`` and its output is cast back.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, *,
                 lora_dtype: torch.dtype | None = None, quantize_base: bool = False,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if quantize_base:  # the old hook; the base is an interface now
            raise NotImplementedError("quantize_base is gone: for QLoRA pass a quantized base that implements "
                                      "solotune.peft.LinearBase, e.g. apply_lora(model, spec, base_factory=...)")
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        if not isinstance(base, nn.Module):
            raise TypeError(f"LoRALinear base must be an nn.Module, got {type(base).__name__}")
        view = as_linear_base(base)  # TypeError for a module that is neither a Linear nor a LinearBase
        if getattr(base, "bias", None) is not None:
            # merge()/export only carry the weight; solotune's model has no biases.
            raise ValueError("LoRALinear does not support a base with a bias")
        self.base = base
        self.base.requires_grad_(False)
        self.in_features, self.out_features = view.in_features, view.out_features
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        self.dropout_p = float(dropout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dtype = lora_dtype or view.dtype
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, dtype=dtype, device=view.device))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype, device=view.device))
        self.merged = False
        self.disabled = False  # set by lora_disabled(): forward = base only
        self.reset_lora_parameters(generator)

    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform with a=sqrt(5), nn.Linear's and peft's
        default), B = 0: the adapter starts as an exact no-op."""
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            if self.lora_a.device.type == "meta":
                return
            # Draw in fp32 on the generator's device, then cast: the same seed gives the same A
            # whatever the parameters' device and dtype (CPU reference runs match GPU runs).
            dev = generator.device if generator is not None else self.lora_a.device
            a = torch.empty(self.lora_a.shape, dtype=torch.float32, device=dev)
            self.lora_a.copy_(a.uniform_(-bound, bound, generator=generator))
            self.lora_b.zero_()

    @property
    def linear_base(self) -> LinearBase:
        """The base seen through the :class:`LinearBase` interface."""
        return as_linear_base(self.base)

    @property
    def weight(self) -> torch.Tensor:
        """The stored base weight of a plain base (so code that reads ``module.weight`` keeps
        working); :meth:`LinearBase.dequantize` gives the weight of any base."""
        return self.base.weight

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A [out, in] in fp32."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scale

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """dequantized base + delta [out, in], computed in fp32 and rounded once to ``dtype``
        (default: the base's compute dtype); the base is left as it is. Any base, quantized ones
        included: this is what an export of a merged model writes."""
        if self.merged:
            raise ValueError("adapter is merged into the base already; unmerge first")
        w = self.linear_base.dequantize()
        return (w.float() + self.delta_weight()).to(dtype or w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged or self.disabled:
            return y  # merged: the delta already lives in the base weight
        h = self.dropout(x).to(self.lora_a.dtype)
        return y + (F.linear(F.linear(h, self.lora_a), self.lora_b) * self.scale).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Add the delta into the base weight in place (computed in fp32, rounded once to the base
        dtype); the forward then skips the LoRA path."""
        if self.merged:
            return
        base = self._writable_base("merge")
        w = base.dequantize()
        base.write_weight((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the delta again. Exact up to rounding of the base dtype (bf16: ~1 ulp)."""
        if not self.merged:
            return
        base = self._writable_base("unmerge")
        w = base.dequantize()
        base.write_weight((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    def _writable_base(self, what: str) -> LinearBase:
        base = self.linear_base
        if not base.writable:
            raise NotImplementedError(
                f"cannot {what} into a {type(self.base).__name__} base: its weight cannot be written back "
                "(quantized?). Merging such a base is the export path's, which writes 16-bit weights "
                "(LoRALinear.merged_weight; solotune merge --dtype bf16)")
        return base

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha:g}, "
                f"dropout={self.dropout_p:g}, merged={self.merged}")


# ------------------------------------------------------------------------------------- model level
def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _canonical(name: str) -> str:
    # torch.compile wraps the model in ``_orig_mod``; adapter names stay those of the plain model.
    return name.replace("_orig_mod.", "")


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(canonical module name, module) for every LoRALinear, in module order."""
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield _canonical(name), m


def apply_lora(model: nn.Module, targets: LoRASpec | Sequence[str] = ("wq", "wv"), rank: int | None = None,
               alpha: float | None = None, dropout: float | None = None, generator: torch.Generator | None = None,
               lora_dtype: torch.dtype | None = None, *, base_factory: BaseFactory | None = None) -> nn.Module:
    """Wrap every Linear named in the targets (any of wq wk wv wo w1 w2 w3) in a LoRALinear, in
    place, and freeze every other parameter. Returns ``model``.

    ``targets``: a :class:`LoRASpec` (rank, alpha, dropout and targets in one), or the target names
    with ``rank`` / ``alpha`` / ``dropout`` beside them (defaults: those of ``LoRASpec()``).
    ``generator`` seeds the A matrices (drawn in module order) for reproducible runs.
    ``base_factory(name, linear)``: the frozen base to wrap instead of the Linear itself, e.g. a
    quantized module that implements :class:`~solotune.peft.base.LinearBase` (QLoRA); ``name`` is
    the Linear's canonical module name (``layers.0.attention.wq``).
    """
    if isinstance(targets, LoRASpec):
        if (rank, alpha, dropout) != (None, None, None):
            raise TypeError("apply_lora(model, spec): rank, alpha and dropout come from the LoRASpec")
        targets, rank, alpha, dropout = targets.targets, targets.rank, targets.alpha, targets.dropout
    else:
        default = LoRASpec()
        rank = default.rank if rank is None else rank
        alpha = default.alpha if alpha is None else alpha
        dropout = default.dropout if dropout is None else dropout
    targets = tuple(dict.fromkeys(targets))
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise ValueError(f"LoRA targets {list(unknown) or list(targets)}: expected a non-empty subset of {list(LORA_TARGETS)}")
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if any(True for _ in lora_modules(model)):
        raise ValueError("model already has LoRA adapters")
    found = {t: 0 for t in targets}
    chosen = []
    for name, m in model.named_modules():
        leaf = name.rpartition(".")[2]
        # a plain Linear, or a quantized base (NF4/int8: no `weight`, but the LinearBase interface)
        if leaf in found and (hasattr(m, "weight") or isinstance(m, LinearBase)) and hasattr(m, "in_features"):
            chosen.append(name)
            found[leaf] += 1
    missing = [t for t, n in found.items() if n == 0]
    if missing:
        raise ValueError(f"LoRA targets {missing} match no Linear module of the model")
    model.requires_grad_(False)
    for name in chosen:
        parent, child = _parent(model, name)
        linear = getattr(parent, child)
        base = base_factory(_canonical(name), linear) if base_factory is not None else linear
        lora = LoRALinear(base, rank, alpha, dropout, lora_dtype=lora_dtype, generator=generator)
        setattr(parent, child, lora.train(linear.training))  # keep the model's train/eval mode
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (A and B of every LoRALinear), in module order."""
    return [p for _, m in lora_modules(model) for p in (m.lora_a, m.lora_b)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters: ``{"layers.0.attention.wq.lora_a": A [r, in], "...lora_b": B [out, r]}``
    (detached; they share storage with the model, so copy before mutating)."""
    sd: dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model):
        sd[f"{name}.lora_a"] = m.lora_a.detach()
        sd[f"{name}.lora_b"] = m.lora_b.detach()
    return sd


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """Copy adapter weights (names as :func:`lora_state_dict`) into a model that already has the
    same adapters (``apply_lora`` with the same targets and rank). Every adapter tensor must be
    present and no other: a mismatch is one KeyError/ValueError naming the tensor."""
    own = {}
    for name, m in lora_modules(model):
        if m.merged:
            raise ValueError(f"{name} is merged; unmerge before loading adapters")
        own[f"{name}.lora_a"], own[f"{name}.lora_b"] = m.lora_a, m.lora_b
    missing, unexpected = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
    if missing or unexpected:
        raise KeyError(f"LoRA state dict does not match the model: missing {missing[:6]}, unexpected {unexpected[:6]}")
    for k, p in own.items():
        if tuple(sd[k].shape) != tuple(p.shape):
            raise ValueError(f"LoRA tensor {k}: shape {tuple(sd[k].shape)}, model expects {tuple(p.shape)}")
        p.copy_(sd[k])


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain base Linear back, in place.
    Returns ``model`` (base parameters stay frozen as they were)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            m.merge()
            parent, child = _parent(model, name)
            setattr(parent, child, m.base)
    return model


def set_lora_merged(model: nn.Module, merged: bool) -> None:
    """merge() or unmerge() every adapter, keeping the LoRALinear wrappers (fast eval, then resume)."""
    for _, m in lora_modules(model):
        m.merge() if merged else m.unmerge()


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model without its (unmerged) adapters inside the block, e.g. to compare the
    fine-tuned model with the base one without a second copy in memory."""
    mods = [m for _, m in lora_modules(model)]
    if any(m.merged for m in mods):
        raise ValueError("adapters are merged into the base weights; unmerge before disabling them")
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, d in zip(mods, before):
            m.disabled = d


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors count once. A quantized frozen base
    (a LinearBase that is not an nn.Linear: its weight is stored in buffers) counts its in x out."""
    trainable = total = 0
    for p in model.parameters():  # parameters() already de-duplicates shared tensors
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    for m in model.modules():
        if isinstance(m, LinearBase) and not isinstance(m, (nn.Linear, LoRALinear)) and not any(
                True for _ in m.parameters(recurse=False)):
            total += int(m.in_features) * int(m.out_features)
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    """peft's ``print_trainable_parameters`` line: trainable params: X || all params: Y || trainable%: Z."""
    trainable, total = count_parameters(model)
    pct = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}"
