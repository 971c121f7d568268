"""Checkpoint loading and writing: Meta (``params.json`` + ``consolidated.*.pth``), Hugging Face
(``config.json`` + safetensors) and GGUF, all opened as one canonical :class:`Checkpoint` whose
tensors are read one at a time (``build_model(ckpt.config, ckpt.tensors())``)."""

from __future__ import annotations

import os
from pathlib import Path

from .common import Checkpoint, CheckpointError, TensorStream, expected_shapes, safe_torch_load, validate_state_dict
from .gguf import load_gguf, save_gguf
from .hf import load_hf, save_hf
from .meta import load_meta, meta_shards, save_meta

__all__ = [
    "Checkpoint", "CheckpointError", "detect_format", "expected_shapes", "load_checkpoint", "load_gguf",
    "load_hf", "load_meta", "resolve", "safe_torch_load", "save_gguf", "save_hf", "save_meta", "TensorStream",
    "validate_state_dict",
]

_LOOKED_FOR = ("a .gguf file (or a directory holding exactly one); a directory with params.json + "
               "consolidated.NN.pth (Meta); a directory with config.json + *.safetensors (Hugging Face); "
               "or one weight file inside such a directory")


def _kind_of_dir(d: Path) -> str | None:
    if (d / "params.json").is_file() and meta_shards(d):
        return "meta"
    if (d / "config.json").is_file() and any(d.glob("*.safetensors")):
        return "hf"
    ggufs = list(d.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf"
    return None


def resolve(path: str | os.PathLike[str]) -> tuple[str, Path]:
    """(format, the path its loader takes): a GGUF file, or a Meta/HF directory. A weight file
    inside a Meta/HF directory resolves to that directory."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(p, "no such file or directory")
    if p.is_file():
        if p.suffix == ".gguf":
            return "gguf", p
        with p.open("rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf", p
        if p.suffix in (".pth", ".safetensors", ".json"):
            kind = _kind_of_dir(p.parent)
            if kind in ("meta", "hf"):
                return kind, p.parent
        raise CheckpointError(p, f"unknown checkpoint format; looked for {_LOOKED_FOR}")
    kind = _kind_of_dir(p)
    if kind is None:
        raise CheckpointError(p, f"unknown checkpoint format; looked for {_LOOKED_FOR}")
    if kind == "gguf":
        return kind, next(p.glob("*.gguf"))
    return kind, p


def detect_format(path: str | os.PathLike[str]) -> str:
    """"meta" | "hf" | "gguf" for ``path``; :class:`CheckpointError` when it is none of them."""
    return resolve(path)[0]


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open any supported checkpoint in canonical form: config, names and shapes read and validated
    against that config now; the tensors are read lazily by :meth:`Checkpoint.tensors`."""
    kind, p = resolve(path)
    loader = {"meta": load_meta, "hf": load_hf, "gguf": load_gguf}[kind]
    return loader(p)
