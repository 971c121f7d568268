"""Streaming loading: ``Checkpoint.tensors()`` hands out one tensor at a time and ``build_model``
consumes it that way (no dict of the whole model, the source tensor gone before the next is read),
with a per-tensor transform. Checked by counting live source tensors, not by measuring RSS."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Iterable, Iterator

import pytest
import torch
from ckpt_helpers import CONFIGS, TINY, random_model, tokens

import solotune
from solotune.api import BUNDLED_LLAMA2_TOKENIZER
from solotune.checkpoint import Checkpoint, load_checkpoint, save_gguf, save_hf, save_meta
from solotune.model import build_model, cast_to

pytest.importorskip("gguf")


class Tracker:
    """Wraps a ``(name, tensor)`` stream; each time the consumer asks for the next tensor, records
    how many earlier source tensors are still alive anywhere (weakrefs), i.e. held by the consumer
    or by the reader, just before the reader produces the next one. Keeps none itself."""

    def __init__(self, source: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.source = source
        self.refs: list[weakref.ref] = []
        self.alive_at_read: list[int] = []

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        it = iter(self.source)
        while True:
            self.alive_at_read.append(sum(r() is not None for r in self.refs))
            try:
                name, t = next(it)
            except StopIteration:
                return
            self.refs.append(weakref.ref(t))
            yield name, t
            del t


def write(fmt: str, cfg, sd, tmp_path: Path) -> Path:
    if fmt == "hf":
        return save_hf(cfg, sd, tmp_path / "hf")
    if fmt == "hf-sharded":
        return save_hf(cfg, sd, tmp_path / "hfs", max_shard_bytes=40_000)
    if fmt == "meta":
        return save_meta(cfg, sd, tmp_path / "meta")
    if fmt == "meta-2-shards":
        return save_meta(cfg, sd, tmp_path / "meta2", shards=2)
    return save_gguf(cfg, sd, tmp_path / "m.gguf")


@pytest.fixture
def no_materialise(monkeypatch):
    """Make ``Checkpoint.state_dict`` (all tensors at once) an error for the duration of a test."""

    def boom(self):
        raise AssertionError("Checkpoint.state_dict was materialised")

    monkeypatch.setattr(Checkpoint, "state_dict", property(boom))


@pytest.mark.parametrize("fmt", ["hf", "hf-sharded", "meta", "meta-2-shards", "gguf"])
@pytest.mark.parametrize("case", ["tiny", "gqa-tied"])
def test_one_source_tensor_alive_at_a_time(tmp_path, fmt, case, no_materialise):
    cfg = CONFIGS[case]
    ref = random_model(cfg)
    ck = load_checkpoint(write(fmt, cfg, ref.state_dict(), tmp_path))
    assert sorted(ck.shapes) == sorted(k for k in ref.state_dict() if not (cfg.tie_embeddings and k == "output.weight"))
    src = Tracker(ck.tensors())
    # float64: every tensor is cast, so no source tensor may survive as a parameter
    model = build_model(ck.config, src, dtype=torch.float64).eval()
    assert len(src.refs) == len(ck.shapes) and len(src.alive_at_read) == len(ck.shapes) + 1
    assert max(src.alive_at_read) == 0, src.alive_at_read
    assert all(r() is None for r in src.refs)
    toks = tokens(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(toks).float(), ref(toks), atol=1e-4, rtol=0)


def test_tracker_catches_a_reader_or_consumer_that_keeps_tensors():
    """The check above can fail: a reader holding its last tensor in a local, or a consumer that
    collects the source tensors, is caught."""
    sd = random_model(TINY).state_dict()

    def leaky():
        for name, v in sd.items():
            t = v.clone()
            yield name, t

    src = Tracker(leaky())
    build_model(TINY, src, dtype=torch.float64)
    assert max(src.alive_at_read) == 1

    src = Tracker((k, v.clone()) for k, v in sd.items())
    kept = dict(src)  # what the old all-at-once path did
    assert src.alive_at_read[-1] == len(sd) and len(kept) == len(sd)


def test_api_load_streams(tmp_path, no_materialise):
    """``solotune.load`` builds from ``tensors()``, never from the materialised state dict."""
    cfg = CONFIGS["gqa-tied"]
    ref = random_model(cfg)
    d = save_hf(cfg, ref.state_dict(), tmp_path / "hf", tokenizer_file=BUNDLED_LLAMA2_TOKENIZER)
    model, _ = solotune.load(d, dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    toks = tokens(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(toks).float(), ref(toks), atol=1e-4, rtol=0)


def test_state_dict_property_matches_stream(tmp_path):
    cfg = TINY
    ck = load_checkpoint(save_hf(cfg, random_model(cfg).state_dict(), tmp_path / "hf", max_shard_bytes=40_000))
    streamed = dict(ck.tensors())
    assert {k: tuple(v.shape) for k, v in streamed.items()} == ck.shapes
    sd = ck.state_dict
    assert ck.state_dict is sd  # read once, then kept
    assert sd.keys() == streamed.keys() and all(torch.equal(sd[k], streamed[k]) for k in sd)
    assert dict(ck.tensors()).keys() == sd.keys()


@pytest.mark.parametrize("case", ["tiny", "gqa-tied"])
def test_transform_per_tensor_dtype(tmp_path, case):
    """Norms kept fp32, everything else bf16; every name reaches the transform once (a tied head
    never), and requires_grad survives the swap of Parameter objects."""
    cfg = CONFIGS[case]
    ref = random_model(cfg)
    ck = load_checkpoint(save_meta(cfg, ref.state_dict(), tmp_path / "m"))
    seen: list[str] = []

    def mixed(name: str, t: torch.Tensor) -> torch.Tensor:
        seen.append(name)
        return t.to(torch.float32 if name.endswith("norm.weight") else torch.bfloat16)

    model = build_model(ck.config, ck.tensors(), transform=mixed)
    assert sorted(seen) == sorted(ck.shapes) and len(seen) == len(set(seen))
    assert "output.weight" not in seen or not cfg.tie_embeddings
    want = ref.state_dict()
    for name, p in model.named_parameters():
        assert p.requires_grad and p.device.type == "cpu", name
        assert p.dtype == (torch.float32 if name.endswith("norm.weight") else torch.bfloat16), name
        assert torch.equal(p, want[name].to(p.dtype)), name
    if cfg.tie_embeddings:
        assert model.output.weight is model.tok_embeddings.weight


def test_default_transform_is_cast_to():
    sd = random_model(TINY).state_dict()
    a = build_model(TINY, sd, dtype=torch.bfloat16)
    b = build_model(TINY, iter(sd.items()), transform=cast_to(torch.bfloat16, "cpu"))
    assert all(torch.equal(x, y) and x.dtype == torch.bfloat16 for x, y in zip(a.parameters(), b.parameters()))


def test_stream_name_errors():
    """An iterable source gets the same KeyError as a dict: missing and unexpected named."""
    sd = random_model(TINY).state_dict()
    sd.pop("norm.weight")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"missing \['norm.weight'\].*unexpected \['extra.weight'\]"):
        build_model(TINY, iter(sd.items()))
    with pytest.raises(KeyError, match=r"missing \['norm.weight'\].*unexpected \['extra.weight'\]"):
        build_model(TINY, sd)


def test_stream_shape_error():
    sd = random_model(TINY).state_dict()
    sd["norm.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match=r"norm.weight.*\[3\].*\[64\]"):
        build_model(TINY, iter(sd.items()))


def test_dict_source_names_checked_before_any_transform():
    sd = random_model(TINY).state_dict()
    sd.pop("norm.weight")
    calls: list[str] = []
    with pytest.raises(KeyError, match="norm.weight"):
        build_model(TINY, sd, transform=lambda n, t: calls.append(n) or t)
    assert calls == []
