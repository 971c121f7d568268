"""The reference implementation of a benchmark cell: HF ``transformers`` + ``peft``, the way the
course ran it, in a plain PyTorch loop (no HF Trainer).

Same architecture (``LlamaForCausalLM`` from the solotune config, random init), same data and
order, same loss (solotune's ``token_loss_sum``: sum over the window's target tokens / their
count), same optimizer settings (AdamW, fused on CUDA, no decay on vectors, clipping at 1.0), the
same instrument hooks. Techniques the HF way:

* LoRA: ``peft.LoraConfig(r, lora_alpha, lora_dropout, target_modules=q_proj/v_proj...)``;
* checkpointing: ``model.gradient_checkpointing_enable(use_reentrant=False)`` (every layer: HF has
  no every-k-th policy, so ``every:K`` cells are not run);
* fp16/bf16 AMP: ``torch.autocast`` around the forward + ``torch.amp.GradScaler`` for fp16;
  pure bf16: the model cast to bf16 (peft keeps the adapters in fp32);
* ``impl="hf-liger"``: Liger-Kernel's ``apply_liger_kernel_to_llama`` (fused RMSNorm, RoPE, SwiGLU
  and fused linear cross-entropy) patched in before the model is built; the loss is then Liger's,
  asked for the window's normalisation (``num_items_in_batch`` = the window's target count), so
  the logits never exist;
* ``quantize="nf4"``: bitsandbytes QLoRA — every linear of the decoder layers becomes a
  ``bnb.nn.Linear4bit`` with the settings of ``BitsAndBytesConfig(load_in_4bit=True,
  bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bf16)``;
  embeddings, norms and head stay 16-bit (as in solotune's QLoRA cell). HF quantizes while loading
  a checkpoint; for a random-init architecture the model is built in 16 bits on the device and
  quantized one layer at a time right after, so the peak counted (reset after the build) excludes
  that 16-bit transient — ``peak_note`` says so in the cell.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn as nn

from ..errors import ConfigError

# solotune name -> HF module name for LoRA targets
HF_TARGETS = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj",
              "w2": "down_proj", "w3": "up_proj"}


def available() -> bool:
    """transformers and peft are importable."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("transformers", "peft"))


def liger_available() -> bool:
    """Liger-Kernel is importable (its kernels also need CUDA and Triton)."""
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def bnb_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


class ReferenceUnavailable(ConfigError):
    """A reference cell that cannot run here (a package or the device is missing): the cell is
    recorded as ``skipped`` with this message."""


def missing_package(impl: str, quantize: str) -> str | None:
    """Why a reference cell cannot run for want of a package, else None."""
    if not available():
        return "transformers and/or peft are not installed"
    if impl == "hf-liger" and not liger_available():
        return "liger-kernel is not installed (pip install liger-kernel)"
    if quantize == "nf4" and not bnb_available():
        return "bitsandbytes is not installed (the HF QLoRA reference)"
    return None


def missing(impl: str, quantize: str, device_type: str) -> str | None:
    """Why a reference cell cannot run here (a missing package or device), else None."""
    if device_type != "cuda" and impl == "hf-liger":
        return "Liger-Kernel's Triton kernels need a CUDA device"
    if device_type != "cuda" and quantize == "nf4":
        return "bitsandbytes NF4 needs a CUDA device"
    return missing_package(impl, quantize)


def peak_note(spec: Any) -> str | None:
    if spec.quantize == "nf4":
        return ("peak counted from after quantization (torch.cuda.reset_peak_memory_stats once the 16-bit model "
                "built on the device was quantized layer by layer): the build transient is not in it")
    return None


def apply_liger() -> None:
    """Patch transformers' Llama classes with Liger's kernels (before the model is built)."""
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except ImportError as e:
        raise ReferenceUnavailable(f"--reference hf-liger: liger-kernel is not importable ({e})") from None
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=True)


def bnb_nf4_config(compute_dtype: torch.dtype) -> Any:
    """The QLoRA paper's setting as transformers spells it."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def swap_linears(layers: nn.Module, make: Any) -> int:
    """Replace every ``nn.Linear`` under ``layers`` by ``make(linear)``, one decoder layer at a time
    (so only one layer's old weights wait for the allocator at once); returns how many."""
    n = 0
    for layer in layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, make(child))
                    n += 1
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return n


def bnb_linear4bit(linear: nn.Linear, qc: Any, device: torch.device) -> nn.Module:
    """``linear`` as a ``bnb.nn.Linear4bit`` per the BitsAndBytesConfig ``qc``; the weight is
    quantized on ``device`` (its 16-bit data is released with ``linear``)."""
    import bitsandbytes as bnb

    kw = dict(compress_statistics=qc.bnb_4bit_use_double_quant, quant_type=qc.bnb_4bit_quant_type,
              quant_storage=qc.bnb_4bit_quant_storage)
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=qc.bnb_4bit_compute_dtype, device="meta", **kw)
    q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, module=q, **kw).to(device)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return q


def build_hf_model(spec: Any, device: torch.device) -> tuple[nn.Module, Any, Any]:
    """(LlamaForCausalLM with random weights on ``device`` [+ peft LoRA], tokenizer, ModelConfig)."""
    why = missing(spec.impl, spec.quantize, device.type)
    if why:
        raise ReferenceUnavailable(f"reference cell {spec.impl}: {why}")
    if spec.impl == "hf-liger":
        apply_liger()  # patches the classes: must come before LlamaForCausalLM(...)
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..config import PRESETS
    from ..train.precision import get_policy
    from .tokens import preset_cell_tokenizer

    if spec.model not in PRESETS:
        raise ConfigError(f"--reference hf runs preset architectures only (got {spec.model!r})")
    if spec.grad_checkpoint not in ("off", "all"):
        raise ConfigError(f"HF checkpoints every layer or none; {spec.grad_checkpoint!r} has no HF equivalent")
    cfg = PRESETS[spec.model]
    if spec.layers is not None:
        cfg = cfg.replace(n_layers=spec.layers)
    hf_cfg = LlamaConfig(**{k: v for k, v in cfg.to_hf_config().items() if k not in ("architectures", "model_type", "torch_dtype")})
    hf_cfg.use_cache = False
    torch.manual_seed(spec.seed)
    dtype = get_policy(spec.precision).param_dtype
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the final dtype: no fp32 copy of a bf16 model
    try:
        with torch.device(device):
            model = LlamaForCausalLM(hf_cfg)
    finally:
        torch.set_default_dtype(previous)
    model.config.use_cache = False
    if spec.quantize == "nf4":
        qc = bnb_nf4_config(get_policy(spec.precision).autocast_dtype or dtype)
        swap_linears(model.model.layers, lambda lin: bnb_linear4bit(lin, qc, device))
        model.is_loaded_in_4bit = True  # peft wraps bnb.nn.Linear4bit with its own 4-bit LoRA layer
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)  # the 16-bit build transient is not the QLoRA peak
    if spec.method == "lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                          target_modules=[HF_TARGETS[t] for t in spec.lora_targets], bias="none",
                          task_type="CAUSAL_LM")
        model = get_peft_model(model, lcfg)
    else:
        model.requires_grad_(True)
    if spec.grad_checkpoint == "all":
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    tok = preset_cell_tokenizer(cfg.vocab_size)
    return model, tok, cfg


def micro_loss(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, n_targets: int,
               amp_dtype: torch.dtype | None, fused_loss: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backward = the micro-batch's target-token sum / the window's ``n_targets``, that sum
    detached). ``fused_loss``: the model computes it (Liger's fused linear cross-entropy, told the
    window's count); otherwise solotune's ``token_loss_sum`` over the logits, outside autocast."""
    from ..train.loss import token_loss_sum

    with torch.autocast(ids.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        if fused_loss:
            scaled = model(input_ids=ids, labels=labels, num_items_in_batch=max(n_targets, 1)).loss
            return scaled, scaled.detach().double() * max(n_targets, 1)
        logits = model(input_ids=ids).logits
    total = token_loss_sum(logits, labels)
    return total / max(n_targets, 1), total.detach()


def train_hf(spec: Any, model: nn.Module, tokenizer: Any, device: torch.device, instrument: Any,
             n_steps: int, data: Any) -> list[dict[str, Any]]:
    """One epoch over the cell's examples ``data`` (a sequence of ``Example``); returns per-step
    records like solotune's metrics.jsonl."""
    from ..data import IGNORE_INDEX, collate, epoch_order
    from ..train.precision import get_policy
    from .anatomy import StopTraining

    order = epoch_order(len(data), spec.seed, 0)  # the order solotune's loop uses
    pad_id = int(getattr(tokenizer, "pad_id", None) or tokenizer.eos_id)
    micro = [order[i:i + spec.micro_batch] for i in range(0, len(order), spec.micro_batch)]
    windows = [micro[i:i + spec.grad_accum] for i in range(0, len(micro), spec.grad_accum)]

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.0}] + ([{"params": no_decay, "weight_decay": 0.0}] if no_decay else [])
    optimizer = torch.optim.AdamW(groups, lr=spec.lr, betas=(0.9, 0.999), eps=1e-8,
                                  fused=True if device.type == "cuda" else None)
    policy = get_policy(spec.precision)
    amp_dtype = policy.autocast_dtype
    scaler = torch.amp.GradScaler(device.type) if policy.loss_scaling else None
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    log: list[dict[str, Any]] = []
    tokens, runtime = 0, 0.0
    for step, window in enumerate(windows[:n_steps], start=1):
        t0 = time.perf_counter()
        batches = [collate([data[i] for i in idx], pad_id) for idx in window]
        n_targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for b in batches:
            ids, labels = b["input_ids"].to(device), b["labels"].to(device)
            with instrument.forward_context():
                scaled, total = micro_loss(model, ids, labels, n_targets, amp_dtype, spec.impl == "hf-liger")
                (scaler.scale(scaled) if scaler else scaled).backward()
            loss_sum += total
            del scaled, total
        loss = loss_sum.item() / max(n_targets, 1)
        instrument.before_step(model, optimizer, step)
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        n_tok = sum(int(b["attention_mask"].sum()) for b in batches)
        tokens += n_tok
        dt = time.perf_counter() - t0
        runtime += dt
        log.append({"step": step, "loss": loss, "tokens": tokens, "time_s": runtime, "tokens_per_s": n_tok / dt})
        try:
            instrument.after_step(model, optimizer, step)
        except StopTraining:
            break
        if not math.isfinite(loss) and scaler is None:
            raise FloatingPointError(f"step {step}: loss is {loss}")
    return log
