"""PLMDataModule, the resumable PLMDataLoader, the data-wait timer and the error messages."""

from __future__ import annotations

import collections
import json
import time

import pytest
import torch
from shards import history_lengths, read_windows, write_prepared

from plm.data.datamodule import (
    DataConfig,
    LoaderTimer,
    PLMDataLoader,
    PLMDataModule,
    consumed_per_worker,
    interleave,
)

SMALL = dict(max_len=12, max_tokens=48, shuffle_buffer=64, seed=5)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return write_prepared(tmp_path_factory.mktemp("prepared"))


def dm(prepared, **kw):
    return PLMDataModule(str(prepared), **{**SMALL, **kw})


def sig(b):
    return (tuple(b["user_id"]), tuple(b["event_offset"].tolist()), int(b["ts"].sum()), b["repeat"])


def take(it, n):
    out = []
    for _ in range(n):
        try:
            out.append(sig(next(it)))
        except StopIteration:
            break
    return out


# ------------------------------------------------------------------------------ datamodule


def test_datamodule_reads_manifest_and_tokenizer(prepared):
    d = dm(prepared)
    from plm.data.tokenizer import Tokenizer

    assert d.vocab_sizes == Tokenizer.load(prepared / "tokenizer.json").vocab_sizes()
    assert d.numeric_fields == ("amount", "n_items", "log_dt", "device_age")
    assert d.config.max_len == 12 and d.config.batch_mode == "packed"
    train = d.train_dataloader()
    n = len(train)
    batches = list(train)
    assert len(batches) == n > 0
    windows = read_windows(prepared, "train")
    seen = collections.Counter((u, w) for b in batches for u, w in zip(b["user_id"], b["window_index"].tolist()))
    assert set(seen) == set(windows) and max(seen.values()) == 1
    val_users = sorted({u for u, _ in read_windows(prepared, "val")})
    assert sorted(u for b in d.val_dataloader() for u in b["user_id"]) == val_users


def test_predict_each_user_once_rank_sharded_deterministic(prepared):
    users = sorted({u for sp in ("train", "val") for u, _ in read_windows(prepared, sp)})
    with pytest.warns(UserWarning, match="split 'test' has no shards; skipped"):
        one = [u for b in dm(prepared, batch_mode="bucketed").predict_dataloader() for u in b["user_id"]]
    assert sorted(one) == users
    per_rank = []
    for rank in range(2):
        with pytest.warns(UserWarning):
            loader = dm(prepared, rank=rank, world_size=2, num_workers=0).predict_dataloader()
        a = [u for b in loader for u in b["user_id"]]
        assert a == [u for b in loader for u in b["user_id"]], "same order every time"
        per_rank.append(a)
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == users


def test_errors_name_the_problem(prepared, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PLMDataModule(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="manifest.json not found.*written by plm-prep"):
        PLMDataModule(str(tmp_path / "empty"))
    old = write_prepared(tmp_path / "old", format_version="0.9")
    with pytest.raises(ValueError, match=r"format_version '0.9' is not supported .*'1.1'"):
        PLMDataModule(str(old))
    d = dm(prepared)
    with pytest.raises(ValueError, match=r"split 'test' has no shards \(0 windows\).*\(plm-export: splits= without it\)"):
        d.test_dataloader()
    no_val = write_prepared(tmp_path / "no_val", {"train": history_lengths(5, 0), "val": [], "test": []})
    with pytest.raises(ValueError, match=r"split 'val' has no shards.*trainer.limit_val_batches=0 trains without validation"):
        dm(no_val).val_dataloader()
    with pytest.raises(ValueError, match="batch_mode='sorted'"):
        dm(prepared, batch_mode="sorted")
    with pytest.raises(TypeError, match="unknown DataConfig fields \\['max_length'\\]"):
        dm(prepared, max_length=3)
    with pytest.raises(ValueError, match="DataConfig.path is not set"):
        PLMDataModule(config=DataConfig())
    with pytest.raises(ValueError, match="max_tokens=8 is smaller than one sequence"):
        dm(prepared, max_tokens=8)
    with pytest.raises(ValueError, match="max_batch_size=2 caps bucketed batches"):
        dm(prepared, batch_mode="packed", max_batch_size=2)
    assert dm(prepared, batch_mode="bucketed", max_batch_size=2).config.max_batch_size == 2
    notok = write_prepared(tmp_path / "notok")
    (notok / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json not found"):
        PLMDataModule(str(notok))


# ---------------------------------------------------------------------------------- resume


def test_interleave_and_consumed_per_worker():
    assert interleave([2, 3, 1]) == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (1, 2)]
    assert consumed_per_worker([2, 3, 1], 4) == [2, 1, 1]
    assert consumed_per_worker([2, 3, 1], 6) == [2, 3, 1]
    assert consumed_per_worker([0, 2], 1) == [0, 1]


@pytest.mark.parametrize(
    "num_workers,even,ks",
    [
        (0, "off", [0, 1, 7, "len", "len+3"]),
        (2, "off", [3, "exhausted"]),
        (0, "pad", [5, "len+1", "len+2"]),
    ],
)
def test_resume_gives_the_same_batches(prepared, num_workers, even, ks):
    kw = dict(num_workers=num_workers, even_batches=even, batch_mode="bucketed" if even == "pad" else "packed")
    ref_loader = dm(prepared, **kw).train_dataloader()
    n0 = len(ref_loader)
    counts = ref_loader.counts()
    ref = [sig(b) for b in ref_loader]  # epoch 0
    assert ref_loader.state_dict()["epoch"] == 1 and ref_loader.state_dict()["batches"] == 0
    ref += [sig(b) for b in ref_loader]  # epoch 1
    assert ref[:n0] != ref[n0:], "epochs are shuffled differently"
    for k in ks:
        if k == "len":
            k = n0
        elif k == "len+3":
            k = n0 + 3
        elif k == "len+1":
            k = n0 + 1
        elif k == "len+2":
            k = n0 + 2
        elif k == "exhausted":  # one worker has no batch left at the resume point
            assert counts[0] != counts[1]
            k = 2 * min(counts)
        first = dm(prepared, **kw).train_dataloader()
        it = iter(first)
        got = take(it, min(k, n0))
        if k > n0:
            it = iter(first)  # the next epoch
            got += take(it, k - n0)
        state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
        resumed = dm(prepared, **kw).train_dataloader()
        resumed.load_state_dict(state)
        rest = [sig(b) for b in resumed]  # the rest of the epoch of the resume point
        if len(got) + len(rest) < len(ref):
            rest += [sig(b) for b in resumed]  # then the next epoch
        assert got + rest == ref, f"k={k}"


def test_abandoned_iterator_is_continued(prepared):
    loader = dm(prepared).train_dataloader()
    ref = [sig(b) for b in dm(prepared).train_dataloader()]
    a = take(iter(loader), 4)
    b = [sig(x) for x in loader]
    assert a + b == ref
    assert loader.state_dict()["epoch"] == 1


def test_resume_refuses_a_different_layout(prepared):
    state = dm(prepared).train_dataloader().state_dict()
    with pytest.raises(ValueError, match="num_workers 0 -> 2"):
        dm(prepared, num_workers=2).train_dataloader().load_state_dict(state)
    with pytest.raises(ValueError, match="seed 5 -> 6"):
        dm(prepared, seed=6).train_dataloader().load_state_dict(state)


def test_workers_output_in_canonical_order(prepared):
    d = dm(prepared, num_workers=2, shuffle_buffer=16)
    loader = d.train_dataloader()
    stream = loader.dataset
    per_worker = [[sig(b) for b in stream.iter_consumer(0, w, 2)] for w in range(2)]
    expect = [per_worker[w][i] for w, i in interleave([len(x) for x in per_worker])]
    assert [sig(b) for b in loader] == expect


# ----------------------------------------------------------------------------------- timer


def test_loader_timer_measures_wait_share():
    t = LoaderTimer()

    class Slow:
        def __iter__(self):
            for i in range(6):
                time.sleep(0.01)  # data wait
                yield i

    from plm.data.datamodule import _LoaderIter  # noqa: F401  (the timer is fed the same way)

    t._start_iter()
    it = iter(Slow())
    for _ in range(6):
        t0 = time.perf_counter()
        next(it)
        t._record(t0, time.perf_counter())
        time.sleep(0.01)  # the "training step"
    s = t.summary(reset=True)
    assert s["batches"] == 5 and s["startup_s"] >= 0.009
    assert 0.3 < s["data_wait_fraction"] < 0.7
    assert s["step_s"] >= 5 * 0.02 * 0.9
    assert t.batches == 0 and t.fraction == 0.0


def test_loader_feeds_its_timer(prepared):
    d = dm(prepared)
    loader = d.train_dataloader()
    assert isinstance(loader, PLMDataLoader) and loader.timer is d.timer
    n = len(loader)
    for _ in loader:
        pass
    assert d.timer.batches == n - 1 and d.timer.wait_s > 0 and d.timer.step_s >= d.timer.wait_s


# ------------------------------------------------------------------------------------ model


def test_batches_run_through_the_encoder_packed_equals_bucketed(prepared):
    from plm.model.config import AttentionConfig, ModelConfig, PositionConfig
    from plm.model.model import PLMEncoder

    torch.manual_seed(0)
    d = dm(prepared, eval_max_len=12)
    cfg = ModelConfig(d_model=32, n_layers=2, attention=AttentionConfig(n_heads=4), position=PositionConfig())
    enc = PLMEncoder(cfg, d.vocab_sizes, d.numeric_fields).eval()
    pooled = {}
    for mode in ("packed", "bucketed"):
        loader = dm(prepared, batch_mode=mode).val_dataloader()
        with torch.no_grad():
            for b in loader:
                out = enc(b)
                assert out.pooled.shape == (len(b["user_id"]), 32)
                for u, v in zip(b["user_id"], out.pooled):
                    pooled.setdefault(u, []).append(v)
    assert all(len(v) == 2 for v in pooled.values())
    for a, b in pooled.values():
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_the_export_agreement_sample_spans_every_history_length(tmp_path):
    """plm-export checks int8 / compiled / ONNX agreement on a sample of users: predict batches
    are bucketed shortest first within each block, so the first batches held only the shortest
    histories; the sample now spans the block's lengths, its longest batch included."""
    from plm.export.run import _sample_batches

    lengths = [1 + (7 * u) % 48 for u in range(120)]  # 1..48 events, mixed order
    prep = write_prepared(tmp_path / "p", {"train": lengths, "val": [], "test": []}, max_events=48, stride=48)
    data = PLMDataModule(str(prep), max_len=48, batch_mode="bucketed", max_tokens=96, shuffle_buffer=200, seed=0,
                         predict_splits="train")
    everyone = [int(n) for b in data.predict_dataloader() for n in b["lengths"]]
    assert max(everyone) == 48 and min(everyone) == 1
    sample = _sample_batches(data, 24)
    got = [int(n) for b in sample for n in b["lengths"]]
    assert max(got) == 48 and min(got) == 1  # both ends of the block (the first batches alone: 1..2)
    assert len(set(got)) >= 6 and len(got) <= 24 + len(sample)  # spread, about the asked number
    for b in sample:  # each kept batch cut consistently: one row per user in every per-user field
        assert len(b["user_id"]) == b["lengths"].shape[0] == b["attention_mask"].shape[0]
    # a cap on batches (plm-eval's next_max_batches): evenly spaced, the longest included
    from plm.data.datamodule import spread_sample

    three = spread_sample(data.predict_dataloader(), 200, n_batches=3)
    assert len(three) == 3 and int(three[0]["lengths"].min()) == 1 and int(three[-1]["lengths"].max()) == 48


def test_eval_streams_take_min_len_only_up_to_their_length(prepared):
    """min_len bounds training sub-windows; with eval_max_len below it the validation and predict
    loaders failed ("min_len=8 must be in [1, max_len=4]") after training had been set up."""
    data = PLMDataModule(str(prepared), max_len=16, eval_max_len=4, min_len=8, max_tokens=64,
                         subwindow="random_length", predict_splits="train")
    assert len(data.train_dataloader()) > 0
    assert max(int(n) for b in data.val_dataloader() for n in b["lengths"]) == 4
    assert sum(len(b["user_id"]) for b in data.predict_dataloader()) > 0


def test_predict_with_fewer_users_than_processes_is_named(tmp_path):
    """Every process gets a share of the users: with fewer users than processes x workers some
    would get none (Lightning refuses an empty predict loader deep in the loop); every rank stops
    with the same message instead."""
    prep = write_prepared(tmp_path / "p", {"train": [5], "val": [], "test": []})
    for rank in (0, 1):
        data = PLMDataModule(str(prep), max_len=8, batch_mode="bucketed", max_tokens=64, rank=rank, world_size=2,
                             predict_splits="train")
        with pytest.raises(ValueError, match=r"predict: 1 user\(s\) for 2 process\(es\) x 1 loader worker"):
            data.predict_dataloader()
    one = PLMDataModule(str(prep), max_len=8, batch_mode="bucketed", max_tokens=64, predict_splits="train")
    assert len([u for b in one.predict_dataloader() for u in b["user_id"]]) == 1
