"""llama.cpp's GGUF: one file with ``llama.*`` hyper-parameters, the tokenizer, and (possibly
quantized) tensors, read with the ``gguf`` package and dequantized to float32.

Q/K row layout: llama.cpp's HF converter permutes q/k rows from HF's rotate-half order into
adjacent pairs, because ggml's default ("normal") RoPE rotates dims (2i, 2i+1) like Meta's
reference. That is exactly solotune's canonical layout, so GGUF tensors are used as stored.
Checked on SmolLM2-135M-Instruct Q4_1 (``tests/checkpoint/test_ckpt_gguf.py::test_real_smollm2``):
mean next-token loss on a 72-token plain-English paragraph is 2.28 (perplexity 9.8) with the rows
as stored, and 4.34 (perplexity 76) when they are also put through the HF->Meta permutation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..config import ModelConfig
from .common import Checkpoint, CheckpointError, TensorStream, atomic_file, meta_tensors, strip_tied, validate_state_dict
from .names import GGUF_NAMES, GGUF_TO_CANONICAL, rename

MAGIC = b"GGUF"


def _gguf():
    import gguf  # imported lazily: only GGUF users pay for it

    return gguf


def _field_value(field: Any) -> Any:
    """Decode one GGUFReader field: strings to str, arrays to Python lists, scalars to Python numbers."""
    gguf = _gguf()
    vt = gguf.GGUFValueType
    main = field.types[0]

    def one(idx: int, t: Any) -> Any:
        part = field.parts[idx]
        if t == vt.STRING:
            return bytes(part).decode("utf-8")
        if t == vt.FLOAT32:  # shortest decimal that round-trips: 1e-05, not 9.999999747378752e-06
            return float(str(np.float32(part[0])))
        return part.tolist()[0]

    if main == vt.ARRAY:
        sub = field.types[-1]
        if sub == vt.ARRAY:  # nested arrays: no llama key uses them; keep them out of the way
            return None
        return [one(i, sub) for i in field.data]
    return one(field.data[0], main) if field.data else None


def read_metadata(reader: Any) -> dict[str, Any]:
    """All key/values except the reader's own ``GGUF.*`` header fields."""
    return {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def dequantize_tensor(t: Any, source: Path) -> torch.Tensor:
    """One ReaderTensor -> torch tensor in PyTorch dim order (GGUF lists dims fastest-first, the
    reverse). F32/F16 keep their dtype, BF16 -> bfloat16, quantized types -> float32."""
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    qt = t.tensor_type
    data = np.asarray(t.data)
    if qt == Q.F32:
        arr = data.astype(np.float32, copy=False)
    elif qt == Q.F16:
        arr = data.astype(np.float16, copy=False)
    elif qt == Q.F64:
        arr = data.astype(np.float64, copy=False)
    elif qt == Q.BF16:
        raw = np.ascontiguousarray(data).view(np.uint16).astype(np.int16, copy=False)
        return torch.from_numpy(raw.copy()).view(torch.bfloat16).reshape(shape)
    else:
        try:
            arr = gguf.quants.dequantize(data, qt)
        except (NotImplementedError, ValueError, KeyError, getattr(gguf.quants, "QuantError", ValueError)) as e:
            raise CheckpointError(source, f"quantization type {qt.name} cannot be dequantized: {e}",
                                  tensor=t.name) from None
    if arr.size != int(np.prod(shape)):
        raise CheckpointError(source, f"holds {arr.size} values, its shape {list(shape)} needs "
                                      f"{int(np.prod(shape))}", tensor=t.name)
    arr = arr.reshape(shape)
    if not (arr.flags.writeable and arr.flags.c_contiguous):
        arr = np.array(arr, copy=True)  # the reader's arrays are read-only views of a memory map
    return torch.from_numpy(arr)


def _check_dequantizable(t: Any, source: Path) -> None:
    """Fail now, before any weight is read, on a quantization type gguf cannot dequantize: try its
    first block (a few bytes)."""
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    qt = t.tensor_type
    if qt in (Q.F32, Q.F16, Q.F64, Q.BF16):
        return
    type_size = gguf.GGML_QUANT_SIZES[qt][1] if qt in gguf.GGML_QUANT_SIZES else 0
    try:
        gguf.quants.dequantize(np.asarray(t.data).reshape(-1)[:type_size], qt)
    except (NotImplementedError, ValueError, KeyError, getattr(gguf.quants, "QuantError", ValueError)) as e:
        raise CheckpointError(source, f"quantization type {qt.name} cannot be dequantized: {e}",
                              tensor=t.name) from None


def _open(path: Path) -> Any:
    """GGUFReader with the file's magic and extent checked first, so a wrong or truncated file
    gives one clear error instead of a numpy exception from deep inside the reader."""
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != MAGIC:
        raise CheckpointError(path, f"not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
    try:
        reader = _gguf().GGUFReader(str(path), "r")
    except Exception as e:  # truncated header/metadata, bad version
        raise CheckpointError(path, f"cannot be parsed as GGUF (truncated or corrupt?): {e!r}") from None
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or np.asarray(t.data).nbytes != int(t.n_bytes):
            raise CheckpointError(path, f"file is truncated: tensor data ends at byte {end}, "
                                        f"the file has {size}", tensor=t.name)
    return reader


def load_gguf(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a llama-architecture GGUF file: metadata, names, shapes and quantization types are
    checked now; :meth:`Checkpoint.tensors` dequantizes one tensor at a time from the memory map
    (to float32 where quantized)."""
    p = Path(path)
    reader = _open(p)
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise CheckpointError(p, "Llama-3.1-style RoPE frequency scaling is not supported", tensor="rope_freqs.weight")
    try:
        cfg = ModelConfig.from_gguf_metadata(meta, name=p.stem, tied="output.weight" not in names)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(p, f"bad llama metadata: {e!r}") from None
    rope_dims = meta.get("llama.rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != cfg.head_dim:
        raise CheckpointError(p, f"llama.rope.dimension_count {rope_dims} != head_dim {cfg.head_dim} "
                                 "(partial RoPE is not supported)")
    shapes: dict[str, tuple[int, ...]] = {}
    by_canon: dict[str, Any] = {}
    for t in reader.tensors:
        canon = rename(t.name, GGUF_TO_CANONICAL)
        if canon is None:
            raise CheckpointError(p, "unexpected tensor: no LLaMA weight has this GGUF name", tensor=t.name)
        shapes[canon] = tuple(int(n) for n in reversed(t.shape.tolist()))
        by_canon[canon] = t
    validate_state_dict(meta_tensors(shapes), cfg, p, file_name=lambda n: rename(n, GGUF_NAMES))
    for t in by_canon.values():
        _check_dequantizable(t, p)

    def read() -> TensorStream:
        for canon, t in by_canon.items():
            yield canon, dequantize_tensor(t, p)

    return Checkpoint("gguf", cfg, shapes, read=read, tokenizer_file=None, metadata=meta)


# ------------------------------------------------------------------------------------------ writer
def _add_value(writer: Any, key: str, val: Any) -> None:
    """Write one metadata value with a type inferred from the Python value (ints: uint32 when
    non-negative, as llama.cpp writes token ids; int32 otherwise; floats: float32)."""
    gguf = _gguf()
    vt = gguf.GGUFValueType
    if isinstance(val, bool):
        writer.add_bool(key, val)
    elif isinstance(val, int):
        (writer.add_uint32 if val >= 0 else writer.add_int32)(key, val)
    elif isinstance(val, float):
        writer.add_float32(key, val)
    elif isinstance(val, str):
        writer.add_string(key, val)
    elif isinstance(val, (list, tuple)):
        if not val:
            return
        if all(isinstance(v, str) for v in val):
            sub = vt.STRING
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in val):
            sub = vt.INT32
        else:
            sub = vt.FLOAT32
        writer.add_key_value(key, list(val), vt.ARRAY, sub_type=sub)
    else:
        raise TypeError(f"GGUF metadata {key!r}: cannot write a {type(val).__name__}")


def encode_blocks(t: torch.Tensor, qtype: str) -> np.ndarray:
    """fp32 [rows, cols] -> GGUF's raw bytes [rows, bytes per row] for BF16 / Q8_0 in torch (bit-exact
    with ``gguf.quants``, which is pure numpy and ~100x slower on a 7B model); other types through
    ``gguf.quants``. Q8_0: per block of 32, an fp16 scale d = max|x|/127 then 32 int8 round(x/d),
    half away from zero like ggml."""
    if qtype == "BF16":  # torch rounds to nearest even, as ggml_compute_fp32_to_bf16
        return t.contiguous().to(torch.bfloat16).view(torch.uint8).numpy()
    if qtype != "Q8_0":
        gguf = _gguf()
        return gguf.quants.quantize(t.numpy(), gguf.GGMLQuantizationType[qtype])
    rows = t.shape[0]
    blocks = t.contiguous().reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    v = blocks * inv
    a = v.abs()
    q = torch.sign(v) * (a.floor() + (2 * (a - a.floor())).floor())
    out = torch.cat([d.half().view(torch.uint8), q.to(torch.int8).view(torch.uint8)], dim=1)
    return out.reshape(rows, -1).numpy()


# Types the writer produces: the float types plus the block quantizations gguf.quants can encode.
WRITE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def save_gguf(cfg: ModelConfig, sd: Mapping[str, torch.Tensor], path: str | os.PathLike[str],
              qtype: str = "F32", tokenizer: Mapping[str, Any] | None = None) -> Path:
    """Write a llama GGUF file that :func:`load_gguf` (and llama.cpp) reads, atomically.

    qtype: one of :data:`WRITE_TYPES` for the 2-D weights. Norms stay F32 (as llama.cpp keeps
        them), and so does a matrix whose rows are not a whole number of quant blocks.
    tokenizer: ``tokenizer.*`` key/values to copy (e.g. a loaded GGUF's metadata); other keys are ignored.
    """
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    if qtype not in WRITE_TYPES:
        raise CheckpointError(path, f"qtype {qtype!r}: expected one of {', '.join(WRITE_TYPES)}")
    qt = Q[qtype]
    ftype = gguf.LlamaFileType.ALL_F32 if qtype == "F32" else gguf.LlamaFileType[f"MOSTLY_{qtype}"]
    block = gguf.GGML_QUANT_SIZES[qt][0]
    sd = strip_tied(sd, cfg)
    validate_state_dict(sd, cfg, path)
    out = Path(path)
    with atomic_file(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name(cfg.name)
        w.add_block_count(cfg.n_layers)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.dim)
        w.add_feed_forward_length(cfg.hidden_dim)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_file_type(int(ftype))
        for k, v in (tokenizer or {}).items():
            if k.startswith("tokenizer."):
                _add_value(w, k, v)
        for name, t in sd.items():
            t = t.detach().cpu().float()
            gname = rename(name, GGUF_NAMES)
            assert gname is not None  # validate_state_dict accepted only canonical names
            if t.ndim < 2 or qt == Q.F32 or t.shape[-1] % block:
                w.add_tensor(gname, t.numpy())
            elif qt == Q.F16:
                w.add_tensor(gname, t.half().numpy())
            else:  # GGUF stores the rows as they are: same adjacent-pair Q/K layout as ours
                w.add_tensor(gname, encode_blocks(t, qtype), raw_dtype=qt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out
