"""Model invariants: parity with HF LlamaForCausalLM, KV cache == no cache, padding, checkpointing."""

from __future__ import annotations

import pytest
import torch
from hf_reference import random_hf_llama

from solotune.checkpoint.hf import hf_to_canonical
from solotune.config import PRESETS, ModelConfig
from solotune.model import build_model, checkpoint_policy

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "mha-untied": ModelConfig(name="t1", dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=128,
                              hidden_dim=96, rope_theta=10000.0),
    "gqa-tied": ModelConfig(name="t2", dim=64, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=100,
                            hidden_dim=80, rope_theta=500000.0, norm_eps=1e-6, tie_embeddings=True),
}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_logits_match_hf(kind: str) -> None:
    cfg = CONFIGS[kind]
    hf = random_hf_llama(cfg)
    ours = build_model(cfg, hf_to_canonical(hf.state_dict(), cfg, "hf-model")).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-4


def test_tied_head_shares_storage() -> None:
    model = build_model(CONFIGS["gqa-tied"], seed=0)
    assert model.output.weight is model.tok_embeddings.weight
    assert sum(p.numel() for p in model.parameters()) == CONFIGS["gqa-tied"].num_params()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_num_params_formula(name: str) -> None:
    from solotune.model import Transformer

    with torch.device("meta"):
        model = Transformer(PRESETS[name])
    assert sum(p.numel() for p in model.parameters()) == PRESETS[name].num_params()


def test_kv_cache_equals_no_cache() -> None:
    cfg = CONFIGS["gqa-tied"]
    model = build_model(cfg, seed=3).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(2, 16)
        parts = [model(tokens[:, :5], cache_pos=0)]
        for t in range(5, 12):  # one token at a time, as decoding does
            parts.append(model(tokens[:, t:t + 1], cache_pos=t))
    assert (torch.cat(parts, 1) - full).abs().max().item() <= 1e-5


def test_left_padding_matches_unpadded_rows() -> None:
    cfg = CONFIGS["mha-untied"]
    model = build_model(cfg, seed=4).eval()
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(0, cfg.vocab_size, (1, 9), generator=g), torch.randint(0, cfg.vocab_size, (1, 5), generator=g)
    pad = 9 - 5
    tokens = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)])
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[1, :pad] = False
    positions = torch.stack([torch.arange(9), (torch.arange(9) - pad).clamp(min=0)])
    with torch.no_grad():
        batched = model(tokens, positions=positions, key_mask=key_mask)
        assert (batched[0] - model(a)[0]).abs().max() <= 1e-5
        assert (batched[1, pad:] - model(b)[0]).abs().max() <= 1e-5
        assert torch.isfinite(batched).all()  # padding queries see themselves: no NaN


def test_grad_checkpointing_gives_same_gradients() -> None:
    cfg = CONFIGS["gqa-tied"]
    tokens = torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(6))
    grads = {}
    for policy in ("off", "all", "every:2"):
        model = build_model(cfg, seed=7, dtype=torch.float64).train()
        model.set_grad_checkpointing(policy)
        model(tokens).sum().backward()
        grads[policy] = [p.grad.clone() for p in model.parameters()]
    for policy in ("all", "every:2"):
        for g0, g1 in zip(grads["off"], grads[policy]):
            torch.testing.assert_close(g0, g1, rtol=0, atol=1e-12)


def test_checkpoint_policy_parsing() -> None:
    assert checkpoint_policy("off", 4) == frozenset()
    assert checkpoint_policy("all", 4) == frozenset(range(4))
    assert checkpoint_policy("every:2", 5) == frozenset({0, 2, 4})
    for bad in ("every:0", "every:x", "sometimes"):
        with pytest.raises(ValueError, match="checkpointing policy"):
            checkpoint_policy(bad, 4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_forward_close_to_fp32(dtype: torch.dtype) -> None:
    cfg = CONFIGS["mha-untied"]
    ref = build_model(cfg, seed=8).eval()
    low = build_model(cfg, ref.state_dict(), dtype=dtype).eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a, b = ref(tokens), low(tokens).float()
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    assert ((a - b).norm() / a.norm()).item() < 3e-2


def test_build_model_rejects_wrong_keys() -> None:
    cfg = CONFIGS["mha-untied"]
    sd = build_model(cfg, seed=0).state_dict()
    sd.pop("norm.weight")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="missing.*norm.weight.*unexpected.*extra.weight"):
        build_model(cfg, sd)


def test_build_model_from_a_stream_ties_and_ignores_a_given_head() -> None:
    """An iterable source (one tensor at a time) gives the same model as the dict; with tied
    embeddings an ``output.weight`` in the stream is ignored and the head is the embedding."""
    cfg = CONFIGS["gqa-tied"]
    ref = build_model(cfg, seed=5).eval()
    sd = ref.state_dict()  # lists the tied head too
    assert "output.weight" in sd
    model = build_model(cfg, ((k, v.clone()) for k, v in sd.items())).eval()
    assert model.output.weight is model.tok_embeddings.weight
    tokens = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref(tokens), atol=0, rtol=0)
