"""8-bit AdamW against torch's AdamW: the fp32 path is the same update bit for bit, the 8-bit path
stays close over many steps, and its state dict round-trips bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

from solotune.optim import AdamW8bit
from solotune.optim import adamw8bit


def _pair(shape, **kw):
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(shape))
    b = torch.nn.Parameter(a.detach().clone())
    return a, b


def test_fp32_moments_are_torch_adamw_bitwise():
    a, b = _pair((64, 48))
    ref = torch.optim.AdamW([a], lr=1e-2, weight_decay=0.1, foreach=False)
    ours = AdamW8bit([b], lr=1e-2, weight_decay=0.1, min_8bit_size=10**9)
    for _ in range(6):
        g = torch.randn(64, 48)
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
    assert torch.equal(a, b)


def test_8bit_moments_stay_close_to_fp32_adam(monkeypatch):
    # small chunks: the chunked update (several chunks and a partial last block) is what runs
    monkeypatch.setattr(adamw8bit, "CHUNK", 1024)  # two rows per chunk
    a, b = _pair((40, 300))  # rows of 2 blocks, the second partial
    ref = torch.optim.AdamW([a], lr=5e-2, weight_decay=0.0, foreach=False)
    ours = AdamW8bit([b], lr=5e-2, weight_decay=0.0, min_8bit_size=0)
    target = torch.randn(40, 300)
    start = (a.detach() - target).norm()
    for _ in range(60):
        noise = 0.1 * torch.randn(40, 300)
        for p, opt in ((a, ref), (b, ours)):
            p.grad = 2 * (p.detach() - target) + noise
            opt.step()
    assert (a.detach() - target).norm() < 0.5 * start  # it optimizes
    # The two trajectories differ by a small fraction of the distance travelled, and end as close
    # to the target (Adam at lr 0.05 hovers around it at the noise level).
    ra, rb = float((a.detach() - target).norm()), float((b.detach() - target).norm())
    assert float((a - b).norm()) / float(start) < 0.05, float((a - b).norm()) / float(start)
    assert abs(rb / ra - 1) < 0.1, (ra, rb)
    st = ours.state[b]
    assert st["m_codes"].dtype == torch.uint8 and st["m_codes"].shape == (40, 300)
    assert st["m_absmax"].shape == st["v_absmax"].shape == (40, 2)


def test_bf16_parameter_is_updated_in_fp32_and_rounded_once():
    p = torch.nn.Parameter(torch.ones(64, 64, dtype=torch.bfloat16))
    opt = AdamW8bit([p], lr=1e-3)
    p.grad = torch.full_like(p, 0.5)
    opt.step()
    # first Adam step: m/sqrt(v) = 1, so p = 1 - lr (rounded to bf16)
    assert torch.equal(p.detach(), torch.full_like(p, 1 - 1e-3))
    assert p.dtype == torch.bfloat16


def test_state_dict_round_trip_is_bitwise_and_keeps_dtypes():
    a, b = _pair((128, 64))
    opt = AdamW8bit([a], lr=1e-2, min_8bit_size=0)
    for _ in range(3):
        a.grad = torch.randn(128, 64)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    b.data.copy_(a.data)
    other = AdamW8bit([b], lr=1e-2, min_8bit_size=0)
    other.load_state_dict(saved)
    for k, v in opt.state[a].items():
        w = other.state[b][k]
        assert (torch.equal(v, w) and v.dtype == w.dtype) if torch.is_tensor(v) else v == w, k
    g = torch.randn(128, 64)
    a.grad, b.grad = g.clone(), g.clone()
    opt.step()
    other.step()
    assert torch.equal(a, b)


def test_state_bytes_matches_the_state_it_keeps():
    # 8-bit: rows shorter than a block, rows of a partial last block; fp32: a large vector, a small matrix
    shapes = [(50, 100), (20, 300), (5000,), (10, 10)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    opt = AdamW8bit(params, lr=1e-3)
    for t in params:
        t.grad = torch.ones_like(t)
    opt.step()
    assert [opt.quantized(t) for t in params] == [True, True, False, False]
    for t in params:
        held = sum(v.nbytes for v in opt.state[t].values() if torch.is_tensor(v))
        assert held == adamw8bit.state_bytes(t.shape)
    # one scale per 256-element block of a row: 20 rows x 2 blocks
    assert adamw8bit.state_bytes((20, 300)) == 2 * (6000 + 4 * 40)
    # an element count alone: a matrix of rows of whole blocks (every Llama matrix)
    assert adamw8bit.state_bytes(4096 * 4096) == adamw8bit.state_bytes((4096, 4096))


def _steps(shapes, grads, **kw):
    """AdamW8bit over fresh parameters of ``shapes`` (values from seed 0) stepped with ``grads``
    (a list per step of one gradient per parameter); returns (params, optimizer)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = AdamW8bit(params, lr=1e-2, weight_decay=0.1, min_8bit_size=0, kernel="torch", **kw)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    return params, opt


def test_a_row_split_of_a_parameter_updates_exactly_as_the_whole():
    """Blocks never cross rows: optimizing rows 0..3 and 4..6 of a matrix as two parameters gives the
    state and weights of optimizing it whole, bit for bit (what FSDP's Shard(0) relies on). Each
    row has a wildly different scale, so a block straddling two rows would change the result."""
    torch.manual_seed(1)
    scale = torch.logspace(-4, 2, 7).unsqueeze(1)
    grads = [[torch.randn(7, 300) * scale] for _ in range(4)]
    (whole,), opt = _steps([(7, 300)], grads)
    torch.manual_seed(0)
    w0 = torch.randn(7, 300)
    parts = [torch.nn.Parameter(w0[:4].clone()), torch.nn.Parameter(w0[4:].clone())]
    split = AdamW8bit(parts, lr=1e-2, weight_decay=0.1, min_8bit_size=0, kernel="torch")
    for (g,) in grads:
        parts[0].grad, parts[1].grad = g[:4].clone(), g[4:].clone()
        split.step()
    assert torch.equal(torch.cat([parts[0].detach(), parts[1].detach()]), whole.detach())
    for k in ("m_codes", "m_absmax", "v_codes", "v_absmax"):
        assert torch.equal(torch.cat([split.state[parts[0]][k], split.state[parts[1]][k]]), opt.state[whole][k]), k


def _flat(state):
    """A per-row state as the earlier flat layout stored it (codes [numel], scales [blocks])."""
    return {k: (v.reshape(-1) if torch.is_tensor(v) else v) for k, v in state.items()}


def test_flat_layout_of_whole_block_rows_converts_bit_for_bit():
    grads = [[torch.randn(8, 512)] for _ in range(3)]
    (a,), opt = _steps([(8, 512)], grads)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0] = _flat(sd["state"][0])
    assert sd["state"][0]["m_codes"].shape == (4096,) and sd["state"][0]["m_absmax"].shape == (16,)
    # the flat blocks of rows of whole blocks are the per-row blocks: quantizing flat gives the same
    m = torch.randn(8, 512)
    from solotune.optim import blockwise

    qmap = blockwise.dynamic_map(True)
    flat_codes, flat_max = blockwise.quantize(m.reshape(-1), qmap)
    row_codes, row_max = blockwise.quantize(m, qmap)
    assert torch.equal(flat_codes.view(8, 512), row_codes) and torch.equal(flat_max.view(8, 2), row_max)
    b = torch.nn.Parameter(a.detach().clone())
    other = AdamW8bit([b], lr=1e-2, weight_decay=0.1, min_8bit_size=0, kernel="torch")
    other.load_state_dict(sd)
    for k in ("m_codes", "m_absmax", "v_codes", "v_absmax"):
        assert torch.equal(other.state[b][k], opt.state[a][k]), k
    g = torch.randn(8, 512)
    a.grad, b.grad = g.clone(), g.clone()
    opt.step()
    other.step()
    assert torch.equal(a, b)


def test_flat_layout_across_rows_is_refused_in_one_line():
    (a,), opt = _steps([(8, 300)], [[torch.randn(8, 300)]])
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0] = _flat(sd["state"][0])
    sd["state"][0]["m_absmax"] = sd["state"][0]["v_absmax"] = torch.zeros(10)  # ceil(2400 / 256)
    other = AdamW8bit([torch.nn.Parameter(a.detach().clone())], lr=1e-2, min_8bit_size=0)
    with pytest.raises(ValueError, match=r"parameter 0 \[8, 300\].*cannot be converted exactly") as e:
        other.load_state_dict(sd)
    assert "\n" not in str(e.value)


def test_flat_8bit_vector_state_becomes_its_dequantized_fp32_moments():
    """The flat layout quantized large vectors; they now keep fp32 moments: the loaded ones are
    the dequantized values the next update would have read."""
    from solotune.optim import blockwise

    p = torch.nn.Parameter(torch.randn(5000))
    m, v = torch.randn(5000), torch.rand(5000)
    (mc, ma), (vc, va) = blockwise.quantize(m, blockwise.dynamic_map(True)), blockwise.quantize(v, blockwise.dynamic_map(False))
    old = {"state": {0: {"step": 3, "m_codes": mc, "m_absmax": ma, "v_codes": vc, "v_absmax": va}},
           "param_groups": [{**AdamW8bit([p]).param_groups[0], "params": [0]}]}
    opt = AdamW8bit([p])
    opt.load_state_dict(old)
    st = opt.state[p]
    assert st["step"] == 3 and "m_codes" not in st
    assert torch.equal(st["exp_avg"], blockwise.dequantize(mc, ma, blockwise.dynamic_map(True)))
    assert torch.equal(st["exp_avg_sq"], blockwise.dequantize(vc, va, blockwise.dynamic_map(False)))


def test_bad_hyperparameters_are_refused():
    with pytest.raises(ValueError):
        AdamW8bit([torch.nn.Parameter(torch.zeros(3))], lr=-1)
