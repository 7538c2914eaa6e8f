"""The streaming dataset: sharding over ranks x workers, samples, batches, determinism."""

from __future__ import annotations

import collections
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from shards import read_windows, write_prepared
from torch.utils.data import DataLoader

from plm.data.collate import ID_COLUMNS, LIST_COLUMNS, VALUE_COLUMNS
from plm.data.dataset import PLMStream, SplitIndex
from plm.model.batch import sequence_index

MAX_LEN = 12
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return write_prepared(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="module")
def windows(prepared):
    return read_windows(prepared, "train")


def open_index(root, split="train"):
    man = json.loads((root / "manifest.json").read_text())
    return SplitIndex.open([(str(root / s["path"]), s["rows"]) for s in man["splits"][split]["shards"]])


@pytest.fixture(scope="module")
def index(prepared):
    return open_index(prepared)


def stream(index, **kw):
    kw.setdefault("max_len", MAX_LEN)
    kw.setdefault("max_tokens", MAX_TOKENS)
    kw.setdefault("shuffle_buffer", 16)
    kw.setdefault("seed", 5)
    return PLMStream(index, **kw)


def sequences(batch, windows, max_len=MAX_LEN, max_tokens=MAX_TOKENS):
    """Check one batch against the contract and its sources; return (user, window, offset, len)."""
    B, T = batch["ts"].shape
    assert B * T <= max_tokens
    for c in ID_COLUMNS:
        assert batch[c].shape == (B, T) and batch[c].dtype == torch.int32
    for c in VALUE_COLUMNS:
        assert batch[c].dtype == torch.float32
    assert batch["ts"].dtype == torch.int64 and batch["attention_mask"].dtype == torch.bool
    mask, pos = batch["attention_mask"], batch["positions"]
    packed = "segment_ids" in batch
    spans = []  # (row, col, len) of each sequence in output order
    if packed:
        seg = batch["segment_ids"]
        assert torch.equal(mask, seg != 0)
        for r in range(B):
            row = seg[r].tolist()
            k = max(row)
            n_real = sum(1 for x in row if x)
            assert all(x == 0 for x in row[n_real:]), "padding only at the row end"
            assert row[:n_real] == sorted(row[:n_real]), "segments laid out in order"
            assert sorted(set(row[:n_real])) == list(range(1, k + 1)), "segment ids 1..k, contiguous"
            for s in range(1, k + 1):
                cols = [i for i, x in enumerate(row) if x == s]
                assert cols == list(range(cols[0], cols[0] + len(cols)))
                spans.append((r, cols[0], len(cols)))
    else:
        lens = mask.sum(1).tolist()
        for r in range(B):
            assert mask[r, : lens[r]].all() and not mask[r, lens[r] :].any(), "right padding"
            spans.append((r, 0, lens[r]))
        assert T == max(lens)
    N = len(spans)
    assert len(batch["user_id"]) == N and batch["lengths"].shape == (N,)
    idx, n = sequence_index(batch, mask)
    assert n == N
    out = []
    for j, (r, c0, L) in enumerate(spans):
        assert torch.equal(pos[r, c0 : c0 + L], torch.arange(L)), "positions restart at 0"
        assert (idx[r, c0 : c0 + L] == j).all()
        assert batch["lengths"][j] == L and 1 <= L <= max_len
        uid, wi, off = batch["user_id"][j], int(batch["window_index"][j]), int(batch["event_offset"][j])
        src = windows[(uid, wi)]
        assert 0 <= off and off + L <= src["n_events"]
        for col in LIST_COLUMNS:  # a contiguous slice of the source window, every field
            want = torch.tensor(src[col][off : off + L], dtype=batch[col].dtype)
            assert torch.equal(batch[col][r, c0 : c0 + L], want), col
        out.append((uid, wi, off, L))
    pad = ~mask
    for col in LIST_COLUMNS:
        assert (batch[col][pad] == 0).all()
    return out


def collect(st, epoch, n_consumers, consumers=None, windows=None):
    seen, n_batches = [], []
    for c in consumers if consumers is not None else range(n_consumers):
        k = 0
        for b in st.iter_consumer(epoch, c, n_consumers):
            seen += sequences(b, windows) if windows is not None else list(zip(b["user_id"], b["window_index"].tolist()))
            k += 1
        n_batches.append(k)
    return seen, n_batches


# ------------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("batch_mode", ["packed", "bucketed"])
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_window_once_per_epoch_across_ranks_and_workers(index, windows, world_size, num_workers, batch_mode):
    st = stream(index, batch_mode=batch_mode)
    C = world_size * max(1, num_workers)
    for epoch in (0, 1):
        seen = []
        for rank in range(world_size):
            for w in range(max(1, num_workers)):
                c = rank * max(1, num_workers) + w
                got, (n,) = collect(st, epoch, C, [c], windows if epoch == 0 else None)
                assert n == st.natural_count(epoch, c, C)
                seen += [(u, wi) for u, wi, *_ in got]
        counts = collections.Counter(seen)
        assert set(counts) == set(windows), "no window lost"
        assert max(counts.values()) == 1, "no window twice"


def test_consumers_get_balanced_contiguous_slices(index):
    st = stream(index)
    order = st.epoch_order(3)
    assert sorted(order.tolist()) == list(range(index.n_windows))
    parts = [st.consumer_rows(3, c, 5) for c in range(5)]
    assert np.array_equal(np.concatenate(parts), order)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    # more consumers than row groups: units are split at row level
    assert len(index.units) < 40 and all(len(st.consumer_rows(0, c, 40)) >= 4 for c in range(40))


def test_real_dataloader_workers_and_explicit_ranks(index, windows):
    seen = []
    for rank in range(2):
        st = stream(index, rank=rank, world_size=2)
        st.set_epoch(1)
        for b in DataLoader(st, batch_size=None, num_workers=2):
            seen += list(zip(b["user_id"], b["window_index"].tolist()))
    counts = collections.Counter(seen)
    assert set(counts) == set(windows) and max(counts.values()) == 1


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (3, 2)])
def test_eval_is_the_tail_of_window_0_once_per_user(index, windows, world_size, num_workers):
    st = stream(index, mode="eval")
    assert not st.shuffle
    C = world_size * max(1, num_workers)
    got, _ = collect(st, 0, C, windows=windows)
    users = sorted({u for u, _ in windows})
    assert sorted(u for u, *_ in got) == users, "each user exactly once"
    for uid, wi, off, L in got:
        n = windows[(uid, 0)]["n_events"]
        assert wi == 0 and L == min(n, MAX_LEN) and off == n - L


# -------------------------------------------------------------------------------- samples


def spans_by_window(st, epoch):
    got, _ = collect(st, epoch, 1)
    out = {}
    for b in st.iter_consumer(epoch, 0, 1):
        for u, wi, off, L in zip(b["user_id"], b["window_index"].tolist(), b["event_offset"].tolist(), b["lengths"].tolist()):
            out[(u, wi)] = (off, L)
    return out


def test_random_subwindows_are_random_contiguous_and_capped(index, windows):
    st = stream(index, subwindow="random")
    e0, e1 = spans_by_window(st, 0), spans_by_window(st, 1)
    long = [k for k in windows if windows[k]["n_events"] > MAX_LEN]
    assert len(long) > 20
    for k, (off, L) in e0.items():
        n = windows[k]["n_events"]
        assert L == min(n, MAX_LEN) and 0 <= off <= n - L
    offs = [e0[k][0] for k in long]
    assert len(set(offs)) > 2 and any(o != windows[k]["n_events"] - MAX_LEN for o, k in zip(offs, long))
    assert sum(e0[k] != e1[k] for k in long) > len(long) // 2, "a new draw every epoch"
    # the draw depends on (seed, epoch, window), not on which rank/worker reads the window
    spread = {}
    for c in range(3):
        for b in st.iter_consumer(0, c, 3):
            for u, wi, off in zip(b["user_id"], b["window_index"].tolist(), b["event_offset"].tolist()):
                spread[(u, wi)] = off
    assert spread == {k: v[0] for k, v in e0.items()}


def test_tail_and_random_length_subwindows(index, windows):
    for k, (off, L) in spans_by_window(stream(index, subwindow="tail"), 0).items():
        n = windows[k]["n_events"]
        assert (off, L) == (n - min(n, MAX_LEN), min(n, MAX_LEN))
    spans = spans_by_window(stream(index, subwindow="random_length", min_len=4), 0)
    lens = []
    for k, (off, L) in spans.items():
        n = windows[k]["n_events"]
        cap = min(n, MAX_LEN)
        assert min(4, cap) <= L <= cap and 0 <= off <= n - L
        lens.append(L)
    assert len(set(lens)) > 5


# ------------------------------------------------------------------------------ determinism


def signature(st, epoch, consumer=0, n_consumers=1):
    return [
        (tuple(b["user_id"]), tuple(b["event_offset"].tolist()), int(b["ts"].sum()))
        for b in st.iter_consumer(epoch, consumer, n_consumers)
    ]


@pytest.mark.parametrize("batch_mode", ["packed", "bucketed"])
def test_same_seed_same_batches_other_seed_or_epoch_other_order(index, batch_mode):
    a = signature(stream(index, batch_mode=batch_mode, seed=1), 0, 1, 2)
    assert a == signature(stream(index, batch_mode=batch_mode, seed=1), 0, 1, 2)
    assert a != signature(stream(index, batch_mode=batch_mode, seed=2), 0, 1, 2)
    assert a != signature(stream(index, batch_mode=batch_mode, seed=1), 1, 1, 2)
    # without shuffling, epochs and seeds do not matter
    ev = stream(index, mode="eval", batch_mode=batch_mode, seed=1)
    assert signature(ev, 0) == signature(ev, 4) == signature(stream(index, mode="eval", batch_mode=batch_mode, seed=9), 0)


def test_skip_is_a_suffix_of_the_full_stream(index):
    st = stream(index, shuffle_buffer=8)
    full = signature(st, 2, 1, 2)
    for skip in (0, 1, 5, len(full) - 1, len(full)):
        part = [
            (tuple(b["user_id"]), tuple(b["event_offset"].tolist()), int(b["ts"].sum()))
            for b in st.iter_consumer(2, 1, 2, skip=skip)
        ]
        assert part == full[skip:]


# ---------------------------------------------------------------------------- even batches


def test_even_batches_drop_and_pad(index, windows):
    C = 4
    natural = [stream(index).natural_count(0, c, C) for c in range(C)]
    assert len(set(natural)) > 1, "the fixture should give uneven consumers"

    drop = stream(index, even_batches="drop")
    _, n = collect(drop, 0, C)
    assert n == [min(natural)] * C

    pad = stream(index, even_batches="pad")
    seen, reps = [], 0
    for c in range(C):
        bs = list(pad.iter_consumer(0, c, C))
        assert len(bs) == max(natural)
        assert [b["repeat"] for b in bs] == [False] * natural[c] + [True] * (max(natural) - natural[c])
        for b in bs:
            if b["repeat"]:
                reps += 1
            else:
                seen += list(zip(b["user_id"], b["window_index"].tolist()))
    assert reps == sum(max(natural) - x for x in natural)
    assert collections.Counter(seen) == collections.Counter(windows.keys())
    assert stream(index, even_batches="auto", rank=1, world_size=2).even_mode() == "drop"
    assert stream(index, even_batches="auto", rank=0, world_size=1).even_mode() == "off"


def test_pad_or_drop_with_an_empty_consumer_is_an_error(index):
    st = stream(index, even_batches="pad")
    with pytest.raises(ValueError, match="has no windows"):
        st.target_count(0, index.n_windows + 1)
    # drop: every consumer would have dropped all of its batches (an empty epoch, silently)
    st = stream(index, even_batches="drop")
    with pytest.raises(ValueError, match="even_batches='drop': a consumer has no windows"):
        st.target_count(0, index.n_windows + 1)


# ----------------------------------------------------------------------------------- index


def test_index_checks_rows_files_and_columns(prepared, tmp_path):
    man = json.loads((prepared / "manifest.json").read_text())
    s = man["splits"]["train"]["shards"][0]
    with pytest.raises(ValueError, match=r"part-00000.parquet has \d+ rows but manifest.json says 1"):
        SplitIndex.open([(str(prepared / s["path"]), 1)])
    with pytest.raises(FileNotFoundError, match="nope.parquet listed in the manifest does not exist"):
        SplitIndex.open([(str(tmp_path / "nope.parquet"), None)])
    t = pq.read_table(prepared / s["path"]).drop_columns(["merchant"])
    pq.write_table(t, tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad.parquet lacks the shard columns \['merchant'\]"):
        SplitIndex.open([(str(tmp_path / "bad.parquet"), None)])
    # URIs: every shard's own (the second one kept the first one's scheme-less path rule)
    shards = man["splits"]["train"]["shards"]
    assert len(shards) > 1
    uris = SplitIndex.open([("file://" + str(prepared / x["path"]), x["rows"]) for x in shards])
    assert uris.n_windows == SplitIndex.open([(str(prepared / x["path"]), x["rows"]) for x in shards]).n_windows


def test_bad_arguments_are_named(index):
    with pytest.raises(ValueError, match="batch_mode"):
        stream(index, batch_mode="sorted")
    with pytest.raises(ValueError, match="max_tokens=8 must be >= max_len=12"):
        stream(index, max_tokens=8)
    with pytest.raises(ValueError, match="rank=2 is not in"):
        stream(index, rank=2, world_size=2)
