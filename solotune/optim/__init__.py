"""Optimizers and optimizer wrappers of plain PyTorch (no solotune imports): 8-bit AdamW
(``adamw8bit.py`` over ``blockwise.py``; on CUDA one Triton launch per tensor, ``triton_adamw8bit.py``), per-parameter optimizers (``per_param.py``) stepped in
backward (``in_backward.py``) and/or with their state in pinned host memory (``offload.py``).
``solotune.train.optim`` names and builds them for the loop."""

from .adamw8bit import AdamW8bit
from .in_backward import OptimizerInBackward
from .offload import HostStates
from .per_param import PerParamOptimizer
from .store import DeviceStates

__all__ = ["AdamW8bit", "OptimizerInBackward", "HostStates", "PerParamOptimizer", "DeviceStates"]
