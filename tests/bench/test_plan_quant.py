"""The planner's quantize (QLoRA) and offload options: structural facts, true by construction."""

from __future__ import annotations

import pytest

from solotune.bench.anatomy import params_by_dtype
from solotune.bench.plan import Setup, plan, predict
from solotune.config import ModelConfig
from solotune.model import build_model
from solotune.peft import LoRASpec, apply_lora
from solotune.quant.load import quantized_modules, swap_in_quantized
from solotune.quant.nf4 import nf4_weight_bytes
from solotune.train.precision import get_policy

TINY = ModelConfig(name="t", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=160, max_seq_len=64)
# Deep enough for the any-depth path, wide enough that the block inputs pass offload's 64 KiB
MID = ModelConfig(name="m", dim=256, n_layers=5, n_heads=4, n_kv_heads=4, vocab_size=128, hidden_dim=512,
                  max_seq_len=256)
SEVEN_B = ModelConfig.from_name("llama2-7b")
LORA = LoRASpec(rank=4, targets=("wq", "wv"), dropout=0.0)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_quantized_param_bytes_equal_the_real_model(kind, precision):
    pol = get_policy(precision)
    m = build_model(TINY, seed=0, dtype=pol.param_dtype)
    swap_in_quantized(m, kind, compute_dtype=pol.param_dtype)
    apply_lora(m, LORA.targets, rank=LORA.rank, alpha=LORA.alpha, dropout=0.0, lora_dtype=pol.adapter_dtype)
    real = params_by_dtype(m)
    real[kind] = sum(q.weight_bytes() for q in quantized_modules(m).values())
    p = predict(Setup(TINY, seq_len=16, batch=2, precision=precision, lora=LORA, quantize=kind))
    assert p.params == real
    assert p.trainable_params == sum(t.numel() for t in m.parameters() if t.requires_grad)


def test_nf4_7b_param_bytes_follow_the_closed_form():
    s = Setup(SEVEN_B, seq_len=64, precision="bf16", lora=LORA)
    plain, nf4, int8 = (predict(s.replace(quantize=q)) for q in ("none", "nf4", "int8"))
    c, h, L = SEVEN_B.dim, SEVEN_B.hidden_dim, SEVEN_B.n_layers
    shapes = [(c, c)] * 4 + [(h, c)] * 2 + [(c, h)]  # (out, in): wq wk wv wo (MHA), w1 w3, w2
    per_block = sum(nf4_weight_bytes(o * i) for o, i in shapes)
    assert nf4.params["nf4"] == L * per_block
    n_linear = L * sum(o * i for o, i in shapes)
    assert abs(nf4.params["nf4"] / n_linear - (0.5 + 1 / 64 + 4 / 16384)) < 0.01 * 0.5
    # The 16-bit rest (embeddings, head, norms) and the adapters are untouched by quantization
    assert plain.params["bf16"] - 2 * n_linear == nf4.params["bf16"] == int8.params["bf16"]
    assert plain.params.get("fp32") == nf4.params.get("fp32")
    # int8: 1 byte + one fp32 scale per output row; about twice NF4's storage, half of bf16's
    assert int8.params["int8"] == n_linear + 4 * L * sum(o for o, _ in shapes)
    assert 1.9 < int8.params["int8"] / nf4.params["nf4"] < 2.0
    assert plain.total_params == nf4.total_params == int8.total_params
    assert nf4.grads == plain.grads and nf4.optimizer == plain.optimizer
    # One dequantized weight (the largest, w1/w2/w3, in bf16) is a transient
    assert nf4.dequantized == int8.dequantized == h * c * 2 and plain.dequantized == 0
    assert nf4.peak < int8.peak < plain.peak


def test_quantize_needs_lora():
    with pytest.raises(ValueError, match="LoRA"):
        Setup(TINY, lora=LoRASpec(rank=0), quantize="nf4")
    with pytest.raises(ValueError, match="quantize"):
        Setup(TINY, lora=LORA, quantize="int4")
    with pytest.raises(ValueError, match="offload"):
        Setup(TINY, lora=LORA, offload="weights")


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_offload_moves_the_checkpointed_inputs(quantize):
    s = Setup(MID, seq_len=128, batch=4, precision="bf16", lora=LORA, grad_checkpoint="all", quantize=quantize)
    base, off = predict(s), predict(s.replace(offload="activations"))
    block_input = 4 * 128 * MID.dim * 2  # h [B, T, C] in bf16: >= 64 KiB, offloaded
    assert block_input >= 1 << 16
    assert base.host_bytes == 0 and base.activations == base.activations_saved
    assert off.activations_saved == base.activations
    assert off.host_bytes >= MID.n_layers * block_input
    # Every block input but max(max_in_flight, 2) = 2 (pending, then in use + prefetched) leaves the GPU
    assert off.activations == base.activations - (MID.n_layers - 2) * block_input
    assert off.peak == base.peak - (MID.n_layers - 2) * block_input
    assert off.params == base.params and off.grads == base.grads


def test_offload_changes_nothing_when_nothing_is_big_enough():
    s = Setup(TINY, seq_len=8, batch=1, precision="bf16", lora=LORA, grad_checkpoint="all")
    base, off = predict(s), predict(s.replace(offload="activations"))
    assert off.activations == base.activations and off.host_bytes == 0 and off.peak == base.peak


def test_plan_iterates_the_options_and_quantizes_lora_only():
    rows = plan(TINY, gpu_mem=1 << 40, seq_len=16, methods=("lora", "full"), precisions=("bf16",),
                checkpointing=("off", "all"), quantize=("none", "nf4", "int8"), offload=("none", "activations"))
    seen = {(p.setup.method, p.setup.quantize, p.setup.grad_checkpoint, p.setup.offload) for p, _, _ in rows}
    assert len(rows) == len(seen) == 2 * 2 * (3 + 1)  # (lora x 3 quantize + full) x checkpointing x offload
    assert all(p.setup.method == "lora" for p, _, _ in rows if p.setup.quantize != "none")


def test_an_fp8_base_ranks_faster_and_costs_its_bytes():
    """fp8: 2 bytes per weight (both layouts), fp8-lean 1, nothing weight-sized made per matmul (lean: the
    transposed codes in backward); both rank faster than the 16-bit base (their GEMMs at twice the rate)."""
    from solotune.bench.plan import relative_cost

    s = Setup(SEVEN_B, seq_len=512, batch=8, precision="bf16", lora=LORA)
    plain, fp8, lean = (predict(s.replace(quantize=q)) for q in ("none", "fp8", "fp8-lean"))
    c, h, L = SEVEN_B.dim, SEVEN_B.hidden_dim, SEVEN_B.n_layers
    n_linear = L * (4 * c * c + 3 * h * c)
    rows = L * (4 * c + 2 * h + c)  # one fp32 scale per output channel
    assert fp8.params["fp8"] == 2 * n_linear + 4 * rows and lean.params["fp8-lean"] == n_linear + 4 * rows
    assert fp8.dequantized == 0 and lean.dequantized == h * c
    costs = [relative_cost(s.replace(quantize=q)) for q in ("none", "fp8", "fp8-lean")]
    assert costs[1] == costs[2] < 0.6 * costs[0]
