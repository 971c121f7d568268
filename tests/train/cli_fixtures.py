"""Shared pieces of the CLI tests: a tiny HF base checkpoint with the LLaMA-2 tokenizer, and the
finetune flags that train it for a few steps on a synthetic record file."""

from __future__ import annotations

from pathlib import Path

import pytest

from solotune.checkpoint import save_hf
from solotune.config import ModelConfig
from solotune.model import build_model

from train_fixtures import write_records

TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "llama2_tokenizer.model"
CFG = ModelConfig(name="tiny-llama2-vocab", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000,
                  hidden_dim=64, max_seq_len=256)


def write_tiny_base(d: Path) -> Path:
    """A random tiny HF checkpoint (LLaMA-2 vocab, tokenizer included) in ``d``."""
    if not TOKENIZER.is_file():
        pytest.skip(f"{TOKENIZER} missing")
    save_hf(CFG, build_model(CFG, seed=0).state_dict(), d, tokenizer_file=TOKENIZER)
    return d


def common_flags(base: Path, data: Path, out: Path | str | None = None, ranges: bool = True) -> list[str]:
    """finetune flags for a tiny LoRA run on CPU (``out`` None: no --output-dir; ``ranges`` False:
    no --train-range/--val-range)."""
    flags = ["--model", str(base), "--data", str(data), "--max-seq-len", "128", "--batch-size", "2",
             "--grad-accum", "2", "--lr", "3e-2", "--lora-rank", "4", "--lora-alpha", "8",
             "--lora-targets", "wq,wk,wv,w2", "--device", "cpu", "--no-progress", "--no-generate"]
    if out is not None:
        flags += ["--output-dir", str(out)]
    if ranges:
        flags += ["--train-range", "0:32", "--val-range", "32:48"]
    return flags


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return write_tiny_base(tmp_path_factory.mktemp("base") / "hf")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_records(tmp_path_factory.mktemp("data") / "records.json")
