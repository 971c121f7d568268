"""Meta's reference checkpoint layout: ``params.json`` + ``consolidated.NN.pth`` (one file per
model-parallel rank). Names are already canonical; sharded tensors are concatenated back."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Mapping

import torch

from ..config import ModelConfig
from .common import (Checkpoint, CheckpointError, TensorStream, atomic_dir, find_tokenizer, meta_tensors, safe_torch_load,
                     split_dim, strip_tied, tokenizer_dest_name, validate_state_dict)

_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")
# Buffers some Meta checkpoints carry that the model recomputes (RoPE frequencies).
_DROP = ("rope.freqs",)


def meta_shards(d: Path) -> list[Path]:
    """``consolidated.NN.pth`` files of ``d`` in rank order."""
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _SHARD_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def _reason(e: Exception) -> str:
    """The first informative line of torch.load's error (its weights-only message is a page of advice)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(e).splitlines()]
    for ln in lines:
        if "Unsupported operand" in ln or "WeightsUnpickler error" in ln:
            return ln
    return next((ln for ln in lines if ln and "weights_only" not in ln), type(e).__name__)


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """Tensors only (``weights_only``: never runs pickled code), memory-mapped where the file
    allows: the tensors are views of the file's pages, read when first touched."""
    try:
        try:
            sd = safe_torch_load(path, map_location="cpu", mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) files cannot be mapped: read them instead
                raise
            sd = safe_torch_load(path, map_location="cpu")
    except CheckpointError:
        raise  # refused: the pickle holds objects, not just tensors
    except Exception as e:  # truncated zip, not a torch file at all
        raise CheckpointError(path, "cannot be read as a weights-only torch checkpoint (truncated, corrupt, or not "
                                    f"a torch file): {_reason(e)}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(path, "is not a flat {name: tensor} state dict")
    return sd


def _check_same_names(shards: list[dict[str, torch.Tensor]], files: list[Path]) -> None:
    names = shards[0].keys()
    for sd, f in zip(shards[1:], files[1:]):
        diff = sorted(names ^ sd.keys())
        if diff:
            raise CheckpointError(f, f"shard holds a different set of tensors than {files[0].name}", tensor=diff[0])


def _merged_shape(name: str, parts: list[torch.Tensor], files: list[Path]) -> tuple[int, ...]:
    """Shape of ``name`` once its shard slices are concatenated (checked, nothing is read)."""
    dim = split_dim(name)
    if dim is None or len(parts) == 1:
        return tuple(parts[0].shape)
    for p, f in zip(parts, files):
        if p.dim() <= dim:
            raise CheckpointError(f, f"has {p.dim()} dims; cannot concatenate shards along dim {dim}", tensor=name)
        if p.shape[:dim] + p.shape[dim + 1:] != parts[0].shape[:dim] + parts[0].shape[dim + 1:]:
            raise CheckpointError(f, f"shape {list(p.shape)} does not concatenate along dim {dim} with "
                                     f"{list(parts[0].shape)} in {files[0].name}", tensor=name)
    shape = list(parts[0].shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    return tuple(shape)


def _merge_one(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """One tensor from its per-rank slices: concatenated along its split dim; replicated -> shard 0."""
    dim = split_dim(name)
    return parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)


def merge_shards(shards: list[dict[str, torch.Tensor]], files: list[Path]) -> dict[str, torch.Tensor]:
    """Undo Meta's model parallelism: concatenate each tensor along its split dim (see
    :func:`~solotune.checkpoint.common.split_dim`); replicated norms come from shard 0."""
    if len(shards) == 1:
        return dict(shards[0])
    _check_same_names(shards, files)
    out = {}
    for name in shards[0]:
        parts = [sd[name] for sd in shards]
        _merged_shape(name, parts, files)
        out[name] = _merge_one(name, parts)
    return out


def _stream_meta(files: list[Path], names: list[str]) -> TensorStream:
    """One pass: every shard memory-mapped (no tensor data read yet), then per tensor its slices
    gathered and concatenated (13B/70B) or handed out as the mapped view (one shard). Each is
    popped from the shard dicts as it goes, so nothing here keeps a handed-out tensor alive."""
    shards = [_torch_load(f) for f in files]
    for name in names:
        yield name, _merge_one(name, [sd.pop(name) for sd in shards])


def load_meta(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a Meta checkpoint directory (``params.json`` + ``consolidated.*.pth``): params and the
    tensors' names/shapes are read and validated now, the tensors by :meth:`Checkpoint.tensors`."""
    d = Path(path)
    params_file = d / "params.json"
    if not d.is_dir():
        raise CheckpointError(d, "no such directory")
    if not params_file.is_file():
        raise CheckpointError(params_file, "not found (a Meta checkpoint directory needs params.json)")
    files = meta_shards(d)
    if not files:
        raise CheckpointError(d, "no consolidated.NN.pth weight files")
    try:
        params = json.loads(params_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(params_file, f"cannot be parsed: {e}") from None
    if not isinstance(params, dict):
        raise CheckpointError(params_file, "is not a JSON object")

    shards = [_torch_load(f) for f in files]  # memory-mapped: only the pickles are read here
    _check_same_names(shards, files)
    shapes = {name: _merged_shape(name, [sd[name] for sd in shards], files) for name in shards[0]}
    del shards
    for k in _DROP:
        shapes.pop(k, None)
    emb = shapes.get("tok_embeddings.weight")
    try:
        cfg = ModelConfig.from_meta_params(params, name=d.name, vocab_size=int(emb[0]) if emb is not None else None)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(params_file, f"bad model parameters: {e!r}") from None
    if cfg.tie_embeddings:
        shapes.pop("output.weight", None)
    validate_state_dict(meta_tensors(shapes), cfg, files[0] if len(files) == 1 else d)
    # Meta's downloads keep tokenizer.model beside the model folders, one level up.
    tok = find_tokenizer([d, d.parent], ("tokenizer.model", "tokenizer.json"))
    names = list(shapes)
    return Checkpoint("meta", cfg, shapes, read=lambda: _stream_meta(files, names), tokenizer_file=tok)


def save_meta(cfg: ModelConfig, sd: Mapping[str, torch.Tensor], path: str | os.PathLike[str], shards: int = 1,
              tokenizer_file: str | os.PathLike[str] | None = None) -> Path:
    """Write ``params.json`` + ``consolidated.{00..shards-1}.pth`` into ``path`` (atomically: the
    directory appears complete or not at all). Split tensors the way Meta's model parallelism does."""
    if shards < 1:
        raise CheckpointError(path, f"shards must be >= 1, got {shards}")
    sd = strip_tied(sd, cfg)
    validate_state_dict(sd, cfg, path)
    per_rank: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    for name, t in sd.items():
        t = t.detach().cpu()
        dim = split_dim(name)
        if dim is None or shards == 1:
            for r in range(shards):
                per_rank[r][name] = t.clone() if shards > 1 else t.contiguous()
            continue
        if t.shape[dim] % shards:
            raise CheckpointError(path, f"dim {dim} of size {t.shape[dim]} does not split into {shards} shards",
                                  tensor=name)
        # clone: torch.save of a view would write the whole underlying storage into every shard
        for r, piece in enumerate(t.chunk(shards, dim=dim)):
            per_rank[r][name] = piece.clone()
    out = Path(path)
    with atomic_dir(out) as tmp:
        (tmp / "params.json").write_text(json.dumps(cfg.to_meta_params(), indent=2) + "\n")
        for r, part in enumerate(per_rank):
            torch.save(part, tmp / f"consolidated.{r:02d}.pth")
        if tokenizer_file is not None:
            tf = Path(tokenizer_file)
            (tmp / tokenizer_dest_name(tf)).write_bytes(tf.read_bytes())
    return out
