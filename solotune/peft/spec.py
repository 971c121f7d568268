"""``LoRASpec``: the one description of a LoRA configuration, shared by ``TrainConfig``, the bench
cell and runner, and the planner."""

from __future__ import annotations

from dataclasses import dataclass

# Linear layers of a block that LoRA may target (Meta names; HF: q/k/v/o_proj, gate/down/up_proj).
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass(frozen=True)
class LoRASpec:
    """rank 0 = no adapters (full fine-tuning). y = base(x) + (alpha / rank) * B(A(dropout(x)))."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("wq", "wv")

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank < 0:
            raise ValueError(f"LoRA rank must be >= 0 (0 = no adapters), got {self.rank}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(f"unknown LoRA targets {unknown}; choose from {', '.join(LORA_TARGETS)}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0
