"""data="random": seeded fixed-length rows, every position a target, the same through the loop's
inputs and through the bench's reference cells."""

from __future__ import annotations

import pytest

from solotune.data.synthetic import RANDOM, RandomTokens, random_row
from solotune.train.config import TrainConfig
from solotune.train.inputs import check_data, load_data


class _Tok:
    vocab_size = 50


def test_rows_are_fixed_length_all_targets_and_a_function_of_seed_and_index():
    a = random_row(3, 16, 50, seed=1)
    assert len(a.input_ids) == 16 and a.labels == a.input_ids and not a.truncated
    assert all(0 <= t < 50 for t in a.input_ids)
    assert random_row(3, 16, 50, seed=1) == a
    assert random_row(4, 16, 50, seed=1) != a and random_row(3, 16, 50, seed=2) != a
    with pytest.raises(ValueError):
        random_row(0, 1, 50)


def test_the_loop_inputs_build_the_rows_the_reference_cells_read():
    cfg = TrainConfig(model="tiny", data=RANDOM, max_seq_len=24, train_range=(0, 6), max_samples=5, val_samples=2,
                      seed=7)
    split = check_data(cfg)  # nothing to read
    train, val = load_data(cfg, _Tok(), say=lambda *_: None, records=split)
    same = RandomTokens(range(5), 24, 50, seed=7)
    assert [e.input_ids for e in train] == [e.input_ids for e in same]
    assert train.num_tokens == 5 * 24 and train.num_target_tokens == 5 * 23 and train.num_truncated == 0
    assert len(val) == 2 and list(val.indices) == [400, 401]  # the sample's default validation rows
    assert {tuple(e.input_ids) for e in val}.isdisjoint({tuple(e.input_ids) for e in train})
