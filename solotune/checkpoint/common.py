"""What every checkpoint loader returns (a lazily read :class:`Checkpoint`), the one error type they
raise, and shared helpers: weights-only torch loading, state-dict validation against the model's
shapes, tokenizer discovery, atomic writes."""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from ..config import ModelConfig
from ..errors import SolotuneError


TensorStream = Iterator[tuple[str, torch.Tensor]]


@dataclass
class Checkpoint:
    """An opened checkpoint in solotune's canonical form; the weights are read lazily.

    shapes: canonical (Meta) name -> shape, already validated against ``config``; no
        ``output.weight`` when ``config.tie_embeddings``. Known before any tensor data is read.
    read: starts one pass over the file(s): yields ``(canonical name, tensor)`` one tensor at a
        time, in Meta's adjacent-pair Q/K row layout, in the file's dtype (quantized GGUF -> float32).
        Use :meth:`tensors`.
    tokenizer_file: ``tokenizer.model`` / ``tokenizer.json`` found next to the weights, if any.
    metadata: GGUF key/values (strings decoded, arrays as lists); None for other formats.
    """

    format: str  # "meta" | "hf" | "gguf"
    config: ModelConfig
    shapes: dict[str, tuple[int, ...]]
    read: Callable[[], TensorStream] = field(repr=False)
    tokenizer_file: Path | None = None
    metadata: dict[str, Any] | None = None
    _materialised: dict[str, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def tensors(self) -> TensorStream:
        """``(canonical name, tensor)`` one at a time, read from the file(s) as it is asked for.
        Only the tensor being handed out is alive in the reader: drop it before asking for the next
        and the host holds at most one checkpoint tensor at a time (what ``build_model`` does)."""
        if self._materialised is not None:
            return iter(self._materialised.items())
        return self.read()

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor at once (read on first use, then kept): the whole model in host memory.
        Loading a model does not need this; use :meth:`tensors` / ``build_model(cfg, ckpt.tensors())``."""
        if self._materialised is None:
            self._materialised = dict(self.read())
        return self._materialised


class CheckpointError(SolotuneError, ValueError):
    """Bad checkpoint input. The message always starts with the file (and tensor, where one is at fault)."""

    def __init__(self, path: str | os.PathLike[str], message: str, tensor: str | None = None) -> None:
        self.path = Path(path)
        self.tensor = tensor
        where = f"{self.path}: tensor {tensor!r}: " if tensor else f"{self.path}: "
        super().__init__(where + message)


# torch's wording of a refused global differs by version and by why it was refused:
# "Unsupported global: GLOBAL io.open", "unsupported GLOBAL posix.mkdir whose module posix is blocked".
# (garbage bytes say "Unsupported operand" instead: not a refused object).
_GLOBAL_RE = re.compile(r"\bGLOBAL (\S+)")


def safe_torch_load(path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True, **kwargs)``: plain tensors and containers only, never
    pickled code. A pickle that names a Python object (``__reduce__`` payload, a class instance)
    is refused with :class:`CheckpointError` that says so, instead of torch's advice to retry
    with the unsafe setting. Other failures (truncated, not a torch file) propagate unchanged."""
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        m = _GLOBAL_RE.search(str(e))
        if m is None:
            raise  # not a refused object: garbage bytes or a truncated/odd pickle
        raise CheckpointError(path, f"contains code or Python objects other than plain tensors ({m.group(1)}); "
                                    "it was not loaded (solotune reads torch checkpoints weights-only and "
                                    "never executes pickled code)") from None


def meta_tensors(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Shape-only stand-ins (meta device: no memory) for :func:`validate_state_dict`."""
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape that ``Transformer(cfg)`` holds (built on the meta device: no memory).
    ``output.weight`` is absent for tied embeddings."""
    from ..model import Transformer  # local import: model.py must not depend on this package

    with torch.device("meta"):
        model = Transformer(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        shapes.pop("output.weight", None)
    return shapes


def validate_state_dict(sd: Mapping[str, torch.Tensor], cfg: ModelConfig, source: str | os.PathLike[str],
                        file_name: Callable[[str], str | None] | None = None) -> None:
    """Raise :class:`CheckpointError` (naming ``source``) on missing or unexpected tensors or a shape
    that differs from what ``Transformer(cfg)`` expects. ``file_name`` maps a canonical name to the
    name the file uses (HF/GGUF), so the message names the tensor the way the user's file does."""

    def named(name: str) -> tuple[str, str]:
        """(tensor as the file names it, note giving the canonical name when that differs)."""
        other = file_name(name) if file_name is not None else None
        return (other, f" [canonical name {name!r}]") if other and other != name else (name, "")

    shapes = expected_shapes(cfg)
    missing = sorted(shapes.keys() - sd.keys())
    unexpected = sorted(sd.keys() - shapes.keys())
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        tensor, note = named(missing[0])
        raise CheckpointError(source, f"missing from the checkpoint{more}; the model config expects it{note}",
                              tensor=tensor)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more: {unexpected[1:4]})" if len(unexpected) > 1 else ""
        hint = " (tied embeddings: the checkpoint should have no output head)" \
            if unexpected[0] == "output.weight" and cfg.tie_embeddings else ""
        tensor, note = named(unexpected[0])
        raise CheckpointError(source, f"unexpected tensor{more}; not part of the model{hint}{note}", tensor=tensor)
    for name, want in shapes.items():
        got = tuple(sd[name].shape)
        if got != want:
            tensor, note = named(name)
            raise CheckpointError(source, f"shape {list(got)} in the checkpoint, the model config expects "
                                          f"{list(want)}{note}", tensor=tensor)


def strip_tied(sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Drop ``output.weight`` for tied embeddings (``model.state_dict()`` lists the shared tensor twice)."""
    out = dict(sd)
    if cfg.tie_embeddings:
        out.pop("output.weight", None)
    return out


def find_tokenizer(dirs: list[Path], names: tuple[str, ...]) -> Path | None:
    """First of ``names`` that exists in the first of ``dirs`` that has one."""
    for d in dirs:
        for n in names:
            p = d / n
            if p.is_file():
                return p
    return None


def tokenizer_dest_name(src: Path) -> str:
    """The name loaders look for: ``tokenizer.model`` (SentencePiece) or ``tokenizer.json`` (tokenizers)."""
    return "tokenizer.model" if src.suffix == ".model" else "tokenizer.json"


def split_dim(name: str) -> int | None:
    """Model-parallel split dimension of a canonical tensor in Meta's sharded checkpoints: column-
    parallel layers (wq/wk/wv/w1/w3/output) split their output rows (dim 0); row-parallel layers
    (wo/w2) and ParallelEmbedding split dim 1; norms are replicated (None)."""
    if name.endswith("norm.weight"):
        return None
    leaf = name.removesuffix(".weight").rsplit(".", 1)[-1]
    if leaf in ("wq", "wk", "wv", "w1", "w3", "output"):
        return 0
    if leaf in ("wo", "w2", "tok_embeddings"):
        return 1
    return None


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temp directory beside ``target``; on success it replaces ``target`` (an existing
    directory is moved aside first and removed after), on error it is deleted and ``target`` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old: Path | None = None
    if target.exists():
        if not target.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"{target} exists and is not a directory")
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "d")
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old / "d", target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside ``target``; on success it replaces ``target`` with one ``os.replace``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
