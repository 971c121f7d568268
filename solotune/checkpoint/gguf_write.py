"""Export a model and its tokenizer as one llama.cpp GGUF file (``solotune merge --format gguf``).

The tensors go through :func:`.gguf.save_gguf` (rows as stored: solotune's Q/K rows are already
in Meta's adjacent-pair RoPE order, which is what ggml's "normal" RoPE rotates). This module adds
what llama.cpp needs to *use* the file: the ``tokenizer.*`` metadata in its layout —

* SentencePiece ``tokenizer.model`` (LLaMA-2): ``tokenizer.ggml.model = "llama"``, every piece
  with its score and type (normal / unknown / control / unused / byte);
* a ``tokenizers`` byte-level BPE ``tokenizer.json`` (SmolLM2, GPT-2 style): ``"gpt2"``, tokens in
  id order, merges as ``"left right"`` strings, ``tokenizer.ggml.pre`` named from the
  pre-tokenizer (digits split one by one then GPT-2's regex = ``"smollm"``; the regex alone =
  ``"gpt-2"``);
* a ``tokenizer.json`` BPE with byte fallback (LLaMA-2's HF form): ``"llama"``, with scores made
  from the merge ranks (the piece built by merge r scores -r) so SentencePiece's "merge the
  best-scoring pair" picks the same merges;
* a tokenizer read from a GGUF file: the ``tokenizers`` object solotune built from its vocab,
  exported as above (one code path; re-reading the source file's 49k-string vocab is slow);

plus BOS/EOS/unknown/padding ids, ``add_bos_token`` and the chat template.

The tokenizer is duck-typed (``solotune.tokenizer.Tokenizer``'s attributes): ``checkpoint`` must
not import ``tokenizer`` (that module imports this package).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from ..config import ModelConfig
from .common import CheckpointError
from .gguf import save_gguf

# --gguf-type -> the GGML tensor type of the 2-D weights (norms stay F32)
GGUF_TYPES: dict[str, str] = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}

# llama.cpp's token types (tokenizer.ggml.token_type; gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def write_gguf(cfg: ModelConfig, sd: Mapping[str, torch.Tensor], path: str | os.PathLike[str],
               gguf_type: str = "f16", tokenizer: Any = None) -> Path:
    """Write ``sd`` (canonical names, [out, in] weights) and ``tokenizer`` as one GGUF, atomically.

    gguf_type: a key of :data:`GGUF_TYPES`. tokenizer: a ``solotune.tokenizer.Tokenizer`` (None:
    no vocab -- llama.cpp then cannot load the file, solotune can with ``--tokenizer``).
    """
    if gguf_type not in GGUF_TYPES:
        raise CheckpointError(path, f"--gguf-type {gguf_type!r}: expected one of {', '.join(GGUF_TYPES)}")
    meta = tokenizer_metadata(tokenizer) if tokenizer is not None else {}
    n_tok = len(meta.get("tokenizer.ggml.tokens", ()))
    if meta and n_tok != cfg.vocab_size:
        # llama.cpp requires one token per embedding row: pad a short vocab with unused pieces
        if n_tok > cfg.vocab_size:
            raise CheckpointError(path, f"the tokenizer has {n_tok} tokens, the model's vocab only {cfg.vocab_size}")
        meta = _pad_vocab(meta, cfg.vocab_size)
    return save_gguf(cfg, sd, path, qtype=GGUF_TYPES[gguf_type], tokenizer=meta)


def tokenizer_metadata(tokenizer: Any) -> dict[str, Any]:
    """The ``tokenizer.*`` key/values llama.cpp reads for ``tokenizer`` (see the module doc)."""
    src = Path(getattr(tokenizer, "source", "") or "")
    backend = tokenizer.backend
    if hasattr(backend, "sp"):
        meta = _sentencepiece(backend.sp)
    elif hasattr(backend, "tok"):  # tokenizer.json, or the `tokenizers` object built from a GGUF vocab
        meta = _tokenizers_json(backend.tok, src)
    else:
        raise CheckpointError(src, "cannot export this tokenizer to GGUF (neither SentencePiece nor `tokenizers`)")
    meta["tokenizer.ggml.eos_token_id"] = int(tokenizer.eos_id)
    if tokenizer.bos_id is not None:
        meta["tokenizer.ggml.bos_token_id"] = int(tokenizer.bos_id)
    if getattr(tokenizer, "pad_id", None) is not None:
        meta["tokenizer.ggml.padding_token_id"] = int(tokenizer.pad_id)
    meta["tokenizer.ggml.add_bos_token"] = bool(tokenizer.add_bos)
    meta["tokenizer.ggml.add_eos_token"] = False
    if getattr(tokenizer, "chat_template", None):
        meta["tokenizer.chat_template"] = tokenizer.chat_template
    return meta


def _sentencepiece(sp: Any) -> dict[str, Any]:
    """Pieces, scores and types straight from the SentencePiece model."""
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        types.append(UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else
                     UNUSED if sp.is_unused(i) else BYTE if sp.is_byte(i) else NORMAL)
    meta: dict[str, Any] = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
                            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
                            "tokenizer.ggml.token_type": types, "tokenizer.ggml.add_space_prefix": True}
    if sp.unk_id() >= 0:
        meta["tokenizer.ggml.unknown_token_id"] = int(sp.unk_id())
    return meta


def _tokenizers_json(tok: Any, src: Path) -> dict[str, Any]:
    """A ``tokenizers`` BPE: byte-level -> "gpt2" + merges; byte fallback -> "llama" + scores."""
    j = json.loads(tok.to_str())
    model = j.get("model") or {}
    if model.get("type") != "BPE":
        raise CheckpointError(src, f"GGUF export supports BPE tokenizers, this one is {model.get('type')!r}")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {int(a["id"]): a for a in j.get("added_tokens") or []}
    for i, a in added.items():
        vocab.setdefault(a["content"], i)
    n = max(vocab.values()) + 1
    tokens = [""] * n
    for piece, i in vocab.items():
        tokens[i] = piece
    missing = [i for i, t in enumerate(tokens) if t == "" and i not in added]
    if missing:
        raise CheckpointError(src, f"the vocab has no token with id {missing[0]}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    types = [CONTROL if i in added and added[i].get("special") else USER_DEFINED if i in added else NORMAL
             for i in range(n)]
    if model.get("byte_fallback"):
        return _spm_bpe(tokens, types, merges, model, vocab)
    pre = _pre_name(j.get("pre_tokenizer"), src)
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}


def _spm_bpe(tokens: list[str], types: list[int], merges: list[str], model: Mapping[str, Any],
             vocab: Mapping[str, int]) -> dict[str, Any]:
    """SentencePiece-style BPE (``▁`` for spaces, ``<0xNN>`` byte pieces): scores from merge ranks."""
    rank = {}
    for r, m in enumerate(merges):
        rank.setdefault(m.replace(" ", ""), r)
    scores = []
    for i, t in enumerate(tokens):
        if types[i] != NORMAL:
            scores.append(0.0)
        elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types[i] = BYTE
            scores.append(0.0)
        else:  # unmerged single characters rank after every merge, in id order
            scores.append(-float(rank.get(t, len(merges) + i)))
    unk = model.get("unk_token")
    for i, t in enumerate(tokens):
        if t == unk:
            types[i] = UNKNOWN
    meta: dict[str, Any] = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
                            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
                            "tokenizer.ggml.token_type": types, "tokenizer.ggml.add_space_prefix": True}
    if unk in vocab:
        meta["tokenizer.ggml.unknown_token_id"] = int(vocab[unk])
    return meta


def _pre_name(pre: Any, src: Path) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level pre-tokenizer we can name exactly."""
    parts = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre or {}]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    raise CheckpointError(src, f"GGUF export: the pre-tokenizer {kinds} has no llama.cpp name solotune knows "
                               "(supported: ByteLevel = gpt-2; Digits(individual)+ByteLevel = smollm)")


def _pad_vocab(meta: dict[str, Any], size: int) -> dict[str, Any]:
    """Append unused ``[PADn]`` tokens up to the embedding's row count."""
    meta = dict(meta)
    n = len(meta["tokenizer.ggml.tokens"])
    extra = size - n
    meta["tokenizer.ggml.tokens"] = list(meta["tokenizer.ggml.tokens"]) + [f"[PAD{n + k}]" for k in range(extra)]
    meta["tokenizer.ggml.token_type"] = list(meta["tokenizer.ggml.token_type"]) + [UNUSED] * extra
    if "tokenizer.ggml.scores" in meta:
        meta["tokenizer.ggml.scores"] = list(meta["tokenizer.ggml.scores"]) + [-1e9] * extra
    return meta
