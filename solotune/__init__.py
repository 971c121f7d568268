"""solotune: fine-tune LLaMA-family models on one GPU, in plain PyTorch, and measure what each technique costs."""

from __future__ import annotations

from typing import Any

from .config import ModelConfig
from .generate import generate  # eager: binds the function over the same-named submodule
from .model import Transformer, build_model

__version__ = "0.1.0"

# Heavier pieces are imported on first use so `import solotune` stays cheap.
_LAZY = {
    "load": ("solotune.api", "load"),
    "TrainConfig": ("solotune.train.config", "TrainConfig"),
    "finetune": ("solotune.train.loop", "finetune"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'solotune' has no attribute {name!r}")


__all__ = ["ModelConfig", "Transformer", "build_model", "load", "generate", "TrainConfig", "finetune", "__version__"]
