"""The planner's predicted peak against a real CPU run's live tensor bytes (``anatomy.TensorMeter``), for
one micro-batch of one long row on a small 2-layer model: the losses and checkpointing policies the
long-row probes use, at a size the CPU trains in seconds. Reports; asserts nothing.

    python benchmarks/planner_peak_cpu.py [--seq-len 2048] > benchmarks/results/planner-cpu/peak_vs_planner.md
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile

import torch

from solotune.api import BUNDLED_LLAMA2_TOKENIZER
from solotune.bench.anatomy import AnatomyInstrument, TensorMeter
from solotune.bench.cell import FoldedTokenizer
from solotune.bench.plan import Setup, predict
from solotune.config import ModelConfig
from solotune.model import build_model
from solotune.tokenizer import load_tokenizer
from solotune.train import TrainConfig, finetune


def measure(cfg: ModelConfig, T: int, loss: str, gc: str, precision: str = "bf16") -> tuple[int, int]:
    """(measured peak, predicted peak) in bytes of one LoRA bf16 step on one row of T random tokens."""
    model = build_model(cfg, seed=0, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    with tempfile.TemporaryDirectory() as out:
        tc = TrainConfig(model=cfg.name, data="random", output_dir=out + "/run", max_steps=1, max_samples=1,
                         batch_size=1, grad_accum=1, precision=precision, lora_rank=8, lora_alpha=16, lora_dropout=0.05,
                         grad_checkpoint=gc, max_seq_len=T, val_samples=0, generate_samples=False, progress=False,
                         device="cpu", log_every=10**9, loss=loss, packing="off", compile="off", save=False,
                         train_range=(0, 1))
        meter = TensorMeter()
        inst = AnatomyInstrument(model, meter)
        tok = FoldedTokenizer(load_tokenizer(BUNDLED_LLAMA2_TOKENIZER), cfg.vocab_size)
        with meter.tracking(model), contextlib.redirect_stdout(io.StringIO()):
            finetune(tc, model=model, tokenizer=tok, instrument=inst)
        inst.close()
    s = Setup(cfg, seq_len=T, batch=1, grad_checkpoint=gc, precision=precision, lora_rank=8, lora_dropout=0.05,
              device="cpu", loss=loss)
    return meter.peak(), predict(s).peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=2048)
    T = ap.parse_args().seq_len
    cfg = ModelConfig(name="mid", dim=256, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=2048, hidden_dim=704,
                      max_seq_len=T)
    print(f"torch {torch.__version__}; {cfg}; one row of {T} tokens, LoRA r8 on wq,wv")
    print("| loss | checkpointing | precision | measured peak (B) | predicted (B) | error | per token |")
    print("|---|---|---|---:|---:|---:|---:|")
    for loss, gc, prec in (("full-logits", "all", "bf16"), ("fused-linear-ce", "all", "bf16"),
                           ("fused-linear-ce", "off", "bf16"), ("full-logits", "all", "bf16-amp"),
                           ("fused-linear-ce", "all", "bf16-amp")):
        m, p = measure(cfg, T, loss, gc, prec)
        print(f"| {loss} | {gc} | {prec} | {m:,} | {p:,} | {(p - m) / m:+.2%} | {(p - m) / T:+,.0f} |", flush=True)


if __name__ == "__main__":
    main()
