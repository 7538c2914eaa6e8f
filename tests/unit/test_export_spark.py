"""plm.export.spark's partition streaming, without Spark: a partition's rows (sorted by user_id)
reach the model in calls of about `rows_per_call` rows, never splitting a user."""

from __future__ import annotations

import pyarrow as pa
import pytest

from plm.export import spark as sp


class _Recorder:
    """Stands in for UserEmbedder: records the users and rows of each call."""

    def __init__(self):
        self.calls: list[tuple[list[str], int]] = []
        self.accounting: dict = {}

    def embed_raw(self, tables, cutoff):
        users = sorted({u for t in tables.values() for u in t.column("user_id").to_pylist()})
        self.calls.append((users, sum(t.num_rows for t in tables.values())))
        self.accounting = {s: {"input_rows": t.num_rows, "kept_rows": t.num_rows - 1, "duplicate_rows": 0,
                               "quarantined_rows": {"null_ts": 1}, "quarantined_total": 1, "after_cutoff_rows": 0}
                           for s, t in tables.items()}
        n = len(users)
        return pa.table({"user_id": users,
                         "embedding": pa.FixedSizeListArray.from_arrays(pa.array([0.5] * (2 * n), pa.float32()), 2),
                         "n_events": pa.array([1] * n, pa.int32())})


def _partition(rows_per_user: list[int], batch_rows: int) -> list[pa.RecordBatch]:
    uid, src, amount = [], [], []
    for i, n in enumerate(rows_per_user):
        for j in range(n):
            uid.append(f"u{i:04d}")
            src.append("payments" if j % 3 else "logins")
            amount.append(float(j))
    pay = pa.StructArray.from_arrays([pa.array(uid), pa.array(amount)], ["user_id", "amount"])
    t = pa.table({"user_id": uid, sp._SRC: src, "payments": pay, "logins": pay})
    return t.to_batches(max_chunksize=batch_rows)


@pytest.mark.parametrize("batch_rows", [7, 50, 10_000])
def test_calls_cut_between_users(monkeypatch, batch_rows):
    rec = _Recorder()
    monkeypatch.setattr(sp, "_worker_embedder", lambda key: rec)
    sizes = [5, 1, 40, 3, 120, 2, 9, 9, 9, 1, 33, 7] * 3  # one user (120 rows) larger than a call
    out = list(sp._embed_partition(_partition(sizes, batch_rows), ("k", ()), ("payments", "logins"),
                                   "2024-01-01T00:00:00Z", rows_per_call=30))
    seen = [u for users, _ in rec.calls for u in users]
    assert seen == [f"u{i:04d}" for i in range(len(sizes))]  # every user once, in order, never split
    assert sum(rows for _, rows in rec.calls) == sum(sizes)  # no row lost or repeated
    assert max(rows for _, rows in rec.calls) <= max(30, batch_rows) + 120  # bounded per call
    if batch_rows < 30:
        assert len(rec.calls) > 5
    got = pa.Table.from_batches(out)
    assert got.column("user_id").to_pylist() == seen
    assert got.schema.field("embedding").type == pa.list_(pa.float32())  # what Spark's array<float> takes


def test_empty_partition_embeds_nothing(monkeypatch):
    monkeypatch.setattr(sp, "_worker_embedder", lambda key: pytest.fail("no rows, no model"))
    assert list(sp._embed_partition(iter([]), ("k", ()), ("payments",), "2024-01-01T00:00:00Z", 10)) == []


def test_raw_options_are_checked():
    """raw=DIR refuses what it has no use for; its own options are refused without it."""
    from plm.config import SparkConfig
    from plm.export.config import ExportConfig, check_trainer_overrides
    from plm.export.run import check_raw_config

    base = {"ckpt": "c", "data": "d", "out": "o"}
    check_raw_config(ExportConfig(**base))
    check_raw_config(ExportConfig(**base, raw="r", cutoff="2024-06-29T00:00:00Z", partitions=8, quantize="int8"))
    for kw, msg in [({"cutoff": "2024-06-29T00:00:00Z"}, "cutoff: only for raw=DIR"),
                    ({"partitions": 4}, "partitions: only for raw=DIR"),
                    ({"spark": SparkConfig(master="yarn")}, "spark: only for raw=DIR"),
                    ({"raw": "r", "format": "onnx"}, "raw=DIR writes embeddings"),
                    ({"raw": "r", "index": "flat"}, "index="),
                    ({"raw": "r", "splits": "test"}, "no splits"),
                    ({"raw": "r", "row_group_size": 10}, "read_rows / row_group_size"),
                    ({"raw": "r", "cutoff": "June"}, "cutoff='June' is not an ISO-8601 time"),
                    ({"raw": "r", "rows_per_call": 0}, "rows_per_call=0")]:
        with pytest.raises(ValueError, match=msg):
            check_raw_config(ExportConfig(**base, **kw))
    cfg = ExportConfig(**base, raw="r")
    cfg.trainer.compile = True
    with pytest.raises(ValueError, match="trainer.compile"):
        check_raw_config(cfg)
    check_trainer_overrides(["trainer.num_threads=2"])
    with pytest.raises(ValueError, match="trainer.num_threads: with raw=DIR"):
        check_trainer_overrides(["trainer.num_threads=2"], raw=True)
    with pytest.raises(ValueError, match="trainer: with raw=DIR"):
        check_trainer_overrides(["trainer=gpu"], raw=True)


def test_write_partition_writes_the_batch_schema(monkeypatch, tmp_path):
    """A task's file has the batch export's schema (fixed-size vectors, identity in the schema
    metadata) and holds every user of the partition once; an empty partition writes nothing."""
    import json

    import pyarrow.parquet as pq

    from plm.export.run import METADATA_KEY, embedding_schema

    rec = _Recorder()
    monkeypatch.setattr(sp, "_worker_embedder", lambda key: rec)
    ident = {"model": "encoder:tiny", "model_sha256": "m", "checkpoint": "run/final.pt", "tokenizer_sha256": "t",
             "pooling": "mean", "as_of": "2024-01-01T00:00:00Z", "dim": 2}
    sizes = [3, 50, 2, 7]
    [row] = list(sp._write_partition(_partition(sizes, 5), ("k", ()), ("payments", "logins"),
                                     "2024-01-01T00:00:00Z", 20, str(tmp_path), json.dumps(ident), 2))
    assert row.num_rows == 1 and row.column("rows")[0].as_py() == len(sizes)
    t = pq.read_table(row.column("path")[0].as_py())
    pq.write_table(embedding_schema(2, ident).empty_table(), tmp_path / "ref.parquet")  # the batch export's file schema
    assert t.schema.equals(pq.read_schema(tmp_path / "ref.parquet"), check_metadata=True)
    assert json.loads(t.schema.metadata[METADATA_KEY]) == ident
    assert t.column("user_id").to_pylist() == [f"u{i:04d}" for i in range(len(sizes))]
    # the partition's accounting: every input row of every call counted, per source
    acc = json.loads(row.column("accounting")[0].as_py())
    assert sum(a["input_rows"] for a in acc.values()) == sum(sizes)
    assert acc["payments"]["quarantined_rows"] == {"null_ts": len(rec.calls)}
    assert list(sp._write_partition(iter([]), ("k", ()), ("payments",), "2024-01-01T00:00:00Z", 20,
                                    str(tmp_path / "empty"), json.dumps(ident), 2)) == []
    assert not (tmp_path / "empty").exists()
