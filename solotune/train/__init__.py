"""Instruction tuning: one training loop for LoRA and full fine-tuning (``solotune finetune``)."""

from .config import PROFILES, TrainConfig
from .loop import TrainResult, finetune
from .precision import POLICIES, PrecisionPolicy, get_policy

__all__ = ["PROFILES", "POLICIES", "PrecisionPolicy", "TrainConfig", "TrainResult", "finetune", "get_policy"]
