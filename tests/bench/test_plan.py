"""Planner formulas: parameters / gradients / optimizer state against real tensors, the 7B numbers,
the plan listing and its CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from solotune.bench.anatomy import optimizer_state_bytes, params_by_dtype, storage_bytes
from solotune.bench.plan import (
    GiB, Setup, format_plan, grad_bytes, matmul_params, model_config, optimizer_bytes, param_bytes, parse_bytes,
    plan, predict, train_flops,
)
from solotune.config import ModelConfig
from solotune.model import build_model
from solotune.peft import apply_lora
from solotune.train.precision import get_policy

TINY = ModelConfig(name="t", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=80, max_seq_len=64)
TIED = TINY.replace(name="t-tied", tie_embeddings=True, n_kv_heads=4)
SEVEN_B = ModelConfig.from_name("llama2-7b")


def _model(cfg, precision, lora_rank, targets=("wq", "wv")):
    pol = get_policy(precision)
    m = build_model(cfg, seed=0, dtype=pol.param_dtype)
    if lora_rank:
        apply_lora(m, targets, rank=lora_rank, alpha=2 * lora_rank, dropout=0.0, lora_dtype=pol.adapter_dtype)
    else:
        m.requires_grad_(True)
    return m


@pytest.mark.parametrize("cfg", [TINY, TIED], ids=["untied", "tied"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("lora", [0, 4])
def test_params_grads_optimizer_match_real_tensors(cfg, precision, lora):
    targets = ("wq", "wk", "w2")
    s = Setup(cfg, precision=precision, lora_rank=lora, lora_targets=targets, device="cpu")
    m = _model(cfg, precision, lora, targets)
    assert params_by_dtype(m) == param_bytes(s)
    trainable = [p for p in m.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = torch.zeros_like(p)
    assert storage_bytes(p.grad for p in trainable) == grad_bytes(s)
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    opt.step()
    assert optimizer_state_bytes(opt) == optimizer_bytes(s)
    if not lora:
        assert predict(s).total_params == cfg.num_params()


def test_bf16_adamw_state_is_bf16():
    """torch's AdamW keeps exp_avg/exp_avg_sq in the parameter's dtype (the planner's assumption)."""
    p = torch.nn.Parameter(torch.zeros(10, dtype=torch.bfloat16))
    p.grad = torch.ones_like(p)
    opt = torch.optim.AdamW([p])
    opt.step()
    st = opt.state[p]
    assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.bfloat16
    assert st["step"].dtype == torch.float32 and st["step"].numel() == 1


def test_7b_lora_numbers():
    """LLaMA-2-7B, LoRA r16 on wq/wv, one 512-token row."""
    s = Setup(SEVEN_B, seq_len=512, precision="fp32", lora_rank=16)
    p = predict(s)
    n_lora = 32 * 2 * 16 * (4096 + 4096)
    assert p.trainable_params == n_lora == 8_388_608  # peft: "trainable params: 8,388,608" (0.12%)
    assert p.total_params == SEVEN_B.num_params() + n_lora
    assert p.params == {"fp32": 4 * (SEVEN_B.num_params() + n_lora)}
    assert p.grads == 4 * n_lora and p.optimizer == 8 * n_lora + 4 * 128  # 128 adapter tensors
    # fp16 AMP over fp32 weights: a 16-bit copy of every weight a gradient flows through is kept for
    # backward. Layer 0's wq/wk/wv see an input that needs no gradient (frozen embedding), and
    # layer 0's LoRA As see that input too; every other base weight (and the head) gets a copy.
    amp = predict(s.replace(precision="fp16-amp"))
    per_layer = 4 * 4096 * 4096 + 3 * 4096 * 11008
    base_copies = 32 * per_layer - 3 * 4096 * 4096 + 32000 * 4096
    lora_copies = 2 * (32 * 2 * 16 * 4096) - 2 * 16 * 4096  # A and B copies, minus layer 0's two As
    assert amp.weight_copies == 2 * (base_copies + lora_copies)
    assert amp.activations < p.activations  # 16-bit activations ...
    assert amp.peak > p.peak + 10 * GiB  # ... but the copies win: AMP raises the peak (course: 30.2 -> 41.1 GiB)
    # full checkpointing keeps only block inputs: far fewer activations, and no copies outside the head
    gc = predict(s.replace(grad_checkpoint="all"))
    assert gc.activations < p.activations / 8


def test_checkpointing_every_k_interpolates():
    base = Setup(SEVEN_B, seq_len=256, precision="bf16", lora_rank=16)
    acts = [predict(base.replace(grad_checkpoint=g)).activations for g in ("off", "every:4", "every:2", "all")]
    assert acts == sorted(acts, reverse=True) and len(set(acts)) == 4


def test_full_finetuning_7b_does_not_fit_80gb():
    for prec in ("fp32", "fp16-amp"):
        p = predict(Setup(SEVEN_B, seq_len=512, precision=prec, lora_rank=0))
        assert p.peak > 100 * GiB  # 16 bytes per weight before any activation
    assert predict(Setup(SEVEN_B, seq_len=512, precision="bf16", lora_rank=0)).peak < 80 * GiB


def test_train_flops():
    s = Setup(SEVEN_B, lora_rank=0)
    n_mm, n_tr = matmul_params(s)
    assert n_mm == n_tr == SEVEN_B.num_params() - 32000 * 4096 - 65 * 4096  # no embedding lookup, no norms
    no_attn = train_flops(s, [1])
    assert no_attn == pytest.approx(6 * n_mm, rel=1e-3)
    lora = train_flops(Setup(SEVEN_B, lora_rank=16), [1])
    assert lora < no_attn * 0.7
    # recomputation is not model FLOPs
    assert train_flops(s.replace(grad_checkpoint="all"), [100]) == train_flops(s, [100])


@pytest.mark.parametrize("text,expected", [("24GiB", 24 * 2**30), ("24G", 24 * 2**30), ("80GB", 80 * 10**9),
                                           ("512MiB", 512 * 2**20), ("1.5TiB", int(1.5 * 2**40)), ("1000", 1000)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_parse_bytes_rejects_garbage():
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes("lots")


def test_plan_lists_fitting_configs_fastest_first():
    rows = plan(SEVEN_B, 24 * GiB, seq_len=512)
    fits = [r for r in rows if r[2]]
    assert fits and all(p.peak <= 24 * GiB for p, _, _ in fits)
    assert all(p.peak > 24 * GiB for p, _, f in rows if not f)
    assert [c for _, c, _ in fits] == sorted(c for _, c, _ in fits)
    assert rows[: len(fits)] == fits  # fitting ones first
    assert {p.setup.method for p, _, _ in fits} == {"lora"}
    text = format_plan(rows, 24 * GiB)
    assert "Fits" in text and "lora" in text and "do not fit" in text


def test_plan_cli(capsys):
    from solotune.cli import main

    assert main(["plan", "--model", "llama2-7b", "--gpu-mem", "80GiB", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and {"peak", "fits", "activations", "weight_copies", "relative_cost"} <= set(rows[0])
    assert main(["plan", "--model", "llama2-7b", "--gpu-mem", "1GiB"]) == 1  # nothing fits
    assert "nothing fits" in capsys.readouterr().out


def test_model_config_from_hf_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_hf_config()))
    (tmp_path / "model.safetensors").write_bytes(b"")  # only the config is read
    cfg = model_config(str(tmp_path), layers=1)
    assert (cfg.dim, cfg.n_layers, cfg.n_kv_heads, cfg.vocab_size) == (32, 1, 2, 64)
    with pytest.raises(FileNotFoundError):
        model_config(str(tmp_path / "nope"))


def test_setup_holds_a_lora_spec():
    from solotune.peft import LoRASpec

    s = Setup(TINY, lora_rank=4, lora_targets=("wk",), lora_dropout=0.1)
    assert s.lora == LoRASpec(rank=4, dropout=0.1, targets=("wk",))
    assert (s.lora_rank, s.lora_targets, s.lora_dropout, s.method) == (4, ("wk",), 0.1, "lora")
    full = s.replace(lora_rank=0)  # the convenience names work in replace() too, and keep the rest
    assert full.method == "full" and full.lora == LoRASpec(rank=0, dropout=0.1, targets=("wk",))
    assert Setup(TINY, lora=LoRASpec(rank=8, alpha=3.0)).lora.alpha == 3.0
    assert Setup(TINY).lora == LoRASpec() and Setup(TINY).optimizer == "adamw"
    with pytest.raises(ValueError, match="optimizer"):
        Setup(TINY, optimizer="no-such-optimizer")


def test_optimizer_state_comes_from_train_optim(monkeypatch):
    """A new optimizer is one OptimizerSpec in solotune.train.optim: the planner counts its state."""
    from solotune.train import optim

    spec = optim.OptimizerSpec("one-byte", optim.OPTIMIZERS["adamw"].build, lambda n, dt: n + 16, "test")
    monkeypatch.setitem(optim.OPTIMIZERS, "one-byte", spec)
    s = Setup(SEVEN_B, seq_len=128, precision="bf16", lora_rank=16)
    small = s.replace(optimizer="one-byte")
    n_lora, tensors = 32 * 2 * 16 * (4096 + 4096), 128
    assert optimizer_bytes(small) == n_lora + 16 * tensors
    assert optimizer_bytes(s) == 8 * n_lora + 4 * tensors  # fp32 adapters: two fp32 moments + step
    assert predict(s).peak - predict(small).peak == optimizer_bytes(s) - optimizer_bytes(small)


def test_precision_facts_come_from_the_policy(monkeypatch):
    """Adapter dtype, weight dtype and autocast all come from solotune.train.precision."""
    from solotune.train import precision

    s = Setup(TINY, precision="bf16", lora_rank=4, device="cpu")
    assert set(param_bytes(s)) == {"bf16", "fp32"}  # bf16 weights, fp32 adapters
    bf16_adapters = dataclasses.replace(precision.POLICIES["bf16"], adapter_dtype=torch.bfloat16)
    monkeypatch.setitem(precision.POLICIES, "bf16", bf16_adapters)
    assert set(param_bytes(s)) == {"bf16"}
    assert predict(s).activations < predict(s.replace(precision="fp32")).activations
