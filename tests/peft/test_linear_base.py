"""LoRALinear's base is an interface (``solotune.peft.LinearBase``): a toy "quantized" base (int8
weight + per-row scale) and a toy writable one (weight stored transposed) wrapped through
``apply_lora(model, spec, base_factory=...)`` train, and forward exactly as LoRA over their
dequantized weights; merge refuses the base that cannot be written back."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from solotune.config import ModelConfig
from solotune.model import build_model
from solotune.peft import LinearBase, LoRALinear, LoRASpec, PlainLinearBase, apply_lora, lora_modules, lora_parameters

CFG = ModelConfig(name="t", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=48)
SPEC = LoRASpec(rank=4, alpha=8.0, dropout=0.0, targets=("wq", "wv", "w2"))


class Int8Linear(nn.Module):
    """A frozen int8 weight with one fp32 scale per output row; computes in fp32."""

    writable = False

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-8) / 127.0
        self.register_buffer("q", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self.q.device

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype))

    def weight_bytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 4

    def write_weight(self, weight: torch.Tensor) -> None:
        raise AssertionError("never called: not writable")


class TransposedLinear(nn.Module):
    """A plain fp32 weight stored as [in, out]: writable, but not an nn.Linear."""

    writable = True

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.register_buffer("wt", linear.weight.detach().t().contiguous().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    dtype = property(lambda self: self.wt.dtype)
    device = property(lambda self: self.wt.device)

    def dequantize(self) -> torch.Tensor:
        return self.wt.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.wt

    def weight_bytes(self) -> int:
        return self.wt.numel() * self.wt.element_size()

    @torch.no_grad()
    def write_weight(self, weight: torch.Tensor) -> None:
        self.wt.copy_(weight.t())


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (2, 7), generator=torch.Generator().manual_seed(seed))


def randomize_b(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.3)


def _int8_model() -> nn.Module:
    names: list[str] = []

    def factory(name: str, linear: nn.Module) -> nn.Module:
        names.append(name)
        return Int8Linear(linear)

    model = apply_lora(build_model(CFG, seed=0), SPEC, base_factory=factory, generator=torch.Generator().manual_seed(0))
    assert names[:3] == ["layers.0.attention.wq", "layers.0.attention.wv", "layers.0.feed_forward.w2"]
    assert len(names) == 3 * CFG.n_layers
    return model


def test_the_toy_bases_implement_the_interface_and_a_linear_does_not():
    lin = nn.Linear(6, 4, bias=False)
    assert isinstance(Int8Linear(lin), LinearBase) and isinstance(TransposedLinear(lin), LinearBase)
    assert not isinstance(lin, LinearBase)
    view = PlainLinearBase(lin)
    assert view.dequantize() is lin.weight and view.writable and view.weight_bytes() == 6 * 4 * 4
    assert Int8Linear(lin).weight_bytes() == 6 * 4 + 4 * 4


def test_forward_is_lora_over_the_dequantized_weight():
    model = _int8_model()
    randomize_b(model)
    x = torch.randn(3, 5, CFG.dim, generator=torch.Generator().manual_seed(2))
    for name, m in lora_modules(model):
        assert isinstance(m.base, Int8Linear)
        x_in = x if m.in_features == CFG.dim else torch.randn(3, 5, m.in_features)
        want = F.linear(x_in, m.base.dequantize() + m.delta_weight())
        torch.testing.assert_close(m(x_in), want, rtol=1e-5, atol=1e-5)
    # The whole model equals plain LoRA over nn.Linear bases holding the dequantized weights.
    ref = build_model(CFG, seed=0)
    apply_lora(ref, SPEC, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for (_, a), (_, b) in zip(lora_modules(ref), lora_modules(model)):
            a.base.weight.copy_(b.base.dequantize())
            a.lora_b.copy_(b.lora_b)
            assert torch.equal(a.lora_a, b.lora_a)  # same generator, same draws
    with torch.no_grad():
        torch.testing.assert_close(model(tokens()), ref(tokens()), rtol=1e-5, atol=1e-5)
    assert (model(tokens()) - build_model(CFG, seed=0)(tokens())).abs().max() > 1e-3  # LoRA is on


def test_a_quantized_base_trains_and_stays_frozen():
    model = _int8_model()
    q_before = {n: m.base.q.clone() for n, m in lora_modules(model)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{n}.{w}" for n, _ in lora_modules(model) for w in ("lora_a", "lora_b")}
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    ids = tokens()
    losses = []
    for _ in range(8):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, CFG.vocab_size), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-2
    for n, m in lora_modules(model):
        assert torch.equal(m.base.q, q_before[n]) and m.lora_b.abs().max() > 0


def test_merge_refuses_a_base_that_cannot_be_written_back():
    model = _int8_model()
    randomize_b(model)
    m = model.layers[0].attention.wq
    with pytest.raises(NotImplementedError, match="Int8Linear base: its weight cannot be written back"):
        m.merge()
    assert not m.merged
    # The export path: dequantized base + delta as a 16-bit weight, the base untouched.
    w = m.merged_weight(torch.bfloat16)
    assert w.dtype == torch.bfloat16 and w.shape == (m.out_features, m.in_features)
    torch.testing.assert_close(w.float(), m.base.dequantize() + m.delta_weight(), rtol=1e-2, atol=1e-2)


def test_merge_writes_through_a_writable_custom_base():
    model = apply_lora(build_model(CFG, seed=0), SPEC, base_factory=lambda name, lin: TransposedLinear(lin))
    randomize_b(model)
    with torch.no_grad():
        before = model(tokens())
        m = model.layers[1].feed_forward.w2
        wt = m.base.wt.clone()
        m.merge()
        assert m.merged and not torch.equal(m.base.wt, wt)
        for _, other in lora_modules(model):
            other.merge()
        torch.testing.assert_close(model(tokens()), before, rtol=0, atol=1e-5)
        for _, other in lora_modules(model):
            other.unmerge()
        torch.testing.assert_close(m.base.wt, wt, rtol=0, atol=1e-6)


def test_spec_and_positional_forms_are_the_same_adapters():
    a = apply_lora(build_model(CFG, seed=0), SPEC, generator=torch.Generator().manual_seed(3))
    b = apply_lora(build_model(CFG, seed=0), SPEC.targets, SPEC.rank, SPEC.alpha, SPEC.dropout,
                   generator=torch.Generator().manual_seed(3))
    sa, sb = dict(lora_modules(a)), dict(lora_modules(b))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert (sa[k].rank, sa[k].alpha, sa[k].dropout_p) == (sb[k].rank, sb[k].alpha, sb[k].dropout_p) == (4, 8.0, 0.0)
        assert torch.equal(sa[k].lora_a, sb[k].lora_a)
    d = dict(lora_modules(apply_lora(build_model(CFG, seed=0))))  # defaults: LoRASpec()'s
    assert sorted({k.rsplit(".", 1)[1] for k in d}) == ["wq", "wv"]
    assert {(m.rank, m.alpha, m.dropout_p) for m in d.values()} == {(16, 32.0, 0.05)}
    with pytest.raises(TypeError, match="LoRASpec"):
        apply_lora(build_model(CFG, seed=0), SPEC, rank=8)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        apply_lora(build_model(CFG, seed=0), LoRASpec(rank=0))
    with pytest.raises(TypeError, match="nn.Module"):
        LoRALinear(PlainLinearBase(nn.Linear(4, 4, bias=False)), 2, 4)  # type: ignore[arg-type]
    copy.deepcopy(a)(tokens())  # the wrappers survive a deepcopy
