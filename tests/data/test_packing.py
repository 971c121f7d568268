"""Padding-free packing: a window's examples packed into fixed rows give the padded window's loss
and gradients (float64), rows never overflow, and the packing is deterministic."""

from __future__ import annotations

import functools

import pytest
import torch

from solotune.data import IGNORE_INDEX, Example
from solotune.data.batch import collate_batch
from solotune.data.packing import pack_rows, pack_window
from solotune.model import build_model
from solotune.train.loss import full_logits_loss

from test_batch import CFG, _examples  # the same tiny model and examples as the Batch tests


def _window_grads(model, batches):
    """The training step's loss: sum over micro-batches / the window's target count."""
    model.zero_grad()
    n_targets = sum(b.num_targets for b in batches)
    total = 0.0
    for b in batches:
        loss = model(b, head=functools.partial(full_logits_loss, labels=b.labels))
        (loss / n_targets).backward()
        total += float(loss)
    return total / n_targets, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_rows_never_overflow_and_hold_every_example_once():
    lengths = [30, 5, 17, 24, 8, 8, 31, 2, 12]
    rows = pack_rows(lengths, 32)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 32 for r in rows)
    assert len(rows) <= 5  # 137 tokens: first-fit decreasing uses ceil(137 / 32) = 5 rows here
    assert rows == pack_rows(lengths, 32)  # deterministic
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([33], 32)


def test_packed_window_equals_padded_window_fp64():
    model = build_model(CFG, dtype=torch.float64, seed=0)
    ex = _examples([11, 3, 20, 7, 16, 9, 5, 14])
    padded = [collate_batch(ex[i:i + 2], pad_id=0) for i in range(0, 8, 2)]  # 4 micro-batches of 2
    packed = pack_window(ex, row_len=24, rows_per_batch=2, pad_id=0)
    assert sum(b.num_tokens for b in packed) == sum(len(e.input_ids) for e in ex)
    assert sum(b.num_targets for b in packed) == sum(b.num_targets for b in padded)
    assert any(b.packed for b in packed) and len(packed) < len(padded)
    assert all(b.shape[1] == 24 for b in packed)  # fixed rows: one compiled shape
    loss_pad, g_pad = _window_grads(model, padded)
    loss_pack, g_pack = _window_grads(model, packed)
    assert loss_pack == pytest.approx(loss_pad, rel=1e-12)
    for name in g_pad:
        torch.testing.assert_close(g_pack[name], g_pad[name], rtol=1e-10, atol=1e-12, msg=name)


def test_a_documents_first_label_is_never_a_target():
    """The previous document's last token must not learn the next one's first token."""
    ex = [Example([5, 6, 7], [5, 6, 7]), Example([8, 9], [8, 9])]
    b = pack_window(ex, row_len=8, rows_per_batch=1, pad_id=0)[0]
    assert b.seq_lens == ((3, 2),)
    assert b.labels[0].tolist() == [IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9] + [IGNORE_INDEX] * 3
    assert b.positions[0, :5].tolist() == [0, 1, 2, 0, 1]
    assert b.num_targets == 3  # 6, 7, 9: the same as the two padded rows
    assert collate_batch(ex, pad_id=0).num_targets == 3


def test_varlen_dense_fallback_equals_the_document_mask():
    """Without flash (fp64 here), the varlen form falls back to the exact block-diagonal mask."""
    from solotune.attention import Varlen
    import solotune.model as m

    model = build_model(CFG, dtype=torch.float64, seed=0)
    packed = pack_window(_examples([11, 3, 20, 7, 16]), row_len=24, rows_per_batch=3, pad_id=0)
    ref, g_ref = _window_grads(model, packed)
    orig = m.packed_attention
    m.packed_attention = lambda batch, device: Varlen(batch.cu_seqlens(), batch.input_ids.shape[1])
    try:
        got, g_got = _window_grads(model, packed)
    finally:
        m.packed_attention = orig
    assert got == pytest.approx(ref, rel=1e-12)
    for name in g_ref:
        torch.testing.assert_close(g_got[name], g_ref[name], rtol=1e-10, atol=1e-12, msg=name)


def test_packed_rows_take_the_packed_attention_form_unless_each_row_is_one_full_document():
    from solotune.data.packing import pack_window

    one_doc_padded = pack_window([Example([5] * 10, [5] * 10)], row_len=16, rows_per_batch=1, pad_id=0)[0]
    assert one_doc_padded.seq_lens == ((10,),) and one_doc_padded.packed
    full = pack_window([Example([5] * 16, [5] * 16)] * 2, row_len=16, rows_per_batch=2, pad_id=0)[0]
    assert full.seq_lens == ((16,), (16,)) and not full.packed  # fixed-length rows: plain causal
