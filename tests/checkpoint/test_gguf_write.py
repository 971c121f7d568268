"""GGUF export: the block encoders agree with ``gguf.quants`` byte for byte; the tokenizer metadata
rebuilds the same tokenizer (LLaMA-2 SentencePiece and tokenizer.json, SmolLM2's byte-level BPE);
the real SmolLM2 exported as f16 loads in transformers' GGUF loader with our logits and greedy tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from solotune.checkpoint import CheckpointError, load_checkpoint
from solotune.checkpoint.gguf import encode_blocks
from solotune.checkpoint.gguf_write import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, tokenizer_metadata, write_gguf
from solotune.config import ModelConfig
from solotune.model import build_model
from solotune.tokenizer import Tokenizer, load_tokenizer

gguf = pytest.importorskip("gguf")
ASSETS = Path(__file__).resolve().parents[1] / "assets"
TEXTS = ["Hello world", "The  quick brown fox, 1234 ünïcode 🙂 tabs\there", "<s>[INST] hi [/INST] answer </s>",
         " leading space and trailing ", "<|im_start|>user\nWhat is 17*23?<|im_end|>\n"]


@pytest.mark.parametrize("qtype", ["BF16", "Q8_0"])
def test_block_encoders_match_gguf_quants(qtype):
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(0)) * 3
    x[0, :32] = 0  # an all-zero Q8_0 block: scale 0, no division by zero
    x[1, :32] = torch.arange(32) / 2 - 8  # exact halves: ggml rounds them away from zero
    ours = encode_blocks(x, qtype)
    ref = gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType[qtype])
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("source", ["llama2_tokenizer.model", "llama2_tokenizer.json"])
def test_llama2_tokenizer_round_trips_through_gguf_metadata(source, alpaca_records):
    tok = load_tokenizer(ASSETS / source)
    meta = tokenizer_metadata(tok)
    assert meta["tokenizer.ggml.model"] == "llama" and len(meta["tokenizer.ggml.tokens"]) == 32000
    types = meta["tokenizer.ggml.token_type"]
    assert types.count(BYTE) == 256 and types.count(UNKNOWN) == 1 and types.count(CONTROL) == 2
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    back = Tokenizer.from_gguf_metadata(meta)
    texts = TEXTS + [r["instruction"] + "\n" + r["output"] for r in alpaca_records[:60]]
    for t in texts:
        assert back.encode(t) == tok.encode(t), t
    assert back.add_bos and back.decode(tok.encode(TEXTS[1])) == tok.decode(tok.encode(TEXTS[1]))


def test_unsupported_tokenizers_are_refused():
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()  # no llama.cpp pre-tokenizer of that name
    hf.add_special_tokens(["</s>"])
    from solotune.tokenizer import _HFBackend

    tok = Tokenizer(_HFBackend(hf), eos_id=3, bos_id=None, source="custom.json")
    with pytest.raises(CheckpointError, match="pre-tokenizer"):
        tokenizer_metadata(tok)


def test_short_vocab_is_padded_and_bad_type_refused(tmp_path):
    cfg = ModelConfig(name="t", dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=32016, hidden_dim=64,
                      max_seq_len=64)
    sd = build_model(cfg, seed=0).state_dict()
    tok = load_tokenizer(ASSETS / "llama2_tokenizer.model")
    p = write_gguf(cfg, sd, tmp_path / "m.gguf", "f32", tok)
    meta = load_checkpoint(p).metadata
    assert len(meta["tokenizer.ggml.tokens"]) == 32016  # llama.cpp wants one token per embedding row
    assert meta["tokenizer.ggml.token_type"][32000:] == [UNUSED] * 16
    assert meta["tokenizer.ggml.token_type"][1000] == NORMAL and meta["tokenizer.ggml.token_type"][100] == BYTE
    with pytest.raises(CheckpointError, match="gguf-type"):
        write_gguf(cfg, sd, tmp_path / "x.gguf", "q4_k", tok)
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
def test_real_smollm2_exports_for_transformers(smollm2_gguf, tmp_path):
    """SmolLM2 (its GGUF's vocab) -> our f16 GGUF: transformers' GGUF loader gives our logits and
    our greedy tokens, and the vocab read back tokenizes as the original. (Each GGUF parse of the
    49k-token vocab is slow on CPU: the file is parsed once by us and once by transformers.)"""
    transformers = pytest.importorskip("transformers")
    import solotune
    from solotune.checkpoint.common import strip_tied
    from solotune.generate import generate_tokens

    model, tok = solotune.load(smollm2_gguf)
    out = write_gguf(model.config, strip_tied(model.state_dict(), model.config), tmp_path / "s.gguf", "f16", tok)
    del model
    ck = load_checkpoint(out)
    ours = build_model(ck.config, ck.tensors()).eval()  # the same f16-rounded weights transformers reads
    our_tok = Tokenizer.from_gguf_metadata(ck.metadata)
    assert ck.metadata["tokenizer.ggml.pre"] == "smollm" and ck.metadata["tokenizer.chat_template"] == tok.chat_template
    for t in TEXTS:
        assert our_tok.encode(t) == tok.encode(t), t
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    ids = our_tok.encode("<|im_start|>user\nName three primary colors.<|im_end|>\n<|im_start|>assistant\n")
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=torch.tensor([ids])).logits, ours(torch.tensor([ids])),
                                   atol=2e-3, rtol=1e-3)
        hf_new = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    assert generate_tokens(ours, [ids], max_new_tokens=12)[0][: len(hf_new)] == hf_new
