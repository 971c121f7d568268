"""Where a per-parameter optimizer keeps each parameter's state between its updates.

:class:`DeviceStates`: on the parameter's device (nothing moves). The pinned-host store of
``--offload optimizer`` is :class:`solotune.optim.offload.HostStates`, the same interface.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class StateStore(Protocol):
    def fetch(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        """Before ``p``'s update: make ``state``'s tensors device tensors (in place in the dict)."""

    def prefetch(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        """``p`` is updated next: its state may start moving to the device now."""

    def release(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        """After ``p``'s update: put ``state`` back where it lives."""

    def adopt(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        """``state`` was just loaded (onto ``p``'s device): move it where it lives."""

    def flush(self) -> None:
        """Every copy started is complete."""


class DeviceStates:
    """States stay on the parameter's device."""

    def fetch(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        pass

    def prefetch(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        pass

    def release(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        pass

    def adopt(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        pass

    def flush(self) -> None:
        pass
