"""`solotune.load` over the three formats and the presets; the `generate` CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from solotune import load
from solotune.checkpoint.gguf import save_gguf
from solotune.checkpoint.hf import save_hf
from solotune.checkpoint.meta import save_meta
from solotune.config import ModelConfig
from solotune.model import build_model

ASSETS = Path(__file__).parent / "assets"
CFG = ModelConfig(name="t", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, hidden_dim=96)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats")
    model = build_model(CFG, seed=0)
    sd = model.state_dict()
    save_meta(CFG, sd, root / "meta", tokenizer_file=ASSETS / "llama2_tokenizer.model")
    save_hf(CFG, sd, root / "hf", tokenizer_file=ASSETS / "llama2_tokenizer.json")
    gguf = root / "m.gguf"
    save_gguf(CFG, sd, gguf, qtype="F32")
    return {"meta": root / "meta", "hf": root / "hf", "gguf": gguf}


def test_three_formats_give_same_logits(written) -> None:
    tokens = torch.randint(0, CFG.vocab_size, (1, 7), generator=torch.Generator().manual_seed(0))
    ref = build_model(CFG, seed=0).eval()
    with torch.no_grad():
        want = ref(tokens)
        for fmt in ("meta", "hf"):
            model, tok = load(written[fmt])
            assert (model(tokens) - want).abs().max() <= 1e-5, fmt
            assert tok.encode("Hello world") == [15043, 3186]


def test_presets_without_weights() -> None:
    with pytest.raises(ValueError, match="no bundled weights"):
        load("llama2-7b")
    with pytest.raises(FileNotFoundError, match="not a preset"):
        load("no/such/model")
    model, tok = load("llama2-7b", random_init=True, n_layers=1, dtype=torch.bfloat16)
    assert model.config.n_layers == 1 and model.tok_embeddings.weight.dtype == torch.bfloat16
    assert tok.vocab_size == 32000


def test_cli_generate_runs(written, capsys) -> None:
    from solotune.cli import main

    rc = main(["generate", "--model", str(written["meta"]), "--prompt", "Hello", "--max-new-tokens", "4",
               "--device", "cpu"])
    assert rc == 0
    assert capsys.readouterr().out.strip() != ""


def test_cli_bad_input_is_one_clear_line(tmp_path, capsys) -> None:
    from solotune.cli import main

    (tmp_path / "junk.txt").write_text("x")
    rc = main(["generate", "--model", str(tmp_path / "junk.txt"), "--prompt", "Hi"])
    err = capsys.readouterr().err
    assert rc == 2 and "junk.txt" in err and "Traceback" not in err
