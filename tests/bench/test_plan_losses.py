"""The planner follows ``TrainConfig.loss`` and ``TrainConfig.kernels``: its dry run runs the real
loss through the head, so what the chunked and fused linear-cross-entropy losses save for backward
is predicted byte for byte (measured through the training loop on tiny models), and on the 7B
architecture the predicted peak drops by at least the [tokens x vocab] fp32 tensor that
full-logits keeps for backward. With ``kernels="triton"`` on CUDA the dry run swaps the fused
kernels in and runs their ops' fake implementations (checked against CUDA where there is a GPU)."""

from __future__ import annotations

import contextlib
import json
import io

import pytest
import torch

from solotune.api import BUNDLED_LLAMA2_TOKENIZER
from solotune.bench.anatomy import AnatomyInstrument, CudaMeter, TensorMeter
from solotune.bench.cell import FoldedTokenizer
from solotune.bench.plan import Setup, predict, saved_activations
from solotune.config import ModelConfig
from solotune.model import build_model
from solotune.tokenizer import load_tokenizer
from solotune.train import TrainConfig, finetune

GQA = ModelConfig(name="tiny-gqa", dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=176,
                  max_seq_len=256)
MHA_TIED = ModelConfig(name="tiny-mha-tied", dim=48, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=200,
                       hidden_dim=128, tie_embeddings=True, max_seq_len=256)

# (model, precision, method, checkpointing, micro-batch, loss)
CASES = [
    (GQA, "fp32", "lora", "all", 1, "chunked"),
    (GQA, "bf16-amp", "lora", "off", 2, "fused-linear-ce"),
    (MHA_TIED, "bf16-amp", "full", "off", 2, "fused-linear-ce"),  # the tied head's fp32 gradient is kept
]


def _measured_equals_planner(case, tmp_path, device: str = "cpu", kernels: str = "off") -> None:
    cfg, precision, method, gc, mb, loss = case
    model = build_model(cfg, seed=0, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    rank = 8 if method == "lora" else 0
    tc = TrainConfig(model=cfg.name, data="alpaca-sample", output_dir=str(tmp_path / "run"), max_steps=1,
                     max_samples=mb, batch_size=mb, grad_accum=1, precision=precision, full=method == "full",
                     lora_rank=rank, lora_alpha=16, lora_dropout=0.05, grad_checkpoint=gc, max_seq_len=40,
                     val_samples=0, generate_samples=False, progress=False, device=device, log_every=10**9, loss=loss,
                     kernels=kernels, packing="off", compile="off")  # the planner models the eager padded step
    meter = TensorMeter() if device == "cpu" else CudaMeter(torch.device(device))
    inst = AnatomyInstrument(model, meter)
    tok = FoldedTokenizer(load_tokenizer(BUNDLED_LLAMA2_TOKENIZER), cfg.vocab_size)
    with meter.tracking(model), contextlib.redirect_stdout(io.StringIO()):
        finetune(tc, model=model, tokenizer=tok, instrument=inst)
    inst.close()
    fb = [r for r in inst.records if r.phase == "forward/backward"]
    assert fb
    for r in fb:
        s = Setup(cfg, seq_len=r.shape[1], batch=r.shape[0], grad_checkpoint=gc, precision=precision, lora_rank=rank,
                  lora_dropout=0.05, device=device, loss=loss, kernels=kernels)
        acts, copies, *_ = saved_activations(s)
        assert (r.activations, r.weight_copies) == (acts, copies), r.shape


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0].name}-{c[1]}-{c[2]}-{c[3]}-b{c[4]}-{c[5]}")
def test_measured_equals_planner(case, tmp_path):
    _measured_equals_planner(case, tmp_path)


CUDA_CASES = CASES + [(GQA, "bf16", "lora", "every:2", 2, "fused-linear-ce"), (GQA, "fp32", "full", "off", 1, "full-logits")]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: f"{c[0].name}-{c[1]}-{c[2]}-{c[3]}-b{c[4]}-{c[5]}")
@pytest.mark.parametrize("kernels", ["off", "triton"])
def test_measured_equals_planner_on_cuda(case, kernels, tmp_path):
    _measured_equals_planner(case, tmp_path, device="cuda", kernels=kernels)


@pytest.mark.parametrize("gc", ["off", "all"])
def test_7b_peak_drops_without_full_logits(gc):
    cfg = ModelConfig.from_name("llama2-7b")
    B, T = 8, 512

    def pred(loss: str):
        return predict(Setup(cfg, seq_len=T, batch=B, grad_checkpoint=gc, precision="bf16", lora_rank=16,
                             lora_dropout=0.05, loss=loss))

    full = pred("full-logits")
    fp32_logits = B * T * cfg.vocab_size * torch.float32.itemsize  # full-logits saves log_softmax's output
    # ... and the new losses keep one [tokens, dim] bf16 tensor instead: the checkpointed chunks'
    # input (chunked), d hidden (fused); full-logits keeps no hidden state for a frozen head.
    hidden = B * T * cfg.dim * torch.bfloat16.itemsize
    for loss in ("chunked", "fused-linear-ce"):
        p = pred(loss)
        assert full.activations - p.activations >= fp32_logits - hidden, loss
        assert p.transient_fb < full.transient_fb, loss
        assert full.peak - p.peak >= fp32_logits, loss


def test_unknown_loss_or_kernels_are_refused():
    with pytest.raises(ValueError, match="loss 'nope'"):
        Setup(GQA, loss="nope")
    with pytest.raises(ValueError, match="kernels 'nope'"):
        Setup(GQA, kernels="nope")


def test_7b_kernels_save_less():
    """The fused RMSNorm keeps x (16-bit) and 1/rms instead of the fp32 copy of x and the normalised
    x; the fused SwiGLU keeps a and b, not silu(a) too: the norm and mlp parts shrink, nothing else
    grows; on CPU (where the kernels do not run) the prediction is unchanged."""
    cfg = ModelConfig.from_name("llama2-7b")

    def pred(kernels: str, device: str = "cuda"):
        return predict(Setup(cfg, seq_len=512, batch=8, precision="bf16", lora_rank=16, lora_dropout=0.05,
                             loss="fused-linear-ce", kernels=kernels, device=device))

    off, on = pred("off"), pred("triton")
    N = 8 * 512
    # per norm: the reference keeps x in fp32, the kernel x itself (bf16); both keep 1/rms [N] fp32.
    # Block 0's attention_norm keeps nothing either way (LoRA: neither its input nor weight needs grad).
    per_norm = N * cfg.dim * (4 - 2)
    silu_out = N * cfg.hidden_dim * 2
    assert off.activations_by_part["norm"] - on.activations_by_part["norm"] == (2 * cfg.n_layers - 1) * per_norm
    assert off.activations_by_part["mlp"] - on.activations_by_part["mlp"] == cfg.n_layers * silu_out
    for part, n in on.activations_by_part.items():
        assert n <= off.activations_by_part[part], part
    assert on.peak < off.peak
    assert pred("triton", "cpu").activations == pred("off", "cpu").activations


def test_compiled_loss_keeps_the_16bit_logits_not_the_fp32_log_softmax():
    """Setup(compiled=True): the dry run's stand-in for the compiled full-logits loss saves the
    16-bit logits, the per-token logsumexp and the targets instead of eager's fp32 log-softmax,
    and leaves no logits transients (d logits reuse the saved buffer)."""
    cfg = ModelConfig.from_name("llama2-7b")
    B, T = 8, 512
    N, V = B * T, cfg.vocab_size

    def pred(compiled: bool):
        return predict(Setup(cfg, seq_len=T, batch=B, grad_checkpoint="all", precision="bf16", lora_rank=16,
                             lora_dropout=0.05, compiled=compiled))

    eager, compiled = pred(False), pred(True)
    # fp32 [N, V] -> bf16, + lse [N] (eager's nll also keeps a 0-dim total weight: a few bytes)
    assert abs(eager.activations - compiled.activations - (N * V * (4 - 2) - N * 4)) <= 16
    assert compiled.peak < eager.peak - N * V * 4  # the fp32 copy and the eager loss gradients are gone
    # a loss that is not compiled (chunked) is modelled as it runs, compiled run or not: the same
    # saved tensors; the peak differs by the checkpointed block's backward alone (an eager block's as
    # traced, recomputation included; a compiled block's recomputation keeps what its graph saves)
    from solotune.bench.plan import _block_backward

    ch = [Setup(cfg, seq_len=T, batch=B, grad_checkpoint="all", precision="bf16", lora_rank=16,
                lora_dropout=0.05, loss="chunked", compiled=c) for c in (False, True)]
    p = [predict(s) for s in ch]
    extra = [saved_activations(s)[4] for s in ch]
    eager_block = max(extra[0]["recompute"], _block_backward(ch[0])[1] - extra[0]["outside"])
    assert _block_backward(ch[1]) == (0, 0)
    assert (p[0].activations, p[0].weight_copies) == (p[1].activations, p[1].weight_copies)
    assert p[0].peak - p[1].peak == eager_block - extra[1]["recompute"] > 0


def test_plan_cli_compiled_flag(capsys):
    from solotune.cli import main

    argv = ["plan", "--model", "llama2-7b", "--gpu-mem", "80GiB", "--batch", "8", "--grad-accum", "1", "--methods",
            "lora", "--precisions", "bf16", "--checkpointing", "all", "--json"]
    assert main(argv) == 0
    eager = json.loads(capsys.readouterr().out)[0]
    assert main(argv + ["--compiled"]) == 0
    comp = json.loads(capsys.readouterr().out)[0]
    assert (eager["compiled"], comp["compiled"]) == (False, True)
    assert comp["peak"] < eager["peak"]
