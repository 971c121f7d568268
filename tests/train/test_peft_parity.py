"""Our LoRA training curve == HF transformers + peft trained by a plain torch loop, from the same
initial weights (LoRA A copied across), on the same batches in the same order (fp32, no dropout)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from solotune.checkpoint.hf import canonical_to_hf
from solotune.checkpoint.names import HF_MODULES, meta_rows_to_hf, rename
from solotune.data import IGNORE_INDEX, AlpacaDataset, collate, load_records, split
from solotune.peft import lora_state_dict
from solotune.train import finetune
from solotune.train.run_state import DataStream

from train_fixtures import TINY, WordTokenizer, tiny_config, tiny_model, write_records

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

STEPS = 10
TARGETS = ("wq", "wk", "wv", "w2")  # wq/wk exercise the RoPE row permutation of lora_B
HF_TARGET = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "w2": "down_proj"}


class InitialAdapters:
    def before_step(self, model, optimizer, step):
        if step == 1:  # gradients exist, weights are still the initial ones
            self.sd = {k: v.clone() for k, v in lora_state_dict(model).items()}


def _hf_lora_model(sd0, adapters, cfg):
    kw = {k: v for k, v in cfg.to_hf_config().items() if k not in ("architectures", "model_type", "torch_dtype")}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    hf.load_state_dict(canonical_to_hf(sd0, cfg), strict=True)
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=[HF_TARGET[t] for t in TARGETS],
                           bias="none", task_type="CAUSAL_LM")
    model = peft.get_peft_model(hf, lcfg)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for key, t in adapters.items():
            module, ab = key.rsplit(".", 1)  # layers.0.attention.wq, lora_a
            hf_module = rename(module, HF_MODULES)
            if ab == "lora_b" and module.endswith(("wq", "wk")):
                t = meta_rows_to_hf(t, cfg.n_heads if module.endswith("wq") else cfg.n_kv_heads)
            name = f"base_model.model.{hf_module}.lora_{ab[-1].upper()}.default.weight"
            assert named[name].shape == t.shape, name
            named[name].copy_(t)
    return model


def test_lora_training_curve_matches_peft(tmp_path):
    data = write_records(tmp_path / "records.json")
    cfg = tiny_config(tmp_path, data, max_steps=STEPS, lr=1e-2, lr_schedule="constant", warmup_steps=0,
                      weight_decay=0.01, max_grad_norm=1.0, lora_rank=4, lora_alpha=8, lora_dropout=0.0,
                      lora_targets=TARGETS, batch_size=2, grad_accum=2)
    model = tiny_model()
    sd0 = {k: v.clone() for k, v in model.state_dict().items()}
    probe = InitialAdapters()
    ours = finetune(cfg, model=model, tokenizer=WordTokenizer(), instrument=probe).losses
    assert len(ours) == STEPS

    # ---- the reference: transformers + peft, a plain AdamW loop, the same batches
    hf = _hf_lora_model(sd0, probe.sd, TINY)
    hf.train()
    params = [p for p in hf.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params) == sum(t.numel() for t in probe.sd.values())
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    train, _ = split(load_records(data), train=range(*cfg.train_range), val=range(*cfg.val_range))
    ds = AlpacaDataset(train, WordTokenizer(), cfg.max_seq_len)
    stream = DataStream(len(ds), cfg.seed, cfg.batch_size, epochs=None)
    theirs = []
    for _ in range(STEPS):
        window = [collate([ds[i] for i in idx], pad_id=0) for idx in stream.take_window(cfg.grad_accum)]
        n = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in window)
        total = 0.0
        for b in window:
            logits = hf(input_ids=b["input_ids"]).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
            (loss / n).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        theirs.append(total / n)

    rel = [abs(a - b) / abs(b) for a, b in zip(ours, theirs)]
    print("max relative loss difference", max(rel))
    assert max(rel) <= 1e-4, list(zip(ours, theirs))
    assert ours[-1] < ours[0]  # and it trained (a curve that never moved would match trivially)

    # The trained models agree too (logits on a fresh batch).
    hf.eval()
    model.eval()
    toks = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(toks), hf(input_ids=toks).logits, atol=1e-4, rtol=1e-4)
