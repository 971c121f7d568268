"""Putting quantized linears into a model without ever holding it in 16 bits.

The flow (QLoRA)::

    with torch.device("meta"):
        model = Transformer(cfg)                                   # no memory
    swap_in_quantized(model, kind="nf4", compute_dtype=torch.bfloat16)   # NF4Linear on meta
    load_quantized(model, ckpt.tensors(), dtype=torch.bfloat16, device="cuda")
    apply_lora(model, spec)                                        # wraps each NF4Linear as is

:func:`load_quantized` walks the streaming ``(name, tensor)`` pairs: a ``<module>.weight`` of a
swapped module is moved to ``device`` and quantized there (the 16-bit copy is dropped before
the next tensor arrives); every other tensor is cast and put in place with
:func:`solotune.model.assign_tensor`, as :func:`solotune.model.load_weights` does. Names are the
checkpoint's canonical ones (``layers.0.attention.wq.weight``), so the readers need no change.
QLoRA keeps the embeddings, the output head and the norms in 16 bits; only block linears swap.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn as nn

from ..model import StateSource, Transformer, assign_tensor
from ..peft.lora import LoRALinear, lora_modules
from ..peft.spec import LORA_TARGETS
from .linear import QUANTIZED_LINEARS, QuantizedLinear


def quantized_modules(model: nn.Module) -> dict[str, QuantizedLinear]:
    """{module name: module} of every quantized linear (inside a LoRALinear too: ``....wq.base``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def swap_in_quantized(model: Transformer, kind: str = "nf4", targets: Sequence[str] = LORA_TARGETS,
                      compute_dtype: torch.dtype = torch.bfloat16) -> Transformer:
    """Replace the ``nn.Linear`` named in ``targets`` (default: all seven, wq wk wv wo w1 w2 w3)
    of every block with an empty :class:`NF4Linear` / :class:`Int8Linear` (``kind``) on the
    same device, in place; returns ``model``. On a meta model nothing is allocated (fill with
    :func:`load_quantized`); on a materialised one each weight is quantized from the Linear's
    weight (the same codes a streaming load gives). Embeddings and the head stay as they are."""
    if kind not in QUANTIZED_LINEARS:
        raise ValueError(f"quantize {kind!r}: expected one of {', '.join(QUANTIZED_LINEARS)}")
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise ValueError(f"quantized targets {unknown or list(targets)}: expected a non-empty subset of {list(LORA_TARGETS)}")
    cls = QUANTIZED_LINEARS[kind]
    for block in model.layers:
        for parent in (block.attention, block.feed_forward):
            for leaf in targets:
                lin = getattr(parent, leaf, None)
                if not isinstance(lin, nn.Linear):
                    continue
                if lin.bias is not None:
                    raise ValueError("quantized linears carry no bias; solotune's model has none")
                if lin.weight.device.type == "meta":
                    q = cls(lin.in_features, lin.out_features, compute_dtype, device="meta")
                else:
                    q = cls.from_weight(lin.weight.detach(), compute_dtype)
                setattr(parent, leaf, q.train(lin.training))
    return model


def dense_names(model: Transformer) -> list[str]:
    """The checkpoint tensor names the model expects, quantized modules' ``.weight`` included
    (and ``output.weight`` left out when the embeddings are tied)."""
    quant = quantized_modules(model)
    skip = {f"{q}.{b}" for q, m in quant.items() for b in m._buffers}
    names = [k for k in model.state_dict() if k not in skip]
    names += [f"{q}.weight" for q in quant]
    tied = model.config.tie_embeddings
    return [n for n in names if not (tied and n == "output.weight")]


def load_quantized(model: Transformer, source: StateSource, *, dtype: torch.dtype,
                   device: torch.device | str = "cpu") -> Transformer:
    """Fill ``model`` (meta, with quantized modules swapped in) from ``source``, one tensor at a
    time: the weight of a quantized module is moved to ``device`` in its file dtype and
    quantized there; every other tensor becomes ``dtype`` on ``device``. KeyError names missing
    and unexpected tensors; the embeddings are re-tied. Returns ``model``."""
    device = torch.device(device)
    quant = quantized_modules(model)
    expected = set(dense_names(model))
    tied = model.config.tie_embeddings
    items = source.items() if hasattr(source, "items") else source
    filled: set[str] = set()
    unexpected: list[str] = []
    for name, t in items:
        owner = name.removesuffix(".weight")
        if tied and name == "output.weight":
            pass
        elif name not in expected:
            unexpected.append(name)
        elif name.endswith(".weight") and owner in quant:
            quant[owner].load_weight(t.to(device))
            filled.add(name)
        else:
            assign_tensor(model, name, t.to(device=device, dtype=dtype))
            filled.add(name)
        del t  # before the next tensor is read
    missing = expected - filled
    if missing or unexpected:
        raise KeyError(f"state dict does not match the model: missing {sorted(missing)[:8]}, "
                       f"unexpected {sorted(unexpected)[:8]}")
    model.tie_weights()
    return model


def random_source(model: Transformer, *, std: float = 0.02, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """Random tensors for every name the model expects, made one at a time (for benchmarks of
    random-init architectures): normal(0, std) for matrices and embeddings, ones for norms, as
    ``Transformer.init_weights``. Feed it to :func:`load_quantized` so a 70B architecture is
    quantized layer by layer as it is built. Shapes come from the meta model."""
    quant = quantized_modules(model)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes.update({f"{q}.weight": (m.out_features, m.in_features) for q, m in quant.items()})
    for name in dense_names(model):
        if name.endswith("norm.weight"):
            yield name, torch.ones(shapes[name], dtype=dtype, device=device)
        else:
            t = torch.empty(shapes[name], dtype=dtype, device=device)
            yield name, t.normal_(0.0, std, generator=generator)


@torch.no_grad()
def dense_state_dict(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> Iterator[tuple[str, torch.Tensor]]:
    """``(canonical name, 16-bit tensor)`` for the merged export of a (Q)LoRA model, one tensor at
    a time: a ``LoRALinear`` gives ``merged_weight(dtype)`` (dequantized base + delta, fp32 sum,
    one rounding) under ``<module>.weight``; a bare quantized module its dequantized weight;
    everything else is cast to ``dtype``. Other names as ``model.state_dict()`` has them."""
    lora = dict(lora_modules(model))
    quant = {n: m for n, m in quantized_modules(model).items() if not n.endswith(".base")}
    covered = tuple(f"{n}." for n in (*lora, *quant))
    for name, t in model.state_dict().items():
        if not name.startswith(covered):
            yield name.replace("_orig_mod.", ""), t.to(dtype)
    for name, m in lora.items():
        assert isinstance(m, LoRALinear)
        yield f"{name}.weight", m.merged_weight(dtype)
    for name, m in quant.items():
        yield f"{name}.weight", m.dequantize_as(dtype)


__all__ = ["quantized_modules", "swap_in_quantized", "dense_names", "load_quantized", "random_source",
           "dense_state_dict"]
