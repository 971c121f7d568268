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
from .common import Checkpoint, CheckpointError, atomic_dir, find_tokenizer, tokenizer_dest_name, split_dim, strip_tied, validate_state_dict

_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")
# Buffers some Meta checkpoints carry that the model recomputes (RoPE frequencies).
_DROP = ("rope.freqs",)


def meta_shards(d: Path) -> list[Path]:
    """``consolidated.NN.pth`` files of ``d`` in rank order."""
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _SHARD_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def _reason(e: Exception) -> str:
    """The informative line of torch.load's error (its weights-only message is a page of advice)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(e).splitlines()]
    for ln in lines:
        if "Unsupported global" in ln or "Unsupported operand" in ln:
            return "the pickle holds more than tensors (refused: weights-only loading never runs pickled code): " + ln
    return next((ln for ln in lines if ln), type(e).__name__)


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """Tensors only (``weights_only``: never runs pickled code); memory-mapped where the file allows."""
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) files cannot be mapped: read them instead
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with code in it, not a torch file at all
        raise CheckpointError(path, f"cannot be read as a weights-only torch checkpoint (truncated, corrupt, or more than tensors): {_reason(e)}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(path, "is not a flat {name: tensor} state dict")
    return sd


def merge_shards(shards: list[dict[str, torch.Tensor]], files: list[Path]) -> dict[str, torch.Tensor]:
    """Undo Meta's model parallelism: concatenate each tensor along its split dim (see
    :func:`~solotune.checkpoint.common.split_dim`); replicated norms come from shard 0."""
    if len(shards) == 1:
        return dict(shards[0])
    names = shards[0].keys()
    for sd, f in zip(shards[1:], files[1:]):
        diff = sorted(names ^ sd.keys())
        if diff:
            raise CheckpointError(f, f"shard holds a different set of tensors than {files[0].name}", tensor=diff[0])
    out = {}
    for name in names:
        dim = split_dim(name)
        parts = [sd[name] for sd in shards]
        if dim is None:
            out[name] = parts[0]
            continue
        for p, f in zip(parts, files):
            if p.dim() <= dim:
                raise CheckpointError(f, f"has {p.dim()} dims; cannot concatenate shards along dim {dim}", tensor=name)
        out[name] = torch.cat(parts, dim=dim)
    return out


def load_meta(path: str | os.PathLike[str]) -> Checkpoint:
    """Load a Meta checkpoint directory (``params.json`` + ``consolidated.*.pth``)."""
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

    sd = merge_shards([_torch_load(f) for f in files], files)
    for k in _DROP:
        sd.pop(k, None)
    emb = sd.get("tok_embeddings.weight")
    try:
        cfg = ModelConfig.from_meta_params(params, name=d.name,
                                           vocab_size=int(emb.shape[0]) if emb is not None else None)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(params_file, f"bad model parameters: {e!r}") from None
    if cfg.tie_embeddings:
        sd.pop("output.weight", None)
    validate_state_dict(sd, cfg, files[0] if len(files) == 1 else d)
    # Meta's downloads keep tokenizer.model beside the model folders, one level up.
    tok = find_tokenizer([d, d.parent], ("tokenizer.model", "tokenizer.json"))
    return Checkpoint("meta", cfg, sd, tokenizer_file=tok)


def save_meta(cfg: ModelConfig, sd: Mapping[str, torch.Tensor], path: str | os.PathLike[str], shards: int = 1,
              tokenizer_file: str | os.PathLike[str] | None = None) -> Path:
    """Write ``params.json`` + ``consolidated.{00..shards-1}.pth`` into ``path`` (atomically: the
    directory appears complete or not at all). Split tensors the way Meta's model parallelism does."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
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
            raise ValueError(f"{name}: dim {dim} of size {t.shape[dim]} does not split into {shards} shards")
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
