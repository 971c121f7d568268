"""Measured anatomy == planner, byte for byte, on tiny models through the real training loop (the
planner's dry run on CPU fake tensors against the CPU, and against CUDA where there is a GPU)."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from solotune.api import BUNDLED_LLAMA2_TOKENIZER
from solotune.bench.anatomy import AnatomyInstrument, CudaMeter, TensorMeter, storage_bytes
from solotune.bench.cell import FoldedTokenizer
from solotune.bench.plan import Setup, grad_bytes, optimizer_bytes, param_bytes, saved_activations
from solotune.config import ModelConfig
from solotune.model import build_model
from solotune.tokenizer import load_tokenizer
from solotune.train import TrainConfig, finetune

GQA = ModelConfig(name="tiny-gqa", dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=176,
                  max_seq_len=256)
MHA_TIED = ModelConfig(name="tiny-mha-tied", dim=48, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=200,
                       hidden_dim=128, tie_embeddings=True, max_seq_len=256)

# (model, precision, method, checkpointing, grad_accum, micro-batch, lora dropout, lora targets)
CASES = [
    (GQA, "fp32", "full", "off", 1, 1, 0.05, ("wq", "wv")),
    (GQA, "fp32", "lora", "all", 2, 1, 0.05, ("wq", "wv")),
    (GQA, "bf16-amp", "lora", "off", 1, 1, 0.05, ("wq", "wv")),
    (GQA, "fp16-amp", "full", "every:2", 2, 2, 0.05, ("wq", "wv")),
    (GQA, "bf16", "lora", "every:2", 1, 2, 0.0, ("wk", "wo", "w2")),
    (MHA_TIED, "bf16-amp", "full", "off", 1, 2, 0.05, ("wq", "wv")),
    (MHA_TIED, "bf16", "full", "all", 2, 1, 0.05, ("wq", "wv")),
    (MHA_TIED, "fp16-amp", "lora", "every:2", 1, 1, 0.1, ("wq", "wk", "wv", "wo", "w1", "w2", "w3")),
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(BUNDLED_LLAMA2_TOKENIZER)


def _run(cfg, precision, method, gc, ga, mb, dropout, targets, tokenizer, tmp_path, device="cpu"):
    model = build_model(cfg, seed=0, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    tc = TrainConfig(model=cfg.name, data="alpaca-sample", output_dir=str(tmp_path / "run"), epochs=1,
                     max_samples=4 * ga * mb, batch_size=mb, grad_accum=ga, precision=precision, full=method == "full",
                     lora_rank=8 if method == "lora" else 0, lora_alpha=16, lora_dropout=dropout, lora_targets=targets,
                     grad_checkpoint=gc, max_seq_len=40, val_samples=0, generate_samples=False, progress=False,
                     device=device, log_every=10**9)
    meter = TensorMeter() if device == "cpu" else CudaMeter(torch.device(device))
    inst = AnatomyInstrument(model, meter)
    with meter.tracking(model), contextlib.redirect_stdout(io.StringIO()):
        finetune(tc, model=model, tokenizer=FoldedTokenizer(tokenizer, cfg.vocab_size), instrument=inst)
    inst.close()
    return model, inst


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0].name}-{c[1]}-{c[2]}-{c[3]}-ga{c[4]}-b{c[5]}")
def test_measured_equals_formulas(case, tokenizer, tmp_path):
    cfg, precision, method, gc, ga, mb, dropout, targets = case
    model, inst = _run(*case, tokenizer, tmp_path)

    def setup(seq_len: int, batch: int) -> Setup:
        return Setup(cfg, seq_len=seq_len, batch=batch, grad_accum=ga, grad_checkpoint=gc, precision=precision,
                     lora_rank=8 if method == "lora" else 0, lora_targets=targets, lora_dropout=dropout, device="cpu")

    fb = [r for r in inst.records if r.phase == "forward/backward"]
    assert len(fb) == 4 * ga and len({r.shape for r in fb}) >= 1
    for r in fb:  # every micro-batch, whatever its length
        acts, copies, *_ = saved_activations(setup(r.shape[1], r.shape[0]))
        assert (r.activations, r.weight_copies) == (acts, copies), r.shape
    s = setup(40, mb)
    assert {k: v for k, v in fb[0].params.items()} == param_bytes(s)
    assert inst.grads_total == grad_bytes(s)
    assert inst.optimizer_total == optimizer_bytes(s)
    # with accumulation, the second micro-batch of a window starts with the window's gradients
    if ga > 1:
        assert fb[1].grads == grad_bytes(s) and fb[0].grads == 0
    if precision.endswith("amp"):
        assert any(r.weight_copies > 0 for r in fb)
    # the components measured for a phase coexist, so they never exceed that phase's peak
    for r in inst.records:
        a = r.anatomy()
        assert a["rest"] >= 0, a
        assert a["peak"] <= inst.meter.peak()
    assert inst.anatomy()["peak"] == inst.meter.peak()


# On a GPU: the dry run's CUDA kernels (fused dropout's bool mask, fp32 memory-efficient attention
# with padded log-sum-exp rows, flash attention in 16 bits) against what CUDA really saves. GQA's
# head dim (16) suits every CUDA kernel unpadded.
CUDA_CASES = [
    (GQA, "fp32", "lora", "off", 1, 1, 0.05, ("wq", "wv")),
    (GQA, "fp32", "full", "every:2", 2, 2, 0.0, ("wq", "wv")),
    (GQA, "fp16-amp", "lora", "all", 2, 1, 0.1, ("wq", "wk", "wv", "wo", "w1", "w2", "w3")),
    (GQA, "bf16-amp", "full", "off", 1, 2, 0.05, ("wq", "wv")),
    (GQA, "bf16", "lora", "every:2", 1, 1, 0.05, ("wk", "w2")),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: f"{c[0].name}-{c[1]}-{c[2]}-{c[3]}-ga{c[4]}-b{c[5]}")
def test_measured_equals_dry_run_on_cuda(case, tokenizer, tmp_path):
    cfg, precision, method, gc, ga, mb, dropout, targets = case
    model, inst = _run(*case, tokenizer, tmp_path, device="cuda")
    fb = [r for r in inst.records if r.phase == "forward/backward"]
    assert fb and any(r.shape[1] % 32 for r in fb)  # lengths that the fp32 kernel pads
    for r in fb:
        s = Setup(cfg, seq_len=r.shape[1], batch=r.shape[0], grad_accum=ga, grad_checkpoint=gc, precision=precision,
                  lora_rank=8 if method == "lora" else 0, lora_targets=targets, lora_dropout=dropout, device="cuda")
        acts, copies, *_ = saved_activations(s)
        assert (r.activations, r.weight_copies) == (acts, copies), r.shape
    s = Setup(cfg, seq_len=40, batch=mb, grad_accum=ga, grad_checkpoint=gc, precision=precision,
              lora_rank=8 if method == "lora" else 0, lora_targets=targets, lora_dropout=dropout, device="cuda")
    assert fb[0].params == param_bytes(s)
    assert inst.grads_total == grad_bytes(s) and inst.optimizer_total == optimizer_bytes(s)


def test_parameters_saved_for_backward_are_not_activations(tokenizer, tmp_path):
    """fp32 full fine-tuning saves every weight (for input gradients): none of it may count."""
    model, inst = _run(GQA, "fp32", "full", "off", 1, 1, 0.0, ("wq",), tokenizer, tmp_path)
    r = next(r for r in inst.records if r.phase == "forward/backward")
    weights = storage_bytes(model.parameters())
    acts, *_ = saved_activations(Setup(GQA, seq_len=r.shape[1], batch=1, precision="fp32", lora_rank=0, device="cpu"))
    assert r.activations == acts and r.weight_copies == 0
    assert weights > 0 and r.activations + weights > acts  # (weights were packed too, but excluded)


def test_tensor_meter_counts_live_storages():
    meter = TensorMeter()
    w = torch.zeros(1000)  # seeded: 4000 bytes
    with meter.tracking(w):
        a = torch.ones(2000)  # +8000
        b = a.view(2, 1000)  # a view: no new storage
        c = a * 2  # +8000
        assert meter.current() == 20000
        del a, b, c
        assert meter.current() == 4000
        d = torch.empty(500, dtype=torch.float64)  # +4000
        assert meter.current() == 8000
    assert meter.peak() == 20000
    del d


def test_stop_after_ends_the_loop_without_writing_final_weights(tokenizer, tmp_path):
    from solotune.bench.anatomy import StopTraining

    model = build_model(GQA, seed=0)
    inst = AnatomyInstrument(model, TensorMeter(), stop_after=2)
    tc = TrainConfig(model="tiny", data="alpaca-sample", output_dir=str(tmp_path / "run"), max_samples=6, grad_accum=1,
                     lora_rank=4, max_seq_len=24, val_samples=0, generate_samples=False, progress=False,
                     device="cpu")
    with pytest.raises(StopTraining), contextlib.redirect_stdout(io.StringIO()):
        finetune(tc, model=model, tokenizer=FoldedTokenizer(tokenizer, GQA.vocab_size), instrument=inst)
    assert inst.steps == 2
    assert not (tmp_path / "run" / "final").exists()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
