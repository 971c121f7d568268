"""The embedded default model, for real: SmolLM2-135M-Instruct from its PyPI wheel."""

from __future__ import annotations

import math

import pytest
import torch

from solotune import generate, load
from solotune.config import PRESETS

pytestmark = pytest.mark.slow

# A fixed, plain English paragraph (written for this test).
PARAGRAPH = (
    "The sun is a star at the center of our solar system. The Earth and the other planets move around the "
    "sun, and the light from the sun gives us heat and makes it possible for plants to grow. Without the "
    "sun, there would be no life on Earth."
)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load("smollm2-135m", dtype=torch.float32, device="cpu")


def test_loads_from_the_wheel(smollm2) -> None:
    model, tok = smollm2
    assert model.config.replace(name="smollm2-135m") == PRESETS["smollm2-135m"]
    assert model.output.weight is model.tok_embeddings.weight
    assert tok.vocab_size == 49152 and not tok.add_bos


def test_perplexity_on_english(smollm2) -> None:
    model, tok = smollm2
    ids = torch.tensor([tok.encode(PARAGRAPH)])
    with torch.no_grad():
        logits = model(ids[:, :-1])
    nll = torch.nn.functional.cross_entropy(logits[0].float(), ids[0, 1:]).item()
    ppl = math.exp(nll)
    # ~10 with the right Q/K layout; a wrong RoPE layout gives ~100 (see checkpoint/gguf.py).
    assert ppl < 30, ppl


def test_logits_match_transformers_gguf_loader(smollm2, smollm2_gguf) -> None:
    """An independent dequantization path: transformers' own GGUF loader (test-only dependency)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    model, tok = smollm2
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(PARAGRAPH)])
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff < 1e-3, diff


def test_chat_answer_contains_paris(smollm2) -> None:
    model, tok = smollm2
    for kv_cache in (True, False):
        (text,) = generate(model, tok, ["What is the capital of France?"], chat=True, max_new_tokens=16,
                           kv_cache=kv_cache)
        assert "Paris" in text, text


def test_batched_prompts_match_single(smollm2) -> None:
    model, tok = smollm2
    prompts = ["What is the capital of France?", "Name three primary colors."]
    batched = generate(model, tok, prompts, chat=True, max_new_tokens=12)
    single = [generate(model, tok, [p], chat=True, max_new_tokens=12)[0] for p in prompts]
    assert batched == single
