"""Bad input -> exactly one CheckpointError whose message names the file (and the tensor)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ckpt_helpers import CONFIGS, TINY, random_model
from safetensors.torch import load_file, save_file

from solotune.checkpoint import (CheckpointError, detect_format, load_checkpoint, save_gguf, save_hf, save_meta,
                                 validate_state_dict)

gguf = pytest.importorskip("gguf")


def raises(path: Path, *words: str):
    """Context manager: CheckpointError mentioning ``path`` and every word (tensor names, shapes)."""

    class _Check:
        def __enter__(self):
            self.cm = pytest.raises(CheckpointError)
            self.info = self.cm.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.cm.__exit__(*exc)
            msg = str(self.info.value)
            assert str(path) in msg, msg
            for w in words:
                assert w in msg, (w, msg)
            return handled

    return _Check()


@pytest.fixture(scope="module")
def sd():
    return random_model(TINY).state_dict()


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ------------------------------------------------------------------------------- paths / formats
def test_missing_path(tmp_path):
    with raises(tmp_path / "nope", "no such file"):
        load_checkpoint(tmp_path / "nope")


@pytest.mark.parametrize("make", ["empty-dir", "stray-file", "pth-without-params", "config-without-weights"])
def test_unknown_format(tmp_path, make):
    d = tmp_path / "x"
    d.mkdir()
    target = d
    if make == "stray-file":
        target = d / "weights.bin"
        target.write_bytes(b"\0" * 64)
    elif make == "pth-without-params":
        target = d / "consolidated.00.pth"
        torch.save({"a": torch.zeros(1)}, target)
    elif make == "config-without-weights":
        (d / "config.json").write_text("{}")
    with raises(target, "unknown checkpoint format", "params.json", "config.json", ".gguf"):
        detect_format(target)


# -------------------------------------------------------------------------- keys and shapes
def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path, sd):
    d = save_hf(TINY, sd, tmp_path / "hf")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 160
    (d / "config.json").write_text(json.dumps(cfg))
    with raises(d / "model.safetensors", "layers.0.feed_forward.w1.weight", "[176, 64]", "[160, 64]"):
        load_checkpoint(d)


def test_shape_mismatch_meta_params(tmp_path, sd):
    d = save_meta(TINY, sd, tmp_path / "m")
    params = json.loads((d / "params.json").read_text())
    params["n_kv_heads"] = 4  # wk/wv in the file have 2 heads
    (d / "params.json").write_text(json.dumps(params))
    with raises(d / "consolidated.00.pth", "layers.0.attention.wk.weight", "[32, 64]", "[64, 64]"):
        load_checkpoint(d)


def test_missing_tensor(tmp_path, sd):
    d = save_hf(TINY, sd, tmp_path / "hf")
    f = d / "model.safetensors"
    t = load_file(f)
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, f, metadata={"format": "pt"})
    with raises(f, "layers.1.feed_forward.w3.weight", "missing"):
        load_checkpoint(d)


def test_untied_config_without_lm_head(tmp_path, sd):
    d = save_hf(TINY, sd, tmp_path / "hf")
    t = load_file(d / "model.safetensors")
    del t["lm_head.weight"]
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})
    with raises(d / "model.safetensors", "output.weight", "missing"):
        load_checkpoint(d)


def test_unexpected_tensor_hf_and_meta(tmp_path, sd):
    d = save_hf(TINY, sd, tmp_path / "hf")
    t = load_file(d / "model.safetensors")
    t["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(TINY.dim)
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})
    with raises(d / "model.safetensors", "model.layers.0.self_attn.q_proj.bias", "unexpected"):
        load_checkpoint(d)

    m = save_meta(TINY, sd, tmp_path / "meta")
    extra = dict(sd, **{"layers.0.attention.wq.bias": torch.zeros(TINY.dim)})
    torch.save(extra, m / "consolidated.00.pth")
    with raises(m / "consolidated.00.pth", "layers.0.attention.wq.bias", "unexpected"):
        load_checkpoint(m)


def test_meta_shards_disagree(tmp_path, sd):
    d = save_meta(TINY, sd, tmp_path / "m", shards=2)
    s1 = torch.load(d / "consolidated.01.pth", weights_only=True)
    del s1["norm.weight"]
    torch.save(s1, d / "consolidated.01.pth")
    with raises(d / "consolidated.01.pth", "norm.weight"):
        load_checkpoint(d)


def test_validate_state_dict_direct():
    cfg = CONFIGS["gqa-tied"]
    sd = random_model(cfg).state_dict()
    with raises(Path("src.bin"), "output.weight", "unexpected", "tied"):
        validate_state_dict(sd, cfg, "src.bin")  # tied: the canonical dict has no output head
    sd.pop("output.weight")
    validate_state_dict(sd, cfg, "src.bin")
    sd["norm.weight"] = torch.ones(3)
    with raises(Path("src.bin"), "norm.weight", "[3]", "[64]"):
        validate_state_dict(sd, cfg, "src.bin")


# ------------------------------------------------------------------------------ GGUF specifics
def _write_raw_gguf(path: Path, cfg, sd, override: dict[str, tuple[np.ndarray, object]]) -> None:
    """A GGUF file where the tensors in ``override`` are stored as the given raw (bytes, type)."""
    from solotune.checkpoint.names import GGUF_NAMES, rename

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.n_layers)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_vocab_size(cfg.vocab_size)
    for k, v in sd.items():
        name = rename(k, GGUF_NAMES)
        if name in override:
            raw, qt = override[name]
            w.add_tensor(name, raw, raw_dtype=qt)
        else:
            w.add_tensor(name, v.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_unsupported_quant_type(tmp_path, sd):
    """Q8_1 is a real GGML type that gguf's numpy dequantizer does not implement."""
    Q = gguf.GGMLQuantizationType
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    rows, cols = sd["layers.0.attention.wq.weight"].shape
    raw = np.zeros((rows, cols // block * size), dtype=np.uint8)
    p = tmp_path / "q81.gguf"
    _write_raw_gguf(p, TINY, sd, {"blk.0.attn_q.weight": (raw, Q.Q8_1)})
    with raises(p, "blk.0.attn_q.weight", "Q8_1"):
        load_checkpoint(p)


def test_gguf_bad_magic(tmp_path):
    p = tmp_path / "m.gguf"
    p.write_bytes(b"GGML" + b"\0" * 100)
    with raises(p, "not a GGUF file"):
        load_checkpoint(p)


@pytest.mark.parametrize("keep", [0.02, 0.5, 0.99])
def test_gguf_truncated(tmp_path, sd, keep):
    p = save_gguf(TINY, sd, tmp_path / "m.gguf")
    truncate(p, keep)
    with raises(p, "trunc"):
        load_checkpoint(p)


def test_gguf_not_llama(tmp_path, sd):
    p = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(p), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with raises(p, "gpt2", "llama"):
        load_checkpoint(p)


# --------------------------------------------------------------------------- truncated files
def test_safetensors_truncated(tmp_path, sd):
    d = save_hf(TINY, sd, tmp_path / "hf", max_shard_bytes=40_000)
    shard = sorted(d.glob("model-*.safetensors"))[1]
    truncate(shard)
    with raises(shard, "safetensors"):
        load_checkpoint(d)


def test_safetensors_index_names_missing_shard(tmp_path, sd):
    d = save_hf(TINY, sd, tmp_path / "hf", max_shard_bytes=40_000)
    shard = sorted(d.glob("model-*.safetensors"))[0]
    shard.unlink()
    with raises(shard, "not found"):
        load_checkpoint(d)


def test_pth_truncated(tmp_path, sd):
    d = save_meta(TINY, sd, tmp_path / "m", shards=2)
    truncate(d / "consolidated.01.pth")
    with raises(d / "consolidated.01.pth", "torch checkpoint"):
        load_checkpoint(d)


def test_pth_with_pickled_code_is_refused(tmp_path, sd):
    """weights_only loading: a pickle that would construct an arbitrary object is an error, not executed."""
    d = save_meta(TINY, sd, tmp_path / "m")
    torch.save({"x": Path("/")}, d / "consolidated.00.pth")  # an object weights_only must not build
    with raises(d / "consolidated.00.pth", "torch checkpoint"):
        load_checkpoint(d)


def test_bad_json(tmp_path, sd):
    d = save_hf(TINY, sd, tmp_path / "hf")
    (d / "config.json").write_text("{not json")
    with raises(d / "config.json"):
        load_checkpoint(d)
    m = save_meta(TINY, sd, tmp_path / "m")
    (m / "params.json").write_text(json.dumps({"dim": 64}))
    with raises(m / "params.json", "n_layers"):
        load_checkpoint(m)


class _Payload:
    """Unpickling this would call ``open(marker, "w")``: it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("how", ["torch.save", "legacy-pickle"])
def test_pickle_payload_refused_without_unsafe_advice(tmp_path, sd, how):
    """A ``__reduce__`` payload is refused, never run, and the message says why in plain words
    (no advice to retry with weights_only=False)."""
    import pickle

    from solotune.checkpoint import safe_torch_load
    from solotune.errors import SolotuneError

    marker = tmp_path / "pwned"
    d = save_meta(TINY, sd, tmp_path / "m")
    f = d / "consolidated.00.pth"
    evil = dict(sd, **{"layers.0.attention.wq.weight": _Payload(marker)})
    if how == "torch.save":
        torch.save(evil, f)
    else:  # the pre-zip format (no memory map) goes through the same weights-only unpickler
        f.write_bytes(pickle.dumps(evil, protocol=2))
    for call in (lambda: load_checkpoint(d), lambda: safe_torch_load(f)):
        with raises(f, "contains code or Python objects other than plain tensors", "it was not loaded",
                    "never executes pickled code") as info:
            call()
        msg = str(info.value)
        assert "weights_only=False" not in msg and "trust" not in msg, msg
        assert isinstance(info.value, SolotuneError) and info.value.__cause__ is None
        assert not marker.exists()
