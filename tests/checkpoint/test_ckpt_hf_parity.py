"""HF interop both ways: transformers' save_pretrained -> load_checkpoint -> our logits, and our
save_hf -> LlamaForCausalLM.from_pretrained -> their logits."""

from __future__ import annotations

import pytest
import torch
from hf_reference import random_hf_llama
from ckpt_helpers import CONFIGS, random_model, same_arch, tokens

from solotune.checkpoint import load_checkpoint, save_hf
from solotune.model import build_model

transformers = pytest.importorskip("transformers")

CASES = {
    "mha-untied": CONFIGS["mha"],
    "gqa-untied": CONFIGS["tiny"],
    "mha-tied": CONFIGS["mha"].replace(tie_embeddings=True),
    "gqa-tied": CONFIGS["gqa-tied"],
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_load_transformers_save_pretrained(tmp_path, case, shard):
    cfg = CASES[case]
    ref = random_hf_llama(cfg)
    kw = {"max_shard_size": shard} if shard else {}
    ref.save_pretrained(tmp_path, **kw)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    ck = load_checkpoint(tmp_path)
    assert ck.format == "hf" and same_arch(ck.config, cfg), ck.config
    toks = tokens(cfg)
    with torch.no_grad():
        ours = build_model(ck.config, ck.state_dict).eval()(toks)
        theirs = ref(toks).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_save_hf_loads_in_transformers(tmp_path, case):
    cfg = CASES[case]
    model = random_model(cfg)
    save_hf(cfg, model.state_dict(), tmp_path / "out", max_shard_bytes=30_000 if "gqa" in case else None)
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert ref.config.tie_word_embeddings == cfg.tie_embeddings
    toks = tokens(cfg)
    with torch.no_grad():
        torch.testing.assert_close(ref(toks).logits, model(toks), atol=1e-4, rtol=0)
