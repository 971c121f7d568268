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
  pure bf16: the model cast to bf16 (peft keeps the adapters in fp32).
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


def build_hf_model(spec: Any, device: torch.device) -> tuple[nn.Module, Any, Any]:
    """(LlamaForCausalLM with random weights on ``device`` [+ peft LoRA], tokenizer, ModelConfig)."""
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


def train_hf(spec: Any, model: nn.Module, tokenizer: Any, device: torch.device, instrument: Any,
             n_steps: int, data_path: str) -> list[dict[str, Any]]:
    """One epoch over the cell's samples; returns per-step records like solotune's metrics.jsonl."""
    from ..data import IGNORE_INDEX, AlpacaDataset, collate, epoch_order, load_records
    from ..train.loss import token_loss_sum
    from ..train.precision import get_policy
    from .anatomy import StopTraining

    recs = list(load_records(data_path))
    data = AlpacaDataset(recs, tokenizer, spec.seq_len)
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
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = model(input_ids=ids).logits
                micro_loss = token_loss_sum(logits, labels)
                scaled = micro_loss / max(n_targets, 1)
                (scaler.scale(scaled) if scaler else scaled).backward()
            loss_sum += micro_loss.detach()
            del logits, micro_loss, scaled
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
