"""bench/prep.py's single-node reference (no Spark): same token ids and windows as the
pure-Python tokenizer path (`encode_raw`) on a tiny dirty world, sane accounting and splits."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import bench_module

from data_prep.synth import SynthConfig, generate_world, write_world
from plm.config import BinsConfig, PrepConfig, VocabConfig
from plm.data.schema import RAW_SOURCES, SPLITS
from plm.data.tokenizer import Tokenizer, encode_raw


@pytest.fixture(scope="module")
def bench():
    yield from bench_module("prep")


@pytest.fixture(scope="module")
def prepared(bench, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_prep")
    write_world(generate_world(SynthConfig(users=40, seed=3, dirty_fraction=0.05)), root / "raw")
    cfg = PrepConfig(
        raw=str(root / "raw"),
        out=str(root / "out"),
        max_events=16,
        stride=8,
        rows_per_shard=40,
        val_fraction=0.2,
        test_fraction=0.2,
        vocab=VocabConfig(min_count=2, max_size=1000, max_size_by_field={"merchant": 20}),
        bins=BinsConfig(n_bins=8, max_sample=300),  # < rows: exercises the hashed sample
    )
    stats = bench.reference_prep(root / "raw", root / "out", cfg)
    return root, cfg, stats


def _read_all(out: Path) -> pa.Table:
    files = [f for s in SPLITS for f in sorted((out / s).glob("*.parquet"))]
    return pa.concat_tables([pq.read_table(f) for f in files])


def test_reference_matches_pure_python_tokenizer(prepared):
    root, cfg, stats = prepared
    out = root / "out"
    ours = _read_all(out).sort_by([("user_id", "ascending"), ("window_index", "ascending")])
    tok = Tokenizer.load(out / "tokenizer.json")
    tables = {s: pq.read_table(root / "raw" / s) for s in RAW_SOURCES}
    py = encode_raw(
        tables, tok, cutoff=stats["cutoff"], ts_min=stats["ts_window"]["min"], ts_max=stats["ts_window"]["max"],
        max_events=cfg.max_events, stride=cfg.stride,
    )
    assert ours.num_rows == py.num_rows > 40  # several windows per user
    assert ours.column_names == stats["shard_columns"] == [py.column_names[0], "split", *py.column_names[1:]]
    for name in py.column_names:
        assert ours.column(name).combine_chunks().equals(py.column(name).combine_chunks()), name


def test_reference_accounting_splits_and_shards(bench, prepared):
    root, cfg, stats = prepared
    for source, acc in stats["accounting"].items():
        assert acc["input_rows"] == acc["kept_rows"] + acc["quarantined_total"] + acc["duplicate_rows"], source
        assert acc["quarantined_total"] > 0 and acc["duplicate_rows"] > 0  # the dirty rows were caught
        q = pq.read_table(root / "out" / "quarantine" / source)
        assert q.num_rows == acc["quarantined_total"] and "device_id" not in q.column_names
    table = _read_all(root / "out")
    users = table.column("user_id").to_pylist()
    split_of = dict(zip(users, table.column("split").to_pylist()))
    assert len(split_of) == sum(s["users"] for s in stats["splits"].values()) == 40
    assert sum(s["events"] for s in stats["splits"].values()) == sum(
        a["sequence_rows"] for a in stats["accounting"].values()
    )
    for split in SPLITS:
        st = stats["splits"][split]
        assert st["windows"] == sum(sh["rows"] for sh in st["shards"])
        assert st["users"] == sum(1 for s in split_of.values() if s == split)
        assert all(sh["rows"] <= cfg.rows_per_shard for sh in st["shards"])
    assert stats["vocab_sizes"]["merchant"] <= 5 + 20


def test_split_hash_is_sparks_xxhash64(bench):
    pytest.importorskip("xxhash")
    # pmod(xxhash64('plm-split-v1', user_id), 1e6) as computed by Spark 4 for these ids
    buckets, name = bench.split_buckets(["u000001", "u013999", "é-ü", "", "abc"], "plm-split-v1")
    assert name.startswith("xxhash64")
    np.testing.assert_array_equal(np.round(buckets * 1e6), [695474, 302810, 781905, 146864, 615067])
    codes = bench.split_codes(np.array([0.05, 0.15, 0.25, 0.999]), val_fraction=0.1, test_fraction=0.1)
    assert [SPLITS[c] for c in codes] == ["test", "val", "train", "train"]
