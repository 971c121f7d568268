"""Shared pieces of the training tests: a word-level fake tokenizer, tiny data files and configs."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch

from solotune.config import ModelConfig
from solotune.model import build_model
from solotune.train import TrainConfig

TINY = ModelConfig(name="tiny-train", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128,
                   hidden_dim=64, max_seq_len=256)


class WordTokenizer:
    """Whitespace words hashed into a small vocab (ids 3..vocab-1); bos 1, eos 2, pad 0.
    Deterministic across processes (crc32, not hash())."""

    def __init__(self, vocab_size: int = 128) -> None:
        self.vocab_size, self.bos_id, self.eos_id, self.pad_id, self.add_bos = vocab_size, 1, 2, 0, True
        self.source = "word-tokenizer"

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = [3 + zlib.crc32(w.encode()) % (self.vocab_size - 3) for w in text.split()]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        return " ".join(f"w{i}" for i in ids)


WORDS = ("red green blue cat dog sun moon tree rock fast slow big small one two three four five six seven "
         "eight nine ten apple pear river sky cloud rain snow wind").split()


def write_records(path: Path, n: int = 48, seed: int = 0) -> Path:
    """n synthetic Alpaca records with answers of varied length (some with an input)."""
    g = torch.Generator().manual_seed(seed)
    recs = []
    for i in range(n):
        pick = lambda k: " ".join(WORDS[j] for j in torch.randint(len(WORDS), (k,), generator=g).tolist())
        rec = {"instruction": f"Repeat {pick(2)}", "input": pick(3) if i % 3 == 0 else "",
               "output": pick(1 + i % 7)}
        recs.append(rec)
    path.write_text(json.dumps(recs))
    return path


def tiny_model(seed: int = 0, cfg: ModelConfig = TINY) -> torch.nn.Module:
    return build_model(cfg, seed=seed)


def tiny_config(tmp_path: Path, data: Path, **kw) -> TrainConfig:
    base = dict(model="tiny-train", data=str(data), output_dir=str(tmp_path / "run"), max_steps=4,
                lr=1e-2, batch_size=2, grad_accum=2, lora_rank=4, lora_alpha=8, lora_dropout=0.0,
                train_range=(0, 32), val_range=(32, 48), max_seq_len=96, generate_samples=False,
                progress=False, device="cpu", seed=0, eval_batch_size=8,
                compile="off")  # compiling tiny models only costs time (GPU tests opt in)
    base.update(kw)
    return TrainConfig(**base)


class CtrlCAfter:
    """Instrument that raises KeyboardInterrupt right after optimizer step ``n``, as a Ctrl-C there would."""

    def __init__(self, n: int) -> None:
        self.n = n

    def after_step(self, model, optimizer, step):
        if step == self.n:
            raise KeyboardInterrupt
