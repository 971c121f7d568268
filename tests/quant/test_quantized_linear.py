"""NF4Linear and Int8Linear as LoRA bases (solotune/quant/linear.py): the LinearBase interface,
QLoRA forward and adapter gradients == LoRA over an nn.Linear holding the dequantized weight,
the frozen base, autocast, the weight not kept for backward, .to() and state_dict, the int8
error bound."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from solotune.peft import LinearBase, LoRALinear, LoRASpec, apply_lora, lora_parameters
from solotune.quant import Fp8LeanLinear, Fp8Linear, Int8Linear, NF4Fp8Linear, NF4Linear, int8_weight_bytes, nf4_weight_bytes
from solotune.quant.int8 import quantize_int8

KINDS = {"nf4": NF4Linear, "int8": Int8Linear}  # dequantize, then multiply in the compute dtype
ALL_KINDS = {**KINDS, "fp8": Fp8Linear, "fp8-lean": Fp8LeanLinear, "nf4-fp8": NF4Fp8Linear}  # + multiplied in fp8 (its own numerics: tests/quant/test_fp8.py)


def _weight(out: int = 48, inp: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * 0.05


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_implements_linear_base(kind):
    m = ALL_KINDS[kind].from_weight(_weight(), torch.float32)
    assert isinstance(m, LinearBase)
    assert (m.in_features, m.out_features, m.dtype, m.device, m.writable) == (64, 48, torch.float32,
                                                                               torch.device("cpu"), False)
    assert m.dequantize().shape == (48, 64) and m.dequantize().dtype == torch.float32
    assert list(m.parameters()) == []  # nothing trainable, nothing for an optimizer to find
    with pytest.raises(NotImplementedError):
        m.write_weight(torch.zeros(48, 64))


@pytest.mark.parametrize("kind", KINDS)
def test_forward_is_linear_over_the_dequantized_weight(kind):
    m = KINDS[kind].from_weight(_weight(), torch.float64)
    x = torch.randn(3, 5, 64, dtype=torch.float64)
    assert torch.allclose(m(x), F.linear(x, m.dequantize()), rtol=1e-12, atol=1e-12)


def test_weight_bytes_formulas():
    nf4, i8 = NF4Linear.from_weight(_weight()), Int8Linear.from_weight(_weight())
    assert nf4.weight_bytes() == nf4_weight_bytes(48 * 64) == sum(b.nbytes for b in nf4.buffers())
    assert i8.weight_bytes() == int8_weight_bytes(48, 64) == 48 * 64 + 4 * 48
    meta = NF4Linear(4096, 11008, torch.bfloat16, device="meta")  # the planner's case: no memory
    n = 4096 * 11008
    assert meta.weight_bytes() == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4


@pytest.mark.parametrize("kind", KINDS)
def test_qlora_equals_lora_over_the_dequantized_weight(kind):
    """LoRALinear over the quantized base vs LoRALinear over an nn.Linear holding dequantize():
    same outputs and same adapter gradients (fp64, so only summation order differs), and the
    gradient w.r.t. the input through the frozen base is the same too."""
    base_q = KINDS[kind].from_weight(_weight(), torch.float64)
    plain = nn.Linear(64, 48, bias=False, dtype=torch.float64)
    with torch.no_grad():
        plain.weight.copy_(base_q.dequantize())
    g = torch.Generator().manual_seed(7)
    lq = LoRALinear(base_q, rank=4, alpha=8.0, generator=g)
    lp = LoRALinear(plain, rank=4, alpha=8.0, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():  # a non-zero B so the adapter path matters
        lq.lora_b.normal_(0, 0.1, generator=torch.Generator().manual_seed(8))
        lp.lora_b.copy_(lq.lora_b)
    assert torch.equal(lq.lora_a, lp.lora_a)
    xq = torch.randn(2, 6, 64, dtype=torch.float64, requires_grad=True)
    xp = xq.detach().clone().requires_grad_(True)
    yq, yp = lq(xq), lp(xp)
    assert torch.allclose(yq, yp, rtol=1e-12, atol=1e-13)
    dy = torch.randn_like(yq)
    (yq * dy).sum().backward()
    (yp * dy).sum().backward()
    for a, b in ((lq.lora_a.grad, lp.lora_a.grad), (lq.lora_b.grad, lp.lora_b.grad), (xq.grad, xp.grad)):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-13)
    assert torch.allclose(lq.merged_weight(), lp.merged_weight(), rtol=1e-12, atol=1e-13)
    with pytest.raises(NotImplementedError):
        lq.merge()  # a quantized base is not written back; merged_weight is the export path


CFG_KW = dict(name="t", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=128)


def test_apply_lora_base_factory_trains_only_adapters():
    """apply_lora(base_factory=NF4Linear.from_weight): the tree holds LoRALinear(NF4Linear), the
    optimizer sees only the adapters, a step changes them and leaves every base buffer as it was."""
    from solotune.config import ModelConfig
    from solotune.model import build_model

    model = build_model(ModelConfig(**CFG_KW), seed=0)
    spec = LoRASpec(rank=4, alpha=8.0, dropout=0.0, targets=("wq", "wv", "w2"))
    apply_lora(model, spec, base_factory=lambda name, lin: NF4Linear.from_weight(lin.weight.detach(), torch.float32),
               generator=torch.Generator().manual_seed(0))
    wq = model.layers[0].attention.wq
    assert isinstance(wq, LoRALinear) and isinstance(wq.base, NF4Linear)
    params = lora_parameters(model)
    assert [p for p in model.parameters() if p.requires_grad] == params
    before = {k: v.clone() for k, v in model.state_dict().items() if ".base." in k}
    opt = torch.optim.AdamW(params, lr=1e-2)
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    model(tokens).float().logsumexp(-1).mean().backward()
    opt.step()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(wq.lora_b, torch.zeros_like(wq.lora_b))


@pytest.mark.parametrize("kind", KINDS)
def test_backward_does_not_keep_the_dequantized_weight(kind):
    """No floating tensor of size [out, in] is saved for backward (the weight is dequantized again
    there; the quantized storage itself is saved as the views it is), so activations do not grow
    by a 16-bit copy of every quantized layer."""
    m = KINDS[kind].from_weight(_weight(256, 512), torch.float32)
    saved: list[int] = []

    def pack(t):
        if t.is_floating_point():
            saved.append(t.numel())
        return t

    x = torch.randn(4, 512, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = m(x)
    assert 256 * 512 not in saved  # (a transposed view counts too)
    y.sum().backward()
    assert torch.allclose(x.grad, m.dequantize().sum(0).expand(4, -1), rtol=1e-5, atol=1e-6)
    # The plain path would have saved it: the check can fail.
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.linear(x, m.dequantize().requires_grad_(True))
    assert 256 * 512 in saved


@pytest.mark.parametrize("kind", KINDS)
def test_autocast_sets_the_compute_dtype(kind):
    m = KINDS[kind].from_weight(_weight(), torch.float32)
    x = torch.randn(2, 64)
    assert m(x).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    ref = F.linear(x.bfloat16(), m.dequantize_as(torch.bfloat16))
    assert torch.equal(y, ref)
    assert m.to(torch.float64).dequantize().dtype == torch.float32  # .to(dtype) leaves a quantized base alone


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_to_and_state_dict_round_trip(kind):
    """state_dict holds every buffer; a fresh empty module (cpu, or meta + assign) loads it and
    dequantizes to the same bits; .to(dtype) does not touch the stored scales (nor fp8 codes)."""
    cls = ALL_KINDS[kind]
    m = cls.from_weight(_weight(), torch.bfloat16)
    w = m.dequantize()
    sd = m.state_dict()
    assert set(sd) == {k for k, _ in m.named_buffers()}
    fresh = cls(64, 48, torch.bfloat16)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.dequantize(), w)
    meta = cls(64, 48, torch.bfloat16, device="meta")
    meta.load_state_dict(copy.deepcopy(sd), assign=True)
    assert torch.equal(meta.dequantize(), w)
    moved = copy.deepcopy(m).to(torch.float16).to("cpu")
    assert all(torch.equal(a, b) for a, b in zip(moved.buffers(), m.buffers()))
    assert torch.equal(moved.dequantize(), w)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_int8_forward_within_its_bound(dtype):
    """|w - q*s| <= s/2 per weight (round to nearest), so |y_i - y'_i| <= s_i/2 * ||x||_1 for each
    output i and input x; fp32 adds its own rounding (relative 2^-24 per product, summed)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 256, generator=g, dtype=torch.float64) * 0.05
    w[5] *= 20  # a row with an outlier scale
    m = Int8Linear.from_weight(w.to(dtype), dtype)
    q, s = quantize_int8(w.to(dtype))
    s = s.double()
    assert bool(((w - q.double() * s[:, None]).abs() <= s[:, None] / 2 * (1 + 1e-6)).all())
    x = torch.randn(10, 256, generator=g, dtype=torch.float64)
    y_ref = x @ w.T
    y = m(x.to(dtype)).double()
    fp = torch.finfo(dtype).eps * 256 * (x.abs() @ w.abs().T)  # matmul rounding slack
    bound = s[None, :] / 2 * x.abs().sum(-1, keepdim=True) + fp
    err = (y - y_ref).abs()
    assert bool((err <= bound).all())
    assert (err / bound).max() > 0.01 and err.max() > 0  # quantization error is really there


def test_int8_zero_row_and_meta_shapes():
    w = _weight()
    w[3] = 0
    m = Int8Linear.from_weight(w, torch.float32)
    assert torch.equal(m.dequantize()[3], torch.zeros(64))
    meta = Int8Linear(64, 48, device="meta")
    assert meta.weight_bytes() == int8_weight_bytes(48, 64) and meta.qweight.dtype == torch.int8
    with pytest.raises(ValueError):
        m.load_weight(torch.zeros(64, 48))


@pytest.mark.parametrize("kind,checkpointing", [("nf4", "all"), ("int8", "off"), ("fp8", "all"), ("fp8", "off"),
                                                 ("nf4-fp8", "all")])
def test_qlora_blocks_compile_into_one_graph_each(kind, checkpointing):
    """The quantized linear is a custom op, so a QLoRA block is captured whole (fullgraph) and the
    compiled block gives the eager block's loss and adapter gradients (aot_eager on CPU: the graph
    Inductor would get)."""
    import functools

    from solotune.config import ModelConfig
    from solotune.data.batch import collate_batch
    from solotune.data import Example
    from solotune.model import build_model
    from solotune.peft import apply_lora
    from solotune.quant import swap_in_quantized
    from solotune.train.loss import full_logits_loss

    cfg = ModelConfig(name="tiny-qc", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=128,
                      max_seq_len=64)
    model = build_model(cfg, seed=0)
    swap_in_quantized(model, kind, compute_dtype=torch.float32)
    apply_lora(model, ("wq", "wv", "w2"), rank=4, alpha=8, dropout=0.0, generator=torch.Generator().manual_seed(0))
    model.set_grad_checkpointing(checkpointing)
    model.train()
    for n, p in model.named_parameters():
        if "lora_b" in n:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(0)
    batch = collate_batch([Example(ids, ids) for n in (12, 9) for ids in [torch.randint(3, 64, (n,), generator=g).tolist()]], 0)

    def run():
        model.zero_grad()
        loss = model(batch, head=functools.partial(full_logits_loss, labels=batch.labels))
        loss.backward()
        return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_loss, ref = run()
    assert run()[0] == ref_loss  # eager twice: the recompute unpacks each saved tensor once
    torch._dynamo.reset()
    model.compile_blocks(backend="aot_eager", fullgraph=True)
    loss, got = run()
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6, msg=n)


def _ops_of(fn, *args):
    """The aten/custom ops in the graph dynamo captures for ``fn(*args)``, and its result."""
    seen: list[str] = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    torch._dynamo.reset()
    return seen, out


def test_int8_traced_for_inference_is_plain_ops_and_for_training_the_custom_op():
    """Compiled with no grad (the decode step), the int8 linear is an int8->float cast, a matmul and a
    per-channel scale that Inductor can fuse into one pass over the int8 bytes; its values are the
    custom op's within fp32 rounding. Compiled with grad (training) it stays the custom op."""
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(0))
    lin = Int8Linear.from_weight(w, torch.float32)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    ref = lin(x)  # eager: the custom op
    with torch.no_grad():
        ops, got = _ops_of(lin, x)
    assert not any("quant_linear" in o for o in ops), ops
    torch.testing.assert_close(got, ref.detach(), rtol=1e-5, atol=1e-5)
    xg = x.clone().requires_grad_(True)
    ops, _ = _ops_of(lin, xg)
    assert any("quant_linear" in o for o in ops), ops


def test_nf4_traced_for_inference_is_plain_ops():
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(0))
    lin = NF4Linear.from_weight(w, torch.float32)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    ref = lin(x)
    with torch.no_grad():
        ops, got = _ops_of(lin, x)
    assert not any("quant_linear" in o for o in ops), ops
    torch.testing.assert_close(got, ref.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantized_compiled_decode_gives_the_eager_tokens(kind):
    from solotune.api import materialize
    from solotune.config import ModelConfig
    from solotune.generate import Decoder, generate_tokens

    cfg = ModelConfig.from_name("tiny").replace(n_layers=3)
    model = materialize(cfg, None, torch.float32, "cpu", 0, kind).eval()
    prompts = [[1, 5, 7, 9, 11, 13], [1, 3], [7]]
    torch._dynamo.reset()
    assert generate_tokens(Decoder(model, compile=True, backend="aot_eager"), prompts, 12) == \
        generate_tokens(model, prompts, 12)
    torch._dynamo.reset()
