"""Shared bits of the checkpoint tests: tiny configs, random models with non-trivial norms, logits."""

from __future__ import annotations

import torch

from solotune.config import ModelConfig
from solotune.model import Transformer, build_model

TINY = ModelConfig.from_name("tiny")  # GQA 4/2, untied, hidden 176 (not a multiple of 32)
CONFIGS = {
    "tiny": TINY,
    "mha": TINY.replace(name="tiny-mha", n_kv_heads=4),
    "gqa-tied": TINY.replace(name="tiny-gqa-tied", n_heads=8, n_kv_heads=2, tie_embeddings=True,
                             rope_theta=500000.0, norm_eps=1e-6, hidden_dim=128),
}


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """Random weights, norms perturbed away from 1 so a lost/swapped norm changes the logits."""
    model = build_model(cfg, seed=seed).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def tokens(cfg: ModelConfig, B: int = 2, T: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(cfg: ModelConfig, sd: dict[str, torch.Tensor], toks: torch.Tensor) -> torch.Tensor:
    return build_model(cfg, sd).eval()(toks)


def same_arch(a: ModelConfig, b: ModelConfig) -> bool:
    """Equal up to the name (each loader names the config after the file or directory)."""
    return a.replace(name="x") == b.replace(name="x")
