"""The real SmolLM2-135M-Instruct GGUF (Q4_1 + Q8_0 embedding): config, and the Q/K row layout
decided empirically -- GGUF rows as stored are right for our adjacent-pair RoPE."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from solotune.checkpoint import load_checkpoint
from solotune.checkpoint.names import hf_rows_to_meta
from solotune.config import ModelConfig
from solotune.model import build_model

TEXT = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is the "
        "capital of Germany. Water boils at one hundred degrees Celsius at sea level. The sun rises in the "
        "east and sets in the west. Many people enjoy reading books in the evening, while others prefer to "
        "watch television or go for a walk in the park.")


def gpt2_bpe(meta: dict):
    """Stand-alone byte-level BPE from the GGUF vocab/merges (enough to score plain English)."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {tok: i for i, tok in enumerate(meta["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tk = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    return tk


@torch.no_grad()
def mean_loss(cfg: ModelConfig, sd: dict[str, torch.Tensor], ids: torch.Tensor) -> float:
    lg = build_model(cfg, sd).eval()(ids[None, :-1])[0]
    return torch.nn.functional.cross_entropy(lg, ids[1:]).item()


@pytest.mark.slow
def test_real_smollm2(smollm2_gguf: Path):
    ck = load_checkpoint(smollm2_gguf)  # the session fixture fetches it (a fresh machine runs this test too)
    assert ck.format == "gguf"
    assert ck.config.replace(name="smollm2-135m") == ModelConfig.from_name("smollm2-135m"), ck.config
    assert "output.weight" not in ck.state_dict  # tied
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in ck.state_dict.values())
    assert ck.metadata["tokenizer.ggml.model"] == "gpt2" and len(ck.metadata["tokenizer.ggml.tokens"]) == 49152

    ids = torch.tensor(gpt2_bpe(ck.metadata).encode(TEXT).ids)
    assert len(ids) > 50
    as_stored = mean_loss(ck.config, ck.state_dict, ids)
    permuted = dict(ck.state_dict)  # what a loader that treated GGUF rows as HF's would build
    for k, v in permuted.items():
        if k.endswith("attention.wq.weight"):
            permuted[k] = hf_rows_to_meta(v, ck.config.n_heads)
        elif k.endswith("attention.wk.weight"):
            permuted[k] = hf_rows_to_meta(v, ck.config.n_kv_heads)
    wrong = mean_loss(ck.config, permuted, ids)
    print(f"SmolLM2 GGUF: loss as stored {as_stored:.3f} (ppl {math.exp(as_stored):.1f}), "
          f"HF->Meta permuted {wrong:.3f} (ppl {math.exp(wrong):.1f})")
    assert as_stored < math.log(20), as_stored
    assert wrong > as_stored + 1.0, (as_stored, wrong)
