"""solotune's LoRA: exact no-op at init, merge == unmerged forward, freezing, counts, state dicts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from solotune.config import ModelConfig
from solotune.model import build_model
from solotune.peft import (
    LORA_TARGETS,
    LoRALinear,
    apply_lora,
    count_parameters,
    load_lora_state_dict,
    lora_disabled,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    set_lora_merged,
    trainable_summary,
)

CFG = ModelConfig(name="t", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=48)


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (2, 7), generator=torch.Generator().manual_seed(seed))


def randomize_b(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, LoRALinear):
                m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.3)


def test_zero_b_is_exactly_the_base_model() -> None:
    model = build_model(CFG, seed=0).eval()
    with torch.no_grad():
        ref = model(tokens())
    apply_lora(model, LORA_TARGETS, rank=4, alpha=8, dropout=0.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(tokens())
    assert torch.equal(out, ref)
    assert all(m.lora_a.abs().max() > 0 for m in model.modules() if isinstance(m, LoRALinear))


def test_forward_formula_and_dropout_only_on_lora_path() -> None:
    base = nn.Linear(6, 5, bias=False)
    m = LoRALinear(base, rank=2, alpha=3, dropout=0.5, generator=torch.Generator().manual_seed(0))
    randomize_b(m)
    x = torch.randn(4, 6)
    m.eval()
    torch.testing.assert_close(m(x), x @ base.weight.T + x @ m.lora_a.T @ m.lora_b.T * 1.5)
    m.train()
    torch.manual_seed(0)
    y = m(x)
    torch.manual_seed(0)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    torch.testing.assert_close(y, x @ base.weight.T + dropped @ m.lora_a.T @ m.lora_b.T * 1.5)


def test_kaiming_uniform_bound_and_generator() -> None:
    base = nn.Linear(100, 8, bias=False)
    a1 = LoRALinear(base, 16, 32, generator=torch.Generator().manual_seed(5)).lora_a
    a2 = LoRALinear(nn.Linear(100, 8, bias=False), 16, 32, generator=torch.Generator().manual_seed(5)).lora_a
    assert torch.equal(a1, a2)
    a16 = LoRALinear(nn.Linear(100, 8, bias=False).bfloat16(), 16, 32, generator=torch.Generator().manual_seed(5)).lora_a
    assert a16.dtype == torch.bfloat16 and torch.equal(a16, a1.bfloat16())  # same draw whatever the dtype
    assert a1.abs().max() <= 0.1 and a1.abs().max() > 0.09  # U(-1/sqrt(in), 1/sqrt(in))


def test_merge_matches_unmerged_and_unmerge_restores() -> None:
    model = build_model(CFG, seed=0).eval()
    apply_lora(model, LORA_TARGETS, rank=4, alpha=8, dropout=0.1)
    assert not model.layers[0].attention.wq.training  # wrappers inherit eval mode: no dropout here
    randomize_b(model)
    base_w = {n: m.base.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    with torch.no_grad():
        unmerged = model(tokens())
        set_lora_merged(model, True)
        merged = model(tokens())
    assert (unmerged - build_model(CFG, seed=0)(tokens())).abs().max() > 1e-2
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    for n, m in model.named_modules():
        if isinstance(m, LoRALinear):
            assert m.merged and not torch.equal(m.base.weight, base_w[n])
    set_lora_merged(model, False)
    for n, m in model.named_modules():
        if isinstance(m, LoRALinear):
            assert not m.merged
            torch.testing.assert_close(m.base.weight, base_w[n], atol=1e-6, rtol=0)


def test_lora_disabled_gives_base_outputs() -> None:
    model = build_model(CFG, seed=0).eval()
    with torch.no_grad():
        ref = model(tokens())
    apply_lora(model, ("wq", "w3"), rank=4, alpha=8)
    randomize_b(model)
    with torch.no_grad():
        tuned = model(tokens())
        with lora_disabled(model):
            assert torch.equal(model(tokens()), ref)
        assert torch.equal(model(tokens()), tuned) and not torch.equal(tuned, ref)


def test_merge_lora_gives_plain_model() -> None:
    model = build_model(CFG, seed=0).eval()
    apply_lora(model, ("wq", "wk", "w2"), rank=4, alpha=8, dropout=0.0)
    randomize_b(model)
    with torch.no_grad():
        ref = model(tokens())
    plain = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    assert type(plain.layers[0].attention.wq) is nn.Linear
    assert set(plain.state_dict()) == set(build_model(CFG, seed=0).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens()), ref, atol=1e-5, rtol=0)


def test_only_lora_params_require_grad_and_get_grads() -> None:
    model = build_model(CFG, seed=0)
    apply_lora(model, ("wq", "wv"), rank=4, alpha=8)
    randomize_b(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.attention.{t}.lora_{ab}" for i in range(2) for t in ("wq", "wv") for ab in "ab"}
    assert {id(p) for p in lora_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}
    model(tokens()).sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n


def test_counts_and_summary() -> None:
    model = build_model(CFG, seed=0)
    total = CFG.num_params()
    assert count_parameters(model) == (total, total)
    r = 4
    apply_lora(model, ("wq", "wk", "w2"), rank=r, alpha=8)
    kv = CFG.n_kv_heads * CFG.head_dim
    per_layer = r * (CFG.dim + CFG.dim) + r * (CFG.dim + kv) + r * (CFG.hidden_dim + CFG.dim)
    lora = CFG.n_layers * per_layer
    assert count_parameters(model) == (lora, total + lora)
    pct = 100 * lora / (total + lora)
    assert trainable_summary(model) == f"trainable params: {lora:,} || all params: {total + lora:,} || trainable%: {pct:.4f}"
    tied = build_model(CFG.replace(tie_embeddings=True), seed=0)
    assert count_parameters(tied)[1] == CFG.replace(tie_embeddings=True).num_params()  # shared once


def test_summary_matches_peft_wording() -> None:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    import contextlib
    import io

    kw = {k: v for k, v in CFG.to_hf_config().items() if k not in ("architectures", "model_type", "torch_dtype")}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        pm.print_trainable_parameters()
    ours = apply_lora(build_model(CFG, seed=0), ("wq", "wv"), rank=4, alpha=8)
    assert trainable_summary(ours) == buf.getvalue().strip()


def test_state_dict_round_trip_and_errors() -> None:
    model = build_model(CFG, seed=0)
    apply_lora(model, ("wq", "wv"), rank=4, alpha=8, generator=torch.Generator().manual_seed(0))
    randomize_b(model)
    sd = {k: v.clone() for k, v in lora_state_dict(model).items()}
    assert sorted(sd)[:2] == ["layers.0.attention.wq.lora_a", "layers.0.attention.wq.lora_b"]
    assert sd["layers.1.attention.wv.lora_b"].shape == (CFG.n_kv_heads * CFG.head_dim, 4)
    other = apply_lora(build_model(CFG, seed=0), ("wq", "wv"), rank=4, alpha=8)
    load_lora_state_dict(other, sd)
    model.eval(), other.eval()
    with torch.no_grad():
        assert torch.equal(model(tokens()), other(tokens()))
    with pytest.raises(KeyError, match="missing"):
        load_lora_state_dict(other, {k: v for k, v in sd.items() if "layers.1" not in k})
    with pytest.raises(ValueError, match="layers.0.attention.wq.lora_a"):
        load_lora_state_dict(other, {**sd, "layers.0.attention.wq.lora_a": torch.zeros(8, CFG.dim)})


def test_apply_lora_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="wz"):
        apply_lora(build_model(CFG, seed=0), ("wq", "wz"))
    model = apply_lora(build_model(CFG, seed=0), ("wq",))
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, ("wv",))
    with pytest.raises(NotImplementedError, match="QLoRA"):
        LoRALinear(nn.Linear(4, 4, bias=False), 2, 4, quantize_base=True)
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(4, 4, bias=False), 0, 4)


def test_dtypes() -> None:
    model = build_model(CFG, seed=0, dtype=torch.bfloat16)
    m16 = apply_lora(copy.deepcopy(model), ("wq",))
    assert m16.layers[0].attention.wq.lora_a.dtype == torch.bfloat16
    m32 = apply_lora(copy.deepcopy(model), ("wq",), lora_dtype=torch.float32)
    lin = m32.layers[0].attention.wq
    assert lin.lora_a.dtype == lin.lora_b.dtype == torch.float32 and lin.base.weight.dtype == torch.bfloat16
    randomize_b(m32)
    out = m32(tokens())
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert lin.lora_b.grad.dtype == torch.float32
