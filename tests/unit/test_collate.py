"""Batch planning (packed first-fit, length bucketing) and the vectorised gather."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from shards import shard_table

from plm.data.collate import (
    LIST_COLUMNS,
    ColumnBlock,
    collate_windows,
    gather_batch,
    plan_bucketed,
    plan_packed,
)
from plm.model.batch import pack_sequences, sequence_index


def test_plan_packed_is_first_fit_with_a_row_budget():
    # rows of 8, budget 16 -> 2 rows per batch
    plans = plan_packed(np.array([5, 3, 4, 2, 6, 1]), row_len=8, max_tokens=16)
    assert len(plans) == 2
    p0, p1 = plans
    assert p0.samples.tolist() == [0, 1, 2, 3]
    assert p0.row.tolist() == [0, 0, 1, 1]
    assert p0.col.tolist() == [0, 5, 0, 4]
    assert p0.seg.tolist() == [1, 2, 1, 2]
    assert (p0.n_rows, p0.width, p0.packed) == (2, 8, True)
    # 6 fits no open row and the batch has no room for a third row -> next batch; 1 joins its row
    assert p1.samples.tolist() == [4, 5] and p1.row.tolist() == [0, 0] and p1.col.tolist() == [0, 6]
    assert p1.n_rows == 1


def test_plan_packed_fills_earlier_rows_first_and_orders_by_row():
    plans = plan_packed(np.array([6, 6, 2, 2]), row_len=8, max_tokens=64)
    (p,) = plans
    # 2 goes back to row 0 (first fit), the second 2 to row 1; output is row-major
    assert p.samples.tolist() == [0, 2, 1, 3]
    assert p.row.tolist() == [0, 0, 1, 1] and p.col.tolist() == [0, 6, 0, 6] and p.seg.tolist() == [1, 2, 1, 2]


def test_plan_packed_rejects_bad_input():
    with pytest.raises(ValueError, match="smaller than one packed row"):
        plan_packed(np.array([3]), row_len=8, max_tokens=7)
    with pytest.raises(ValueError, match="length <= 8"):
        plan_packed(np.array([9]), row_len=8, max_tokens=64)


@pytest.mark.parametrize("max_batch_size", [0, 3])
def test_plan_bucketed_budget_and_greedy_cut(max_batch_size):
    rng = np.random.default_rng(0)
    lens = rng.integers(1, 30, size=200)
    plans = plan_bucketed(lens, max_tokens=64, max_batch_size=max_batch_size)
    seen = np.concatenate([p.samples for p in plans])
    assert sorted(seen.tolist()) == list(range(200))  # every sequence exactly once
    prev_max = 0
    for i, p in enumerate(plans):
        L = lens[p.samples]
        assert p.width == L.max() and p.n_rows == len(L)
        assert p.n_rows * p.width <= 64
        if max_batch_size:
            assert p.n_rows <= max_batch_size
        assert L.min() >= prev_max  # shortest first without rng
        prev_max = L.max()
        if i + 1 < len(plans):  # greedy: the next sequence would break the budget or the cap
            nxt = lens[plans[i + 1].samples].min()
            assert (p.n_rows + 1) * max(nxt, p.width) > 64 or p.n_rows == max_batch_size


def test_plan_bucketed_rng_shuffles_batch_order_only():
    lens = np.random.default_rng(1).integers(1, 20, size=100)
    a = plan_bucketed(lens, 40)
    b = plan_bucketed(lens, 40, rng=np.random.default_rng(3))
    key = lambda ps: sorted(tuple(p.samples.tolist()) for p in ps)  # noqa: E731
    assert key(a) == key(b)
    assert [tuple(p.samples) for p in a] != [tuple(p.samples) for p in b]


def _table(lengths):
    users = [(f"u{i}", i, n) for i, n in enumerate(lengths)]
    return shard_table(users, "train", max_events=100, stride=50)


def test_gather_matches_the_reference_packer():
    lengths = [5, 9, 3, 12, 7, 2, 8]
    table = _table(lengths)
    block = ColumnBlock.from_table(table)
    lens = np.minimum(block.n_events.astype(np.int64), 10)
    starts = block.n_events - lens
    plans = plan_packed(lens, row_len=10, max_tokens=10 * 10)
    assert len(plans) == 1
    ours = gather_batch(block, plans[0], None, starts, lens)
    seqs = []
    for r, (s, n) in enumerate(zip(starts, lens)):
        o = block.offsets[r] + s
        seqs.append({c: torch.tensor(block.values[c][o : o + n].copy()) for c in LIST_COLUMNS})
    ref = pack_sequences(seqs, 10)
    for k in list(LIST_COLUMNS) + ["segment_ids", "positions", "attention_mask"]:
        assert torch.equal(ours[k], ref[k]), k
    # the per-sequence metadata follows the model's sequence order
    idx, n = sequence_index(ours, ours["attention_mask"])
    assert n == len(ours["user_id"]) == len(lengths)
    for j, uid in enumerate(ours["user_id"]):
        r = int(uid[1:])
        assert int((idx == j).sum()) == ours["lengths"][j] == min(lengths[r], 10)


def test_collate_windows_bucketed_right_pads_tails():
    table = _table([4, 1, 6])
    (batch,) = collate_windows(table, max_len=5, mode="bucketed")
    assert batch["ts"].shape == (3, 5)
    assert batch["user_id"] == ["u1", "u0", "u2"]  # by length
    assert batch["lengths"].tolist() == [1, 4, 5]
    assert batch["event_offset"].tolist() == [0, 0, 1]  # the most recent 5 of 6
    assert batch["attention_mask"].sum(1).tolist() == [1, 4, 5]
    assert "segment_ids" not in batch
    assert batch["positions"][2].tolist() == [0, 1, 2, 3, 4]
    assert batch["hour"][0, 1:].eq(0).all() and batch["amount_value"][0, 1:].eq(0).all()  # PAD


def test_column_block_rejects_ragged_lists():
    table = _table([3, 2])
    bad = pa.array([[1, 2, 3], [1]], pa.list_(pa.int32()))
    table = table.set_column(table.schema.get_field_index("hour"), "hour", bad)
    with pytest.raises(ValueError, match="'hour'.*list lengths"):
        ColumnBlock.from_table(table, "x.parquet")
