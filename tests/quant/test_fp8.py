"""The fp8 base (solotune/quant/fp8.py, Fp8Linear): the e4m3 round trip and the product within
their stated bounds, forward and backward equal to the formula they implement (the quantized
values multiplied exactly), nothing activation-sized kept for backward, LoRA adapters over it
trained like over the 16-bit base, and the loop's `--quantize fp8` option end to end."""

from __future__ import annotations

import pytest
import torch

from solotune.peft import LoRALinear
from solotune.quant import Fp8LeanLinear, Fp8Linear, fp8_weight_bytes
from solotune.quant.fp8 import FP8, FP8_MAX, dequantize_fp8, fp8_linear, quantize_fp8, quantize_rows

REL = 2.0 ** -4  # e4m3: half of the 2^-3 relative step of its 3 mantissa bits
SUB = 2.0 ** -10  # its subnormal step is 2^-9 (of the scaled value): half of it


def _data(m: int = 16, k: int = 256, n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g, dtype=torch.float64)
    x[0, :7] *= 1e-4  # tiny entries land in the subnormals: the bound's second term
    w = torch.randn(n, k, generator=g, dtype=torch.float64) * 0.02
    return x, w


def test_rows_round_trip_within_half_a_step():
    x, _ = _data()
    q, s = quantize_rows(x)
    assert q.dtype == FP8 and s.shape == (16, 1) and s.dtype == torch.float32
    back = q.double() * s.double()
    assert (back - x).abs().le(REL * x.abs() + SUB * s.double() + 1e-300).all()
    assert q.float().abs().amax(dim=1).eq(FP8_MAX).all()  # every row uses the full range
    zq, zs = quantize_rows(torch.zeros(2, 32))
    assert zq.float().eq(0).all() and (zs > 0).all()  # a zero row: finite scale, zero codes


def test_weight_quantization_is_per_output_channel():
    _, w = _data()
    q, s = quantize_fp8(w)
    assert q.shape == w.shape and s.shape == (96,)
    torch.testing.assert_close(s.double(), w.abs().amax(1) / FP8_MAX, rtol=1e-6, atol=0)
    err = (dequantize_fp8(q, s, torch.float64) - w).abs()
    assert err.le(REL * w.abs() + SUB * s.double()[:, None]).all()
    with pytest.raises(ValueError, match="floating-point"):
        quantize_fp8(torch.zeros(3, dtype=torch.int32))


def test_forward_is_the_quantized_product_and_within_its_bound():
    """y == (xq * a) @ (q * s).T exactly (fp64 reference path), and |y - x @ w.T| within the bound the
    per-element errors give: sum_j |x||dw| + |dx||w'|."""
    x, w = _data()
    q, s = quantize_fp8(w)
    y = fp8_linear(x, q, q.t().contiguous(), s)
    xq, a = quantize_rows(x)
    exact = (xq.double() * a.double()) @ (q.double() * s.double()[:, None]).t()
    torch.testing.assert_close(y, exact, rtol=1e-12, atol=1e-15)
    dx_bound = REL * x.abs() + SUB * a.double()
    w_deq = dequantize_fp8(q, s, torch.float64)
    dw_bound = REL * w.abs() + SUB * s.double()[:, None]
    bound = x.abs() @ dw_bound.t() + dx_bound @ w_deq.abs().t()
    assert ((y - x @ w.t()).abs() <= bound).all()
    assert (bound < 0.2 * (x.abs() @ w.abs().t())).all()  # and the bound itself is not vacuous


def test_backward_folds_the_channel_scale_into_the_gradient():
    """dx == ((dy * s)q * b) @ q exactly; its error against dy @ w within the same kind of bound;
    no gradient for the stored weight."""
    x, w = _data()
    q, s = quantize_fp8(w)
    x.requires_grad_(True)
    y = fp8_linear(x, q, q.t().contiguous(), s)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y.backward(dy)
    gq, b = quantize_rows(dy * s.double())
    exact = (gq.double() * b.double()) @ q.double()
    torch.testing.assert_close(x.grad, exact, rtol=1e-12, atol=1e-15)
    g_bound = (REL * (dy * s.double()).abs() + SUB * b.double()) @ q.double().abs()
    assert ((x.grad - dy @ w).abs() <= g_bound + (dy.abs() @ (REL * w.abs() + SUB * s.double()[:, None]))).all()


@pytest.mark.parametrize("lean", [False, True])
def test_nothing_activation_sized_is_saved_for_backward(lean):
    m = (Fp8LeanLinear if lean else Fp8Linear).from_weight(torch.randn(256, 512) * 0.02, torch.float32)
    saved: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    x = torch.randn(64, 512, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = m(x)
    weight = (256, 512) if lean else (512, 256)  # the stored codes (lean: q, transposed in backward; else q.T)
    assert sorted(saved, key=str) == sorted([(FP8, weight), (torch.float32, (256,))], key=str)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert m.weight_bytes() == fp8_weight_bytes(256, 512, transposed=not lean) == (1 if lean else 2) * 256 * 512 + 4 * 256


def test_the_lean_layout_computes_the_same_bits():
    """fp8-lean stores q once and transposes it in backward: the same forward and input gradient, bit for bit."""
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(0)) * 0.02
    outs = []
    for cls in (Fp8Linear, Fp8LeanLinear):
        m = cls.from_weight(w, torch.float32)
        x = torch.randn(8, 128, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y = m(x)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(2)))
        outs.append((y.detach(), x.grad))
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    assert "qweight_t_bits" not in dict(Fp8LeanLinear.from_weight(w).named_buffers())


def test_lora_over_fp8_trains_like_lora_over_the_16bit_base():
    """The adapters see the fp8 base's output error only: their gradients stay within a few percent
    of those over the exact base (the same B != 0 adapter, the same input)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 256, generator=g) * 0.02
    plain = torch.nn.Linear(256, 128, bias=False)
    with torch.no_grad():
        plain.weight.copy_(w)
    grads = []
    for base in (Fp8Linear.from_weight(w, torch.float32), plain):
        lora = LoRALinear(base, rank=8, alpha=16.0, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            lora.lora_b.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
        x = torch.randn(4, 32, 256, generator=torch.Generator().manual_seed(4))
        target = torch.randn(4, 32, 128, generator=torch.Generator().manual_seed(5))
        ((lora(x) - target) ** 2).mean().backward()
        grads.append((lora.lora_a.grad, lora.lora_b.grad))
        assert not any(p.requires_grad for p in base.parameters())
    for got, ref in zip(*grads):
        assert (got - ref).norm() / ref.norm() < 0.05


def test_autocast_runs_fp8_in_the_autocast_dtype():
    m = Fp8Linear.from_weight(torch.randn(48, 64) * 0.02, torch.float32)
    x = torch.randn(2, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16 and m(x).dtype == torch.float32
    # the fp8 product of the bf16-rounded input, itself rounded to bf16 (the reference product stays fp32)
    ref = m.to(torch.float32)(x.bfloat16().float())
    assert ((y.float() - ref).abs() <= 2 ** -8 * ref.abs() + 1e-7).all()


def test_finetune_with_an_fp8_base_end_to_end(tmp_path):
    """The loop's `--quantize fp8` on the tiny model: every block linear becomes an Fp8Linear under its
    adapter, the loss falls, the base stays frozen; the planner counts its storage under fp8
    (2 bytes per weight + a scale per output channel), as the real modules hold."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
    from train_fixtures import WordTokenizer, tiny_config, tiny_model, write_records

    from solotune.bench.plan import Setup, predict
    from solotune.quant import quantized_modules
    from solotune.train import finetune

    data = write_records(tmp_path / "records.json")
    cfg = tiny_config(tmp_path, data, max_steps=6, quantize="fp8", lora_targets=("wq", "wv", "w2"))
    model = tiny_model()
    result = finetune(cfg, model=model, tokenizer=WordTokenizer())
    q = quantized_modules(model)
    assert len(q) == 2 * 7 and all(isinstance(m, Fp8Linear) for m in q.values())
    assert not any(p.requires_grad for m in q.values() for p in m.parameters())
    assert result.losses[-1] < result.losses[0]
    pred = predict(Setup(model.config, seq_len=16, batch=2, precision="fp32", quantize="fp8"))
    assert pred.params["fp8"] == sum(m.weight_bytes() for m in q.values())
    assert pred.dequantized == 0


def _fp8_twin(m) -> Fp8Linear:
    """An Fp8Linear holding nf4-fp8 module m's e4m3 codes (its per-call conversion) and row scales."""
    from solotune.quant.nf4_fp8 import nf4_to_fp8

    inv = m.fp8_inv_scale_bits.view(torch.float32)
    twin = Fp8Linear(m.in_features, m.out_features, torch.bfloat16, device="meta")
    twin._set(qweight_bits=nf4_to_fp8(m.nf4, inv).view(torch.uint8), scale_bits=m.fp8_scale_bits,
              qweight_t_bits=nf4_to_fp8(m.nf4, inv, transpose=True).view(torch.uint8))
    return twin


def test_nf4_multiplied_in_fp8_is_the_fp8_product_of_its_codes():
    """nf4-fp8: QLoRA's storage (+ two fp32 numbers per row), each call turning the NF4 codes into e4m3
    codes: forward and input gradient equal an Fp8Linear holding those codes (layouts, scales and the
    backward wired right), bit for bit, and stay within a few percent of the NF4 base computed in bf16."""
    from solotune.quant import NF4Fp8Linear, NF4Linear

    w = (torch.randn(96, 128, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    m = NF4Fp8Linear.from_weight(w, torch.bfloat16)
    assert m.weight_bytes() == NF4Linear.from_weight(w, torch.bfloat16).weight_bytes() + 8 * 96
    outs = []
    for mod in (m, _fp8_twin(m), NF4Linear.from_weight(w, torch.bfloat16)):
        x = torch.randn(8, 128, generator=torch.Generator().manual_seed(1)).bfloat16().requires_grad_(True)
        y = mod(x)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).bfloat16())
        outs.append((y.detach().float(), x.grad.float()))
    assert all(torch.equal(a, b) for a, b in zip(outs[0], outs[1]))
    for a, b in zip(outs[0], outs[2]):
        assert (a - b).norm() / b.norm() < 0.08


def test_nf4_to_fp8_codes_are_quantize_fp8_of_the_dequantized_weight():
    """The conversion's row scales are quantize_fp8's of the fp32 dequantized weight exactly (a block of
    zeros included), and its codes (w' times 1/s, not w' / s) equal quantize_fp8's but at rounding
    boundaries: at most a few per million differ, each by one e4m3 step; both layouts, odd in_features too."""
    from solotune.quant.nf4 import dequantize_nf4_torch, quantize_nf4
    from solotune.quant.nf4_fp8 import nf4_row_scales, nf4_to_fp8

    for shape in [(256, 1024), (7, 13)]:
        w = torch.randn(shape, generator=torch.Generator().manual_seed(3))
        w[1, :64] = 0
        q = quantize_nf4(w)
        ref_q, ref_scale = quantize_fp8(dequantize_nf4_torch(q, torch.float32))
        scale, inv = nf4_row_scales(q)
        assert torch.equal(scale, ref_scale) and torch.equal(inv, 1.0 / scale)
        got = nf4_to_fp8(q, inv)
        diff = got.float() != ref_q.float()
        assert diff.float().mean() < 1e-5
        step = 2.0 ** (torch.floor(torch.log2(ref_q.float().abs().clamp(min=2.0 ** -6))) - 3)
        assert ((got.float() - ref_q.float()).abs() <= step * 1.0001).all()
        assert torch.equal(nf4_to_fp8(q, inv, transpose=True).view(torch.uint8), got.t().contiguous().view(torch.uint8))
