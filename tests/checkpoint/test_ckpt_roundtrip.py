"""Every writer -> load_checkpoint gives back the same model (same config, same logits), and the
on-disk layouts are the real ones (Meta shard splits, HF shard index, GGUF quant types)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ckpt_helpers import CONFIGS, TINY, logits, random_model, same_arch, tokens

from solotune.checkpoint import (detect_format, load_checkpoint, load_gguf, load_meta, save_gguf, save_hf,
                                 save_meta)

gguf = pytest.importorskip("gguf")

WRITERS = {
    "meta-1": ("meta", lambda cfg, sd, p: save_meta(cfg, sd, p)),
    "meta-2": ("meta", lambda cfg, sd, p: save_meta(cfg, sd, p, shards=2)),
    "hf": ("hf", lambda cfg, sd, p: save_hf(cfg, sd, p)),
    "hf-sharded": ("hf", lambda cfg, sd, p: save_hf(cfg, sd, p, max_shard_bytes=40_000)),
    "gguf-f32": ("gguf", lambda cfg, sd, p: save_gguf(cfg, sd, p.with_suffix(".gguf"))),
}


@pytest.mark.parametrize("cfg_name", ["tiny", "gqa-tied"])
@pytest.mark.parametrize("writer", list(WRITERS))
def test_lossless_roundtrip(tmp_path, cfg_name, writer):
    cfg = CONFIGS[cfg_name]
    model = random_model(cfg)
    sd = model.state_dict()  # tied: lists output.weight too; the writers drop it
    fmt, write = WRITERS[writer]
    path = write(cfg, sd, tmp_path / "ckpt")
    assert detect_format(path) == fmt
    ck = load_checkpoint(path)
    assert ck.format == fmt
    assert same_arch(ck.config, cfg), (ck.config, cfg)
    assert ("output.weight" in ck.state_dict) == (not cfg.tie_embeddings)
    for k, v in ck.state_dict.items():
        assert torch.equal(v.float(), sd[k]), k  # names and the Q/K row layout came back exactly
    toks = tokens(cfg)
    torch.testing.assert_close(logits(ck.config, ck.state_dict, toks), model(toks), atol=1e-5, rtol=0)


def _dequantized(sd: dict[str, torch.Tensor], qtype) -> dict[str, torch.Tensor]:
    """What a quantized GGUF should load as: each 2-D tensor quantized and dequantized by gguf."""
    out = {}
    for k, v in sd.items():
        a = v.detach().float().numpy()
        if a.ndim == 2 and a.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
            a = gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype).reshape(a.shape)
        out[k] = torch.from_numpy(np.array(a, dtype=np.float32))
    return out


@pytest.mark.parametrize("cfg_name", ["tiny", "gqa-tied"])
@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_quantized_roundtrip(tmp_path, cfg_name, qtype):
    cfg = CONFIGS[cfg_name]
    model = random_model(cfg)
    sd = {k: v for k, v in model.state_dict().items() if not (cfg.tie_embeddings and k == "output.weight")}
    path = save_gguf(cfg, sd, tmp_path / f"m-{qtype}.gguf", qtype=qtype)
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == qtype and types["blk.0.attn_norm.weight"] == "F32"
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]  # 176 is no multiple of 32
    assert types["blk.0.ffn_down.weight"] == ("F32" if cfg.hidden_dim % block else qtype)
    ck = load_gguf(path)
    assert same_arch(ck.config, cfg)
    ref = _dequantized(sd, gguf.GGMLQuantizationType[qtype])
    for k, v in ck.state_dict.items():
        torch.testing.assert_close(v.float(), ref[k], atol=0, rtol=0, msg=k)
    toks = tokens(cfg)
    got = logits(ck.config, ck.state_dict, toks)
    torch.testing.assert_close(got, logits(cfg, ref, toks), atol=1e-5, rtol=0)
    exact = model(toks)
    rel = ((got - exact).norm() / exact.norm()).item()
    assert rel < {"F16": 1e-3, "BF16": 1e-2, "Q8_0": 2e-2, "Q4_0": 0.3, "Q4_1": 0.3}[qtype], rel


def test_meta_shards_split_like_model_parallel(tmp_path):
    """2 shards: column-parallel weights split rows, row-parallel weights and the embedding split
    columns, norms replicated -- and a hand-made sharding (written without save_meta) loads too."""
    cfg = TINY
    sd = random_model(cfg).state_dict()
    save_meta(cfg, sd, tmp_path / "a", shards=2)
    s0 = torch.load(tmp_path / "a" / "consolidated.00.pth", weights_only=True)
    C, H = cfg.dim, cfg.hidden_dim
    kv = cfg.n_kv_heads * cfg.head_dim
    assert s0["layers.0.attention.wq.weight"].shape == (C // 2, C)
    assert s0["layers.0.attention.wk.weight"].shape == (kv // 2, C)
    assert s0["layers.0.attention.wo.weight"].shape == (C, C // 2)
    assert s0["layers.0.feed_forward.w1.weight"].shape == (H // 2, C)
    assert s0["layers.0.feed_forward.w2.weight"].shape == (C, H // 2)
    assert s0["tok_embeddings.weight"].shape == (cfg.vocab_size, C // 2)
    assert s0["output.weight"].shape == (cfg.vocab_size // 2, C)
    assert s0["norm.weight"].shape == (C,)

    # Hand-made 2-way Meta sharding with a rope.freqs buffer and vocab_size -1 / multiple_of params.
    dims = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}
    shards: list[dict[str, torch.Tensor]] = [{"rope.freqs": torch.ones(4)}, {"rope.freqs": torch.ones(4)}]
    for k, v in sd.items():
        leaf = k.split(".")[-2]
        for r in range(2):
            shards[r][k] = v.chunk(2, dims[leaf])[r].clone() if leaf in dims else v.clone()
    d = tmp_path / "b"
    d.mkdir()
    for r in range(2):
        torch.save(shards[r], d / f"consolidated.{r:02d}.pth")
    params = {"dim": C, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
              "multiple_of": 16, "ffn_dim_multiplier": None, "norm_eps": cfg.norm_eps, "vocab_size": -1}
    (d / "params.json").write_text(json.dumps(params))
    ck = load_meta(d)
    # hidden 176 from multiple_of, vocab 256 from the weights; Meta's params.json has no max_seq_len
    assert same_arch(ck.config, cfg.replace(max_seq_len=4096)), ck.config
    assert "rope.freqs" not in ck.state_dict
    for k, v in sd.items():
        assert torch.equal(ck.state_dict[k], v), k


def test_hf_sharded_index(tmp_path):
    cfg = TINY
    sd = random_model(cfg).state_dict()
    d = save_hf(cfg, sd, tmp_path / "hf", max_shard_bytes=40_000)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((d / f).is_file() for f in files)
    assert not (d / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in sd.values())
    assert "model.layers.1.mlp.down_proj.weight" in index["weight_map"]


def test_tokenizer_file_found_and_gguf_tokenizer_metadata(tmp_path):
    cfg = CONFIGS["gqa-tied"]
    sd = random_model(cfg).state_dict()
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    assert load_checkpoint(save_hf(cfg, sd, tmp_path / "hf", tokenizer_file=tok)).tokenizer_file.name == "tokenizer.json"
    meta_dir = save_meta(cfg, sd, tmp_path / "models" / "m")
    assert load_checkpoint(meta_dir).tokenizer_file is None
    (tmp_path / "models" / "tokenizer.model").write_bytes(b"x")  # Meta's download layout: one level up
    assert load_checkpoint(meta_dir).tokenizer_file == tmp_path / "models" / "tokenizer.model"

    vocab = [f"t{i}" for i in range(cfg.vocab_size)]
    tk = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": vocab, "tokenizer.ggml.merges": ["t 1", "t 2"],
          "tokenizer.ggml.token_type": [1] * cfg.vocab_size, "tokenizer.ggml.bos_token_id": 1,
          "tokenizer.ggml.add_bos_token": False, "general.name": "ignored"}
    ck = load_checkpoint(save_gguf(cfg, sd, tmp_path / "m.gguf", tokenizer=tk))
    for k, v in tk.items():
        if k.startswith("tokenizer."):
            assert ck.metadata[k] == v, k
    assert ck.metadata["general.name"] == cfg.name
    assert ck.metadata["llama.attention.layer_norm_rms_epsilon"] == cfg.norm_eps  # float32 decoded cleanly


def test_detect_format_variants(tmp_path):
    cfg = TINY
    sd = random_model(cfg).state_dict()
    m = save_meta(cfg, sd, tmp_path / "meta")
    h = save_hf(cfg, sd, tmp_path / "hf")
    g = save_gguf(cfg, sd, tmp_path / "g" / "model.gguf")
    assert detect_format(m / "consolidated.00.pth") == "meta"  # a weight file resolves to its directory
    assert detect_format(h / "model.safetensors") == "hf"
    assert detect_format(g) == "gguf" and detect_format(g.parent) == "gguf"
    renamed = g.rename(tmp_path / "model.bin")  # the magic decides, not the suffix
    assert detect_format(renamed) == "gguf"


def test_writers_are_atomic(tmp_path):
    cfg = TINY
    sd = random_model(cfg).state_dict()
    d = save_hf(cfg, sd, tmp_path / "out")
    bad = dict(sd)
    bad["layers.0.attention.wq.weight"] = torch.zeros(3, 3)
    for write in (save_hf, save_meta):
        with pytest.raises(ValueError):
            write(cfg, bad, d)
    with pytest.raises(ValueError):
        save_gguf(cfg, bad, tmp_path / "x.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp leftovers, no partial file
    assert load_checkpoint(d).format == "hf"  # the earlier checkpoint is intact
    save_meta(cfg, sd, d)  # overwriting replaces the whole directory
    assert sorted(p.name for p in d.iterdir()) == ["consolidated.00.pth", "params.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
