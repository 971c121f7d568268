"""Parameter-efficient fine-tuning: solotune's own LoRA (over a plain or quantized base, ``base.py``)
and HF-PEFT-format adapter export."""

from .base import LinearBase, PlainLinearBase, as_linear_base
from .export import export_peft, import_peft
from .spec import LoRASpec
from .lora import (
    LORA_TARGETS,
    LoRALinear,
    apply_lora,
    count_parameters,
    load_lora_state_dict,
    lora_disabled,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    set_lora_merged,
    trainable_summary,
)

__all__ = [
    "LORA_TARGETS", "LinearBase", "LoRALinear", "LoRASpec", "PlainLinearBase", "as_linear_base", "apply_lora", "count_parameters", "export_peft", "import_peft",
    "load_lora_state_dict", "lora_disabled", "lora_modules", "lora_parameters", "lora_state_dict", "merge_lora",
    "set_lora_merged", "trainable_summary",
]
