"""A random HF ``LlamaForCausalLM`` for parity tests (transformers is a test-only dependency)."""

from __future__ import annotations

import torch

from solotune.config import ModelConfig


def random_hf_llama(cfg: ModelConfig, seed: int = 0):
    """HF model of ``cfg``'s shape with seeded random weights; norms perturbed away from HF's all-ones
    init so a test also sees that they load."""
    import transformers

    torch.manual_seed(seed)
    kw = {k: v for k, v in cfg.to_hf_config().items() if k not in ("architectures", "model_type", "torch_dtype")}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model
