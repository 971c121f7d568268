"""Hugging Face transformers layout: ``config.json`` + ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``), HF names, and Q/K rows in HF's rotate-half order."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import ModelConfig
from .common import (Checkpoint, CheckpointError, TensorStream, atomic_dir, find_tokenizer, meta_tensors, strip_tied,
                     tokenizer_dest_name, validate_state_dict)
from .names import HF_NAMES, HF_TO_CANONICAL, hf_rows_to_meta, meta_rows_to_hf, rename

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Non-persistent buffers that old transformers versions saved; the model recomputes them.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_weight_files(d: Path) -> list[Path]:
    """Safetensors files of an HF directory: the shards named by the index, else model.safetensors,
    else every ``*.safetensors`` in the directory."""
    index = d / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(index, f"cannot be parsed as a safetensors index: {e!r}") from None
        files = [d / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f, f"listed in {INDEX} but not found")
        return files
    if (d / SINGLE).is_file():
        return [d / SINGLE]
    return sorted(d.glob("*.safetensors"))


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """HF name -> shape from one file's header (no tensor data is read)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # SafetensorError: truncated, bad header, not a safetensors file
        raise CheckpointError(path, f"cannot be read as safetensors: {e}") from None


def _canonical_name(name: str, source: str | os.PathLike[str]) -> str | None:
    """Canonical name of an HF tensor; None for buffers the model recomputes."""
    if name.endswith(_IGNORED_SUFFIXES):
        return None
    canon = rename(name, HF_TO_CANONICAL)
    if canon is None:
        raise CheckpointError(source, "unexpected tensor: no LLaMA weight has this HF name", tensor=name)
    return canon


def _to_meta_rows(canon: str, t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Q/K rows from HF's rotate-half order to Meta's adjacent pairs; other tensors unchanged."""
    if canon.endswith("attention.wq.weight"):
        return hf_rows_to_meta(t, cfg.n_heads)
    if canon.endswith("attention.wk.weight"):
        return hf_rows_to_meta(t, cfg.n_kv_heads)
    return t


def hf_to_canonical(hf_sd: Mapping[str, torch.Tensor], cfg: ModelConfig,
                    source: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """HF names -> canonical names, tied head dropped, then validated against ``cfg`` (before the
    Q/K permutation, whose reshape needs the right row count), then Q/K rows -> Meta's layout."""
    sd: dict[str, torch.Tensor] = {}
    for name, t in hf_sd.items():
        canon = _canonical_name(name, source)
        if canon is not None:
            sd[canon] = t
    if cfg.tie_embeddings:
        sd.pop("output.weight", None)
    validate_state_dict(sd, cfg, source, file_name=lambda n: rename(n, HF_NAMES))
    return {name: _to_meta_rows(name, t, cfg) for name, t in sd.items()}


def _stream_hf(wanted: dict[str, tuple[Path, str]], cfg: ModelConfig) -> TensorStream:
    """One pass over the wanted tensors, shard by shard. Each is read with its own ``safe_open``:
    safetensors hands out views of a private memory map that lives as long as any of its tensors,
    so a handle kept open for a whole shard would keep every page read from it resident; this way
    a source tensor's pages go when the tensor does (after ``build_model`` has cast or moved it).
    Q/K rows are permuted to Meta's layout on the way."""
    for canon, (f, hf_name) in wanted.items():
        # a temporary, not a local: a local would keep this tensor alive while the next is read
        yield canon, _to_meta_rows(canon, _get_tensor(f, hf_name), cfg)


def _get_tensor(f: Path, hf_name: str) -> torch.Tensor:
    try:
        with safe_open(str(f), framework="pt", device="cpu") as handle:
            return handle.get_tensor(hf_name)
    except Exception as e:
        raise CheckpointError(f, f"cannot be read as safetensors: {e}", tensor=hf_name) from None


def load_hf(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a transformers ``LlamaForCausalLM`` directory: config and tensor names/shapes are read
    and validated now, the tensors themselves by :meth:`Checkpoint.tensors`, one at a time."""
    d = Path(path)
    if not d.is_dir():
        raise CheckpointError(d, "no such directory")
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(cfg_file, "not found (an HF checkpoint directory needs config.json)")
    try:
        cfg = ModelConfig.from_hf_config(json.loads(cfg_file.read_text()), name=d.name)
    except (OSError, json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(cfg_file, f"bad model config: {e!r}") from None
    files = hf_weight_files(d)
    if not files:
        raise CheckpointError(d, f"no {SINGLE}, {INDEX} or other *.safetensors file")
    source = files[0] if len(files) == 1 else d
    located: dict[str, tuple[Path, str]] = {}  # canonical name -> (shard, HF name)
    shapes: dict[str, tuple[int, ...]] = {}
    seen: set[str] = set()
    for f in files:
        part = _safetensors_shapes(f)
        dup = sorted(part.keys() & seen)
        if dup:
            raise CheckpointError(f, "tensor appears in more than one shard", tensor=dup[0])
        seen |= part.keys()
        for name, shape in part.items():
            canon = _canonical_name(name, source)
            if canon is not None:
                located[canon], shapes[canon] = (f, name), shape
    if cfg.tie_embeddings:
        located.pop("output.weight", None)
        shapes.pop("output.weight", None)
    validate_state_dict(meta_tensors(shapes), cfg, source, file_name=lambda n: rename(n, HF_NAMES))
    tok = find_tokenizer([d], ("tokenizer.json", "tokenizer.model"))
    return Checkpoint("hf", cfg, shapes, read=lambda: _stream_hf(located, cfg), tokenizer_file=tok)


def canonical_to_hf(sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Canonical names/layout -> HF names, rotate-half Q/K rows (contiguous, on CPU)."""
    out = {}
    for name, t in sd.items():
        hf = rename(name, HF_NAMES)
        if hf is None:
            raise CheckpointError("state dict", "not a canonical LLaMA weight name", tensor=name)
        t = t.detach().cpu()
        if name.endswith("attention.wq.weight"):
            t = meta_rows_to_hf(t, cfg.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = meta_rows_to_hf(t, cfg.n_kv_heads)
        out[hf] = t.contiguous()
    return out


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    """Greedy split in name order; a tensor larger than ``max_bytes`` gets a shard of its own."""
    if max_bytes is None:
        return [tensors]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def save_hf(cfg: ModelConfig, sd: Mapping[str, torch.Tensor], path: str | os.PathLike[str],
            max_shard_bytes: int | None = None, tokenizer_file: str | os.PathLike[str] | None = None) -> Path:
    """Write a directory that ``transformers.LlamaForCausalLM.from_pretrained`` loads: config.json
    plus model.safetensors, or ``model-0000i-of-0000n.safetensors`` + index when ``max_shard_bytes``
    is given. Atomic: written into a temp directory that is then renamed to ``path``."""
    sd = strip_tied(sd, cfg)
    validate_state_dict(sd, cfg, path)
    tensors = canonical_to_hf(sd, cfg)
    config = cfg.to_hf_config()
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    config["torch_dtype"] = dtype
    shards = _shard(tensors, max_shard_bytes)
    out = Path(path)
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        meta = {"format": "pt"}  # transformers refuses safetensors files without it
        if len(shards) == 1 and max_shard_bytes is None:
            save_file(shards[0], str(tmp / SINGLE), metadata=meta)
        else:
            n = len(shards)
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{n:05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata=meta)
                weight_map.update({k: fname for k in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer_file is not None:
            tf = Path(tokenizer_file)
            (tmp / tokenizer_dest_name(tf)).write_bytes(tf.read_bytes())
    return out
