"""The planner's compiled blocks (``Setup(compiled=True)``, no checkpointing) against a compiled
training step measured by the anatomy on CPU: the dry run traces each block through AOTAutograd with
Inductor's decompositions, joint-graph passes and min-cut partitioner (``dryrun._AsCompiledBlock``),
so what it counts equals what the instrument's saved-tensor hooks see when the loop runs blocks
compiled by torch.compile, byte for byte."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from solotune.api import BUNDLED_LLAMA2_TOKENIZER
from solotune.bench.anatomy import AnatomyInstrument, TensorMeter
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


def _measure(cfg: ModelConfig, precision: str, method: str, gc: str, mb: int, backend: str, tmp_path) -> list:
    """The anatomy's forward/backward records of a one-step run whose blocks are compiled with ``backend``."""
    model = build_model(cfg, seed=0, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    tc = TrainConfig(model=cfg.name, data="alpaca-sample", output_dir=str(tmp_path / "run"), max_steps=1,
                     max_samples=mb, batch_size=mb, grad_accum=1, precision=precision, full=method == "full",
                     lora_rank=8 if method == "lora" else 0, lora_alpha=16, lora_dropout=0.05, grad_checkpoint=gc,
                     max_seq_len=40, val_samples=0, generate_samples=False, progress=False, device="cpu",
                     log_every=10**9, packing="off", compile="off")  # the blocks are compiled here, with `backend`
    meter = TensorMeter()
    inst = AnatomyInstrument(model, meter)
    tok = FoldedTokenizer(load_tokenizer(BUNDLED_LLAMA2_TOKENIZER), cfg.vocab_size)
    torch._dynamo.reset()
    model.compile_blocks(backend=backend)  # dynamo traces each block at its first call: after the loop's LoRA
    # no meter.tracking(): dynamo does not compile under its dispatch mode, and only the instrument's
    # saved-tensor ledger (not the live bytes) is compared here
    with contextlib.redirect_stdout(io.StringIO()):
        finetune(tc, model=model, tokenizer=tok, instrument=inst)
    inst.close()
    return [r for r in inst.records if r.phase == "forward/backward"]
