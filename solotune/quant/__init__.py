"""Quantized frozen bases for (Q)LoRA: NF4 with double quantization (QLoRA), per-channel int8 and fp8.

- :mod:`.nf4`: the NF4 format (bitsandbytes' packed layout), quantize / dequantize in PyTorch.
- :mod:`.triton_nf4`: the one-pass Triton dequantization kernel (CUDA; optional);
  :mod:`.dequant` picks it or the PyTorch path.
- :mod:`.int8`: per-output-channel absmax int8.
- :mod:`.fp8`: per-output-channel float8 (e4m3), multiplied in fp8 (Hopper's fp8 GEMMs).
- :mod:`.linear`: ``NF4Linear`` / ``Int8Linear`` / ``Fp8Linear``, implementations of ``solotune.peft.LinearBase``.
- :mod:`.load`: swap them into a meta model and fill them while a checkpoint streams in.
"""

from .dequant import dequantize_nf4
from .fp8 import dequantize_fp8, fp8_weight_bytes, quantize_fp8
from .int8 import dequantize_int8, int8_weight_bytes, quantize_int8
from .linear import (QUANTIZED_LINEARS, Fp8LeanLinear, Fp8Linear, Int8Linear, NF4Fp8Linear, NF4Linear,
                     QuantizedLinear)
from .load import dense_names, dense_state_dict, load_quantized, quantized_modules, random_source, swap_in_quantized
from .nf4 import (DYNAMIC_MAP, NF4_LEVELS, NF4Weight, dequantize_nf4_torch, nf4_levels_from_quantiles, nf4_weight_bytes,
                  quantize_nf4)

__all__ = [
    "NF4_LEVELS", "DYNAMIC_MAP", "NF4Weight", "quantize_nf4", "dequantize_nf4", "dequantize_nf4_torch",
    "nf4_levels_from_quantiles", "nf4_weight_bytes", "quantize_int8", "dequantize_int8", "int8_weight_bytes",
    "quantize_fp8", "dequantize_fp8", "fp8_weight_bytes",
    "QuantizedLinear", "NF4Linear", "NF4Fp8Linear", "Int8Linear", "Fp8Linear", "Fp8LeanLinear", "QUANTIZED_LINEARS",
    "swap_in_quantized", "load_quantized", "random_source", "dense_names", "dense_state_dict", "quantized_modules",
]
