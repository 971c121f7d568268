"""The planner's dry run: a model of any depth from 3-block dry runs equals the full-depth dry run,
and the CUDA kernels swapped in on the CPU change exactly what they should."""

from __future__ import annotations

import pytest
import torch

from solotune.bench.dryrun import activations, dry_run, parameters
from solotune.config import ModelConfig
from solotune.model import build_model, checkpoint_policy
from solotune.peft import LoRASpec, apply_lora
from solotune.train.precision import get_policy

GQA = ModelConfig(name="tiny-gqa", dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=176,
                  max_seq_len=256)
TIED = ModelConfig(name="tiny-mha-tied", dim=48, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=200, hidden_dim=128,
                   tie_embeddings=True, max_seq_len=256)
FULL = LoRASpec(rank=0)
QV = LoRASpec(rank=8, alpha=16, dropout=0.1, targets=("wq", "wv"))
W2 = LoRASpec(rank=4, alpha=8, dropout=0.05, targets=("w2",))  # block 0's RoPE then saves nothing

# (model, precision, adapters, device): every kind of block 0 (trainable input or not, RoPE saved
# or not), autocast copies, pure bf16, both kernel sets, tied heads.
CASES = [
    (GQA, "fp32", FULL, "cuda"),
    (GQA, "fp16-amp", QV, "cuda"),
    (GQA, "bf16-amp", W2, "cpu"),
    (GQA, "bf16", QV, "cpu"),
    (TIED, "fp32", W2, "cuda"),
    (TIED, "bf16-amp", FULL, "cpu"),
    (TIED, "fp16-amp", W2, "cuda"),
]


def _truth(cfg, policy, lora, ckpt, batch, seq_len, device):
    """The full-depth dry run, and the largest recomputation (a checkpointed block, run plain)."""
    full = dry_run(cfg, policy, lora, ckpt, batch, seq_len, device)
    plain = dry_run(cfg, policy, lora, frozenset(), batch, seq_len, device)
    return full, max((plain.standalone[i] for i in ckpt), default=0)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0].name}-{c[1]}-r{c[2].rank}{''.join(c[2].targets)}-{c[3]}")
@pytest.mark.parametrize("layers,policy", [(4, "off"), (5, "all"), (6, "every:2"), (7, "every:3"), (4, "every:3")])
def test_any_depth_equals_the_full_depth_dry_run(case, layers, policy):
    base, precision, lora, device = case
    cfg, pol = base.replace(n_layers=layers), get_policy(precision)
    ckpt = checkpoint_policy(policy, layers)
    got = activations(cfg, pol, lora, ckpt, 2, 21, device)
    full, recompute = _truth(cfg, pol, lora, ckpt, 2, 21, device)
    assert got.saved == full.saved  # activations, weight copies and every part
    assert got.recompute == recompute
    assert (got.logits, got.logits_fp32, got.loss_grads, got.head_grad) == (
        full.logits, full.logits_fp32, full.loss_grads, full.head_grad)
    assert got.saved.activations > 0 and sum(v for _, v in got.saved.by_part) == got.saved.activations


def test_depth_scales_per_block():
    """Sanity of the composition itself: one more plain block adds the same bytes every time."""
    pol = get_policy("bf16-amp")
    tot = [activations(GQA.replace(n_layers=n), pol, QV, frozenset(), 1, 16, "cuda").saved.total for n in (4, 5, 6, 9)]
    step = tot[1] - tot[0]
    assert step > 0 and tot[2] - tot[1] == step and tot[3] - tot[2] == 3 * step


def test_parameters_are_the_real_modules():
    pol = get_policy("bf16")
    m = build_model(TIED, seed=0, dtype=pol.param_dtype)
    apply_lora(m, W2.targets, W2.rank, W2.alpha, W2.dropout, lora_dtype=pol.adapter_dtype)
    want = [(n, p.numel(), p.dtype, p.requires_grad) for n, p in m.named_parameters()]
    assert parameters(TIED, pol, W2) == want
    assert any(n.endswith("lora_a") and dt == torch.float32 for n, _, dt, _ in want)  # adapters in fp32


def test_cuda_kernels():
    """On CUDA, LoRA dropout keeps a 1-byte mask instead of an fp32 noise tensor, fp32 attention
    (the memory-efficient kernel) pads its fp32 log-sum-exp rows to 32, flash keeps its RNG state."""
    cfg, pol, B, T = GQA.replace(n_layers=2), get_policy("fp32"), 2, 20
    drop, no_drop = (LoRASpec(rank=4, dropout=p, targets=("wq",)) for p in (0.1, 0.0))
    cpu, cuda = (dry_run(cfg, pol, drop, frozenset(), B, T, dev).saved for dev in ("cpu", "cuda"))
    cpu0, cuda0 = (dry_run(cfg, pol, no_drop, frozenset(), B, T, dev).saved for dev in ("cpu", "cuda"))
    lse_pad = cfg.n_layers * B * cfg.n_heads * (32 - T) * 4
    assert cuda0.activations - cpu0.activations == lse_pad
    # block 1's dropout on its normed input [B, T, C] (block 0's input needs no gradient: no mask)
    mask = B * T * cfg.dim
    assert cpu.activations - cpu0.activations == 4 * mask
    assert cuda.activations - cuda0.activations == mask
    # 16-bit attention runs flash on CUDA: the CPU flash kernel's tensors + its RNG state on the GPU
    # (uint64 seed [2] + offset: 24 bytes per attention; measured on an H100, benchmarks/results)
    amp = get_policy("bf16-amp")
    cpu16, cuda16 = (dry_run(cfg, amp, no_drop, frozenset(), B, T, dev).saved for dev in ("cpu", "cuda"))
    assert cuda16.activations - cpu16.activations == cfg.n_layers * 24
    assert cuda16.weight_copies == cpu16.weight_copies > 0


# Compiled blocks (Inductor's partitioner, traced per input signature and shared by the blocks):
# the composition from 3 blocks holds for them too.
COMPILED_CASES = [(GQA, "bf16", QV, "cuda"), (TIED, "bf16-amp", FULL, "cpu")]


@pytest.mark.parametrize("case", COMPILED_CASES, ids=lambda c: f"{c[0].name}-{c[1]}-r{c[2].rank}-{c[3]}")
@pytest.mark.parametrize("layers,policy", [(4, "off"), (5, "every:2")])
def test_any_depth_equals_the_full_depth_dry_run_compiled(case, layers, policy):
    base, precision, lora, device = case
    cfg, pol = base.replace(n_layers=layers), get_policy(precision)
    ckpt = checkpoint_policy(policy, layers)
    run = dict(batch=2, seq_len=21, device=device, compiled_blocks=True)
    got = activations(cfg, pol, lora, ckpt, **run)
    full = dry_run(cfg, pol, lora, ckpt, **run)
    plain = dry_run(cfg, pol, lora, frozenset(), **run)
    assert got.saved == full.saved and not got.notes and not full.notes
    assert got.recompute == max((plain.standalone[i] for i in ckpt), default=0)
    eager = dry_run(cfg, pol, lora, ckpt, 2, 21, device)
    assert full.saved != eager.saved  # the compiled blocks were modelled
