"""Quantized bases in a whole model (solotune/quant/load.py): swap on the meta device then fill
while tensors stream in == quantizing a built model; the quantized model computes what a dense
model holding the dequantized weights computes; random-init sources; the merged 16-bit export."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from solotune.config import ModelConfig
from solotune.model import Transformer, build_model
from solotune.peft import LoRALinear
from solotune.peft.spec import LORA_TARGETS
from solotune.quant import (Int8Linear, NF4Linear, dense_names, dense_state_dict, load_quantized, quantized_modules,
                            random_source, swap_in_quantized)

CFG = ModelConfig(name="t", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=128)
TIED = ModelConfig(name="t2", dim=64, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=50, hidden_dim=96,
                   tie_embeddings=True)
KINDS = {"nf4": NF4Linear, "int8": Int8Linear}


def _meta(cfg: ModelConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg)


def _tokens() -> torch.Tensor:
    return torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cfg", [CFG, TIED], ids=["untied", "tied"])
def test_meta_swap_then_stream_equals_quantizing_a_built_model(kind, cfg):
    built = build_model(cfg, seed=0)
    ref = swap_in_quantized(build_model(cfg, seed=0), kind, compute_dtype=torch.float32)
    model = swap_in_quantized(_meta(cfg), kind, compute_dtype=torch.float32)
    assert all(b.device.type == "meta" for b in model.buffers())
    stream = ((k, v.clone()) for k, v in built.state_dict().items())  # a generator, as Checkpoint.tensors()
    load_quantized(model, stream, dtype=torch.float32, device="cpu")
    quant = quantized_modules(model)
    assert len(quant) == 7 * cfg.n_layers and all(isinstance(m, KINDS[kind]) for m in quant.values())
    assert isinstance(model.tok_embeddings, nn.Embedding) and isinstance(model.output, nn.Linear)  # 16-bit, as QLoRA
    sd, sd_ref = model.state_dict(), ref.state_dict()
    assert sd.keys() == sd_ref.keys()
    assert all(torch.equal(sd[k], sd_ref[k]) for k in sd)
    if cfg.tie_embeddings:
        assert model.output.weight is model.tok_embeddings.weight
    assert torch.equal(model(_tokens()), ref(_tokens()))


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_model_computes_the_dense_model_of_its_dequantized_weights(kind):
    built = build_model(CFG, seed=1)
    q = swap_in_quantized(build_model(CFG, seed=1), kind, compute_dtype=torch.float32)
    dense = build_model(CFG, seed=1)
    with torch.no_grad():
        for name, m in quantized_modules(q).items():
            dense.get_submodule(name).weight.copy_(m.dequantize())
    assert torch.allclose(q(_tokens()), dense(_tokens()), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(q(_tokens()), built(_tokens()), rtol=1e-5, atol=1e-6)  # it is quantized


def test_streamed_file_dtype_is_quantized_as_is_and_the_rest_cast():
    """A bf16 checkpoint: each quantized weight is quantized from its bf16 values (no fp32 copy
    needed), the norms and embeddings land in the requested dtype."""
    built = build_model(CFG, seed=2, dtype=torch.bfloat16)
    model = swap_in_quantized(_meta(CFG), "nf4", compute_dtype=torch.bfloat16)
    load_quantized(model, built.state_dict(), dtype=torch.float32)
    wq = model.layers[0].attention.wq
    assert torch.equal(wq.codes, NF4Linear.from_weight(built.layers[0].attention.wq.weight).codes)
    assert model.norm.weight.dtype == torch.float32 and model.tok_embeddings.weight.dtype == torch.float32


def test_missing_and_unexpected_names_are_one_keyerror():
    built = build_model(CFG, seed=0).state_dict()
    model = swap_in_quantized(_meta(CFG), "nf4")
    partial = {k: v for k, v in built.items() if k != "layers.1.feed_forward.w2.weight"}
    partial["bogus.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="layers.1.feed_forward.w2.weight.*bogus.weight"):
        load_quantized(model, partial, dtype=torch.float32)


def test_only_the_named_targets_swap_and_names_stay_the_checkpoints():
    model = swap_in_quantized(_meta(CFG), "int8", targets=("wq", "w2"))
    assert set(quantized_modules(model)) == {f"layers.{i}.{p}" for i in range(2)
                                             for p in ("attention.wq", "feed_forward.w2")}
    assert isinstance(model.layers[0].attention.wk, nn.Linear)
    assert sorted(dense_names(model)) == sorted(build_model(CFG, seed=0).state_dict())
    with pytest.raises(ValueError):
        swap_in_quantized(_meta(CFG), "nf3")
    with pytest.raises(ValueError):
        swap_in_quantized(_meta(CFG), "nf4", targets=("output",))


def test_random_source_builds_a_quantized_model_layer_by_layer():
    model = swap_in_quantized(_meta(CFG), "nf4", compute_dtype=torch.float32)
    load_quantized(model, random_source(model, std=0.02, generator=torch.Generator().manual_seed(0)),
                   dtype=torch.float32)
    assert not any(b.is_meta for b in model.buffers()) and not any(p.is_meta for p in model.parameters())
    assert torch.equal(model.norm.weight, torch.ones(64))
    w = model.layers[0].feed_forward.w1.dequantize()
    assert 0.01 < w.std().item() < 0.03  # normal(0, 0.02), seen through 4 bits
    assert torch.isfinite(model(_tokens())).all()
    assert set(LORA_TARGETS) == {n.rpartition(".")[2] for n in quantized_modules(model)}


def test_dense_state_dict_is_the_merged_16bit_model():
    """QLoRA export: for every adapted module, dequantized base + delta, one rounding; bare
    quantized modules dequantized; the rest cast. The names are those of a dense checkpoint, so
    a dense model loads it and computes what the QLoRA model computes."""
    q = swap_in_quantized(build_model(CFG, seed=3), "nf4", compute_dtype=torch.float32)
    # apply_lora picks its targets by a ``.weight``, which a quantized base has not (see the
    # report/issue): wrap the swapped bases directly.
    g = torch.Generator().manual_seed(0)
    for block in q.layers:
        for leaf in ("wq", "wv"):
            lora = LoRALinear(getattr(block.attention, leaf), rank=4, alpha=8.0, generator=g)
            with torch.no_grad():
                lora.lora_b.normal_(0, 0.05, generator=g)
            setattr(block.attention, leaf, lora)
    merged = dict(dense_state_dict(q, torch.float32))
    assert sorted(merged) == sorted(build_model(CFG, seed=0).state_dict())
    wq = q.layers[0].attention.wq
    assert torch.equal(merged["layers.0.attention.wq.weight"], wq.merged_weight(torch.float32))
    assert torch.equal(merged["layers.1.feed_forward.w2.weight"], q.layers[1].feed_forward.w2.dequantize())
    dense = build_model(CFG, merged)
    assert torch.allclose(dense(_tokens()), q(_tokens()), rtol=1e-5, atol=1e-5)
    assert all(t.dtype == torch.bfloat16 for _, t in dense_state_dict(q))
