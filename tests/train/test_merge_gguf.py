"""``solotune merge --format gguf``: a tiny LoRA run (LLaMA-2 vocab) merged into one GGUF file loads
in the ``gguf`` reader with its tokenizer and chat template, in transformers' GGUF loader with our
logits and tokenization, in ``solotune generate`` with the adapter's greedy tokens, and -- when
``llama-cpp-python`` is installed -- in llama.cpp with the same greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from solotune import cli
from solotune.train.weights import attach_adapter, load_adapter

from cli_fixtures import base, common_flags, data  # noqa: F401  (module fixtures)

gguf = pytest.importorskip("gguf")
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def run(base, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "lora"
    assert cli.main(["finetune", *common_flags(base, data, out), "--max-steps", "3"]) == 0
    return out


@pytest.fixture(scope="module")
def merged_f32(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "merged.gguf"
    assert cli.main(["merge", "--adapter", str(run), "--format", "gguf", "--gguf-type", "f32",
                     "--output", str(out)]) == 0
    return out


def _adapter_model(base: Path, run: Path):
    import solotune

    model, tok = solotune.load(str(base))
    return attach_adapter(model, load_adapter(run), dropout=0.0).eval(), tok


def test_gguf_reader_sees_the_tokenizer(merged_f32):
    r = gguf.GGUFReader(str(merged_f32))
    fields = r.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "llama"
    assert len(fields["tokenizer.ggml.tokens"].data) == len(fields["tokenizer.ggml.scores"].data) == 32000
    assert int(fields["tokenizer.ggml.eos_token_id"].parts[-1][0]) == 2
    assert {t.name for t in r.tensors} >= {"token_embd.weight", "output.weight", "blk.1.attn_q.weight"}


def test_transformers_reads_our_logits_and_tokens(base, run, merged_f32):
    transformers = pytest.importorskip("transformers")
    ours, tok = _adapter_model(base, run)
    hf = transformers.AutoModelForCausalLM.from_pretrained(merged_f32.parent, gguf_file=merged_f32.name,
                                                           dtype=torch.float32).eval()
    toks = torch.randint(3, 32000, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=toks).logits, ours(toks), atol=1e-4, rtol=1e-4)
    hf_tok = transformers.AutoTokenizer.from_pretrained(merged_f32.parent, gguf_file=merged_f32.name)
    # (not runs of spaces: transformers' GGUF->SentencePiece conversion splits "  " where SentencePiece,
    # llama.cpp and our reader make one "▁▁" piece -- tests/checkpoint/test_gguf_write.py checks ours)
    for text in (PROMPT, "Rewrite: the cat chased 3 mice!", "Tabs\tand ünïcode, 12.5%"):
        assert hf_tok(text, add_special_tokens=False).input_ids == tok.encode(text), text


def test_generate_from_the_gguf_equals_the_adapter(run, merged_f32, capsys):
    flags = ["--prompt", PROMPT, "--max-new-tokens", "10", "--device", "cpu", "--precision", "fp32"]
    capsys.readouterr()
    assert cli.main(["generate", "--adapter", str(run), *flags]) == 0
    with_adapter = capsys.readouterr().out
    assert cli.main(["generate", "--model", str(merged_f32), *flags]) == 0
    assert capsys.readouterr().out == with_adapter


def test_q8_0_stays_close(base, run, tmp_path):
    """(BF16 and Q8_0 bytes are checked against gguf.quants in tests/checkpoint/test_gguf_write.py.)"""
    import solotune

    gguf_type, tol = "q8_0", 2e-2

    out = tmp_path / f"m-{gguf_type}.gguf"
    assert cli.main(["merge", "--adapter", str(run), "--format", "gguf", "--gguf-type", gguf_type,
                     "--output", str(out)]) == 0
    r = gguf.GGUFReader(str(out))
    assert r.get_tensor(0).tensor_type.name in ("F32", gguf_type.upper())
    assert any(t.tensor_type.name == gguf_type.upper() for t in r.tensors)
    ours, _ = _adapter_model(base, run)
    model, _ = solotune.load(str(out))
    toks = torch.randint(3, 32000, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = ours(toks), model(toks)
    assert 0 < (got - want).abs().max() < tol * want.abs().max()  # rounded (not f32), and only a little


def test_llama_cpp_generates_our_greedy_tokens(base, run, merged_f32):
    llama_cpp = pytest.importorskip("llama_cpp")
    from solotune.generate import generate_tokens

    ours, tok = _adapter_model(base, run)
    llm = llama_cpp.Llama(model_path=str(merged_f32), n_ctx=64, verbose=False)
    ids = tok.encode(PROMPT, bos=True)
    assert llm.tokenize(PROMPT.encode(), add_bos=True) == ids
    theirs = []
    for t in llm.generate(ids, temp=0.0, top_k=1):
        theirs.append(t)
        if len(theirs) == 8:
            break
    assert generate_tokens(ours, [ids], max_new_tokens=8, stop_ids=tok.stop_ids)[0][: len(theirs)] == theirs
