"""The speed options of the one loop change nothing but speed: packing == padding (the loss curve of
a whole run), selective checkpointing == no checkpointing, compiled blocks == eager blocks."""

from __future__ import annotations

import functools

import pytest
import torch

from solotune.config import ModelConfig
from solotune.data import IGNORE_INDEX, Example
from solotune.data.batch import collate_batch
from solotune.model import build_model
from solotune.train import finetune
from solotune.train.loss import full_logits_loss
from train_fixtures import WordTokenizer, tiny_config, tiny_model, write_records

CFG = ModelConfig(name="tiny-speed", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=64,
                  max_seq_len=64)


def _examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Example(ids, [IGNORE_INDEX] * (n // 3) + ids[n // 3:])
            for n in lengths for ids in [torch.randint(3, 64, (n,), generator=g).tolist()]]


def _curve(tmp_path, name, **kw):
    data = write_records(tmp_path / "data.json")
    cfg = tiny_config(tmp_path / name, data, precision="fp64", max_steps=3, **kw)
    res = finetune(cfg, model=tiny_model(), tokenizer=WordTokenizer())
    return res.losses + [res.val_loss], res


def test_packed_run_has_the_padded_runs_loss_curve(tmp_path):
    padded, _ = _curve(tmp_path, "padded")
    packed, res = _curve(tmp_path, "packed", packing="on", max_seq_len=96)
    assert packed == pytest.approx(padded, rel=1e-9)


def _grads(model, batch):
    model.zero_grad()
    loss = model(batch, head=functools.partial(full_logits_loss, labels=batch.labels))
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("policy", ["selective", "all"])
def test_selective_checkpointing_equals_no_checkpointing(policy):
    model = build_model(CFG, dtype=torch.float64, seed=0)
    batch = collate_batch(_examples([12, 7, 19]), pad_id=0)
    model.train()
    ref_loss, ref = _grads(model, batch)
    model.set_grad_checkpointing(policy)
    loss, got = _grads(model, batch)
    assert loss == ref_loss
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=0, atol=0, msg=n)


def test_compiled_blocks_equal_eager_blocks():
    """Graph capture of every block (aot_eager on CPU: the same graphs Inductor gets; the Inductor
    kernels themselves are checked on the GPU in tests/train/test_train_gpu.py)."""
    model = build_model(CFG, dtype=torch.float64, seed=0)
    batch = collate_batch(_examples([12, 7, 19]), pad_id=0)
    model.train()
    ref_loss, ref = _grads(model, batch)
    torch._dynamo.reset()
    model.compile_blocks(backend="aot_eager", fullgraph=True)
    loss, got = _grads(model, batch)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-12, msg=n)
    assert set(model.state_dict()) == set(build_model(CFG, seed=0).state_dict())  # names unchanged


def test_auto_turns_packing_and_compile_on_for_cuda_only():
    from solotune.train import TrainConfig

    cfg = TrainConfig()
    assert (cfg.packing, cfg.compile) == ("auto", "auto")
    assert not cfg.packs("cpu") and not cfg.compiles("cpu")
    assert cfg.packs("cuda")
    assert not cfg.replace(packing="off").packs("cuda") and cfg.replace(packing="on").packs("cpu")
    assert cfg.replace(compile="blocks").compiles("cpu") and not cfg.replace(compile="off").compiles("cuda")
    fsdp = cfg.replace(distributed="fsdp")
    assert not fsdp.packs("cuda") and not fsdp.compiles("cuda")
    import pytest as _pytest
    from solotune.errors import ConfigError

    with _pytest.raises(ConfigError, match="packing"):
        TrainConfig(packing="on", distributed="fsdp")


@torch.library.custom_op("solotune_test::varlen_reference", mutates_args=())
def _varlen_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """Causal attention per segment of ``cu`` over flattened [N, H, D] tokens (a CPU stand-in for
    CUDA's varlen flash attention, opaque to dynamo as the real op is)."""
    out = torch.zeros_like(q)
    b = cu.tolist()
    for s, e in zip(b[:-1], b[1:]):
        if e > s:
            out[s:e] = torch.nn.functional.scaled_dot_product_attention(
                *(t[s:e].transpose(0, 1) for t in (q, k, v)), is_causal=True).transpose(0, 1)
    return out


@_varlen_reference.register_fake
def _(q, k, v, cu):
    return torch.empty_like(q)


def test_packed_windows_of_any_document_count_share_one_compiled_graph(monkeypatch):
    """Packed micro-batches take the varlen form even when every row holds one document, and the
    document count is traced as a symbol from the first call: one graph for the whole run (a graph
    compiled after the warm-up would cost a 7B block's compile inside the measured steps), with the
    dense-mask path's results."""
    import solotune.attention as attention
    import solotune.model as model_mod
    from torch._dynamo.utils import counters

    from solotune.data.packing import pack_window

    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **causal):
        return _varlen_reference(q, k, v, cu_q)

    model = build_model(CFG, dtype=torch.float64, seed=0)
    windows = [pack_window(_examples(lens, seed=i), row_len=64, rows_per_batch=1, pad_id=0)
               for i, lens in enumerate([[20, 30, 10], [60], [5, 7, 9, 11, 13], [63], [40, 20]])]
    assert all(b.packed for w in windows for b in w) and any(len(b.seq_lens[0]) == 1 for w in windows for b in w)
    with torch.no_grad():
        dense = [float(model(b, head=functools.partial(full_logits_loss, labels=b.labels))) for w in windows for b in w]
    monkeypatch.setattr(model_mod, "varlen_available", lambda device: True)
    monkeypatch.setattr(attention, "_varlen_fn", lambda: (fake_varlen, {}))
    monkeypatch.setattr(attention, "_FLASH_DTYPES", (torch.float64,))
    torch._dynamo.reset()
    counters.clear()
    model.compile_blocks(backend="eager")
    with torch.no_grad():
        got = [float(model(b, head=functools.partial(full_logits_loss, labels=b.labels))) for w in windows for b in w]
    assert counters["stats"]["unique_graphs"] == 1
    assert got == pytest.approx(dense, rel=1e-12)
    torch._dynamo.reset()
    whole = torch.compile(build_model(CFG, dtype=torch.float64, seed=0), backend="eager")  # a user's whole-model compile
    with torch.no_grad():
        got = [float(whole(b, head=functools.partial(full_logits_loss, labels=b.labels))) for w in windows for b in w]
    assert got == pytest.approx(dense, rel=1e-12)
    torch._dynamo.reset()
