"""Batch -> model: the attention form comes from the batch. Packed rows (several documents,
positions restarting, block-diagonal causal attention) equal the same documents padded one per
row: logits, loss and gradients, in float64."""

from __future__ import annotations

import functools

import torch

from solotune.config import ModelConfig
from solotune.data import IGNORE_INDEX, Example
from solotune.data.batch import Batch, collate_batch, empty_batch, positions_for
from solotune.model import build_model
from solotune.train.loss import full_logits_loss

CFG = ModelConfig(name="tiny-batch", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=64,
                  max_seq_len=64)


def _examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 64, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (n // 3) + ids[n // 3:]  # a prompt part, then targets
        out.append(Example(ids, labels))
    return out


def _packed(examples, T):
    """All examples back to back in one row of T tokens (what padding-free packing will build)."""
    ids = torch.zeros(1, T, dtype=torch.long)
    labels = torch.full((1, T), IGNORE_INDEX, dtype=torch.long)
    start = 0
    for e in examples:
        n = len(e.input_ids)
        ids[0, start:start + n] = torch.tensor(e.input_ids)
        # The first token of a document is never a target of the previous one (its label is masked).
        labels[0, start:start + n] = torch.tensor([IGNORE_INDEX] + e.labels[1:])
        start += n
    seq_lens = (tuple(len(e.input_ids) for e in examples),)
    return Batch(ids, labels, positions_for(seq_lens, T), seq_lens)


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(batch, head=functools.partial(full_logits_loss, labels=batch.labels))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_collated_batch_fields():
    ex = _examples([5, 9, 3])
    b = collate_batch(ex, pad_id=0)
    assert b.shape == (3, 9) and b.seq_lens == ((5,), (9,), (3,)) and not b.packed
    assert b.num_tokens == 17 and b.num_targets == sum(e.num_targets for e in ex)
    assert torch.equal(b.positions, torch.arange(9).expand(3, 9))
    assert b.cu_seqlens().tolist() == [0, 5, 9, 18, 21, 27]  # rows of 9: each row's padding is its own segment
    e = empty_batch(pad_id=0)
    assert e.num_tokens == 0 and e.num_targets == 0


def test_packed_row_equals_padded_rows_in_float64():
    model = build_model(CFG, seed=0).double()
    ex = _examples([7, 12, 5])
    padded = collate_batch(ex, pad_id=0)
    packed = _packed(ex, T=28)  # 24 tokens + 4 padding
    assert packed.packed and packed.positions[0, 7].item() == 0 and packed.positions[0, 19].item() == 0
    assert packed.num_targets == padded.num_targets
    with torch.no_grad():
        rows, one = model(padded), model(packed)
    start = 0
    for r, e in enumerate(ex):
        n = len(e.input_ids)
        torch.testing.assert_close(one[0, start:start + n], rows[r, :n], rtol=0, atol=1e-12)
        start += n
    loss_a, grads_a = _loss_and_grads(model, padded)
    loss_b, grads_b = _loss_and_grads(model, packed)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-12, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-9, atol=1e-12)


def test_attention_does_not_cross_documents():
    """Changing the first document leaves the second's outputs unchanged in a packed row."""
    model = build_model(CFG, seed=1).double()
    ex = _examples([6, 8])
    other = _examples([6], seed=5) + ex[1:]
    with torch.no_grad():
        a, b = model(_packed(ex, 16)), model(_packed(other, 16))
    assert not torch.allclose(a[0, :6], b[0, :6])
    torch.testing.assert_close(a[0, 6:14], b[0, 6:14], rtol=0, atol=0)
