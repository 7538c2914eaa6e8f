"""plm-pipeline end to end on a small synthetic world (Spark local mode, a few training steps):
every stage's output, the report's contents, and the Spark-free raw-event path giving the batch
export's vectors for the same users."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.spark]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("pipeline")
    exe = Path(sys.executable).parent
    # a fresh matplotlib config folder: matplotlib builds its font cache and logs it (a fresh clone)
    env = {**os.environ, "WANDB_MODE": "offline", "MPLCONFIGDIR": str(root / "mpl")}
    r = subprocess.run([str(exe / "plm-synth"), f"out={root / 'raw'}", "users=160", "seed=7"], capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    _share_an_event_id(root / "raw")
    r = subprocess.run([str(exe / "plm-pipeline"), f"raw={root / 'raw'}", f"out={root / 'out'}",
                        "prep.spark.master='local[2]'", "prep.vocab.min_count=2",
                        "train_overrides=['trainer.max_steps=4','trainer.val_check_interval=0',"
                        "'trainer.limit_val_batches=1','logger=csv','trainer.enable_progress_bar=false']",
                        "export.progress=false", "eval.bootstrap=20", "eval.folds=3", "eval.progress=false"],
                       capture_output=True, text=True, timeout=900, env=env, cwd=root)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return root / "raw", root / "out", r


def _share_an_event_id(raw: Path) -> None:
    """A second logins file with one valid row that reuses another user's login event_id: plm-prep
    quarantines both rows (conflicting_event_id), and a path that sees one user at a time must too."""
    t = pq.read_table(next((raw / "logins").glob("*.parquet")))
    ids = t.column("event_id").to_pylist()
    once = {i for i, c in zip(*np.unique(np.asarray(ids, dtype=object), return_counts=True)) if c == 1}
    ts = t.column("ts").cast("int64").to_numpy(zero_copy_only=False)
    users = t.column("user_id").to_pylist()
    row = next(k for k in np.argsort(ts)[len(ts) // 2:] if ids[k] in once and users[k] is not None)
    other = next(u for u in sorted(set(users) - {None}) if u != users[row])
    copy = t.slice(int(row), 1).to_pylist()[0]
    copy["user_id"] = other
    pq.write_table(pa.Table.from_pylist([copy], schema=t.schema), raw / "logins" / "zz-shared-id.parquet")
    SHARED.update(event_id=ids[row], users=(users[row], other))


SHARED: dict = {}  # the event_id two users' logins share (set by the world fixture)


def test_every_stage_wrote_its_outputs(world):
    raw, out, r = world
    rec = json.loads((out / "pipeline.json").read_text())
    assert list(rec["stages"]) == ["prep", "train", "export", "eval"]
    assert (out / "prepared" / "manifest.json").exists() and (out / "train" / "final.pt").exists()
    manifest = json.loads((out / "prepared" / "manifest.json").read_text())
    emb = pq.read_table(out / "embeddings")
    assert emb.num_rows == sum(s["users"] for s in manifest["splits"].values())
    assert emb.num_rows == len(set(emb.column("user_id").to_pylist()))
    assert f"report: {out / 'report' / 'report.md'}" in r.stdout.replace(str(out.resolve()), str(out))
    assert "fontManager" not in r.stdout + r.stderr  # matplotlib's first-run INFO line stays quiet
    # the baseline read the raw rows in plm-prep's time window (not its own "one day after now")
    rep = json.loads((out / "report" / "report.json").read_text())
    assert (rep["config"]["ts_min"], rep["config"]["ts_max"]) == (manifest["ts_window"]["min"], manifest["ts_window"]["max"])


def test_report_has_tables_plots_and_numbers(world):
    _, out, _ = world
    md = (out / "report" / "report.md").read_text()
    for task in ("segment", "churn", "ato", "future_spend"):
        assert task in md
    for fs in ("embedding_linear", "aggregates_lgbm", "combined_lgbm"):
        assert fs in md
    pngs = list((out / "report").glob("**/*.png"))
    assert len(pngs) >= 3 and all(p.stat().st_size > 5000 for p in pngs)
    rep = json.loads((out / "report" / "report.json").read_text())
    assert "churn" in json.dumps(rep)


def test_spark_free_raw_path_equals_batch_export(world):
    """A service embedding the raw events of a few users (pure-Python tokenizer, no Spark) gets the
    vectors plm-export wrote for them."""
    from plm.export import UserEmbedder

    raw, out, _ = world
    manifest = json.loads((out / "prepared" / "manifest.json").read_text())
    batch = pq.read_table(out / "embeddings").sort_by("user_id")
    # a few users, not the two whose logins share an event_id (only a path that sees both finds it)
    some = [u for u in batch.column("user_id").to_pylist()[:: max(1, batch.num_rows // 12)] if u not in SHARED["users"]]
    tables = {}
    for source in ("payments", "logins", "orders"):
        t = pq.read_table(raw / source)
        mask = np.isin(np.asarray(t.column("user_id").to_pylist(), dtype=object), some)
        tables[source] = t.filter(mask)
    svc = UserEmbedder.from_files(str(out / "train" / "final.pt"), str(out / "prepared"))
    got = svc.embed_raw(tables, cutoff=manifest["cutoff"])
    assert got.column("user_id").to_pylist() == sorted(some)
    want = batch.filter(np.isin(np.asarray(batch.column("user_id").to_pylist(), dtype=object), some))
    a = np.stack(got.column("embedding").to_numpy(zero_copy_only=False))
    b = np.stack(want.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert got.column("n_events").to_pylist() == want.column("n_events").to_pylist()
    # every input row is accounted for, as in the manifest (kept + quarantined + duplicates)
    assert set(svc.accounting) == {"payments", "logins", "orders"}
    for source, acc in svc.accounting.items():
        assert acc["input_rows"] == tables[source].num_rows
        assert acc["input_rows"] == acc["kept_rows"] + acc["quarantined_total"] + acc["duplicate_rows"], source


def test_partial_rerun_keeps_the_earlier_stage_records(world):
    """`stages=[eval]` on a finished run re-evaluates and keeps prep/train/export in pipeline.json
    (marked `earlier_run`). Last in this module: it rewrites the report."""
    raw, out, _ = world
    before = json.loads((out / "pipeline.json").read_text())["stages"]
    exe = Path(sys.executable).parent
    r = subprocess.run([str(exe / "plm-pipeline"), f"raw={raw}", f"out={out}", "stages=[eval]", "preset=next_tiny",
                        "eval.bootstrap=5", "eval.folds=3", "eval.progress=false", "eval.plots=false"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((out / "pipeline.json").read_text())
    assert rec["stages_run"] == ["eval"] and list(rec["stages"]) == ["prep", "train", "export", "eval"]
    for k in ("prep", "train", "export"):
        assert rec["stages"][k] == {**before[k], "earlier_run": True}
    assert "earlier_run" not in rec["stages"]["eval"]
    assert rec["preset"] == "cpu-small"  # the model in OUT is the earlier run's, not this command's preset


def test_spark_raw_path_equals_batch_export(world, spark):
    """embed_raw_spark (raw DataFrames, mapInArrow on local Spark, partitions cut between users
    every few hundred rows) writes, for every user, the vector and identity plm-export wrote."""
    from plm.export import read_identity
    from plm.export.spark import embed_raw_spark

    raw, out, _ = world
    manifest = json.loads((out / "prepared" / "manifest.json").read_text())
    sources = {s: spark.read.parquet(str(raw / s)) for s in ("payments", "logins", "orders")}
    key = "spark.sql.execution.arrow.maxRecordsPerBatch"
    before = spark.conf.get(key)
    spark.conf.set(key, "97")  # many small Arrow batches: users straddle batches and calls
    try:
        df = embed_raw_spark(sources, str(out / "train" / "final.pt"), str(out / "prepared"), manifest["cutoff"],
                             partitions=3, rows_per_call=300)
        got = df.toArrow().sort_by("user_id")
    finally:
        spark.conf.set(key, before)
    batch = pq.read_table(out / "embeddings").sort_by("user_id")
    assert got.column_names == batch.column_names
    assert got.column("user_id").to_pylist() == batch.column("user_id").to_pylist()
    a = np.stack(got.column("embedding").to_numpy(zero_copy_only=False))
    b = np.stack(batch.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert got.column("n_events").to_pylist() == batch.column("n_events").to_pylist()
    ident = read_identity(out / "embeddings")
    for k in ("model", "model_sha256", "checkpoint", "tokenizer_sha256", "pooling"):
        assert set(got.column(k).to_pylist()) == {ident[k]}, k
    assert got.column("as_of").cast("int64").to_pylist()[0] == batch.column("as_of").cast("int64").to_pylist()[0]


def test_spark_raw_accounting_names_every_dropped_row(world, spark):
    """raw_accounting_spark counts what embed_raw_spark drops, per source and reason, as plm-prep's
    manifest counts the same folder, and as the pure-Python twin (`encode_raw`) counts the same
    rows when it sees every user at once: dirty rows, a replay, rows after the cut-off (valid,
    not out of range), an id whose two different rows straddle the cut-off, and the id two
    users' logins share."""
    from plm.data.tokenizer import Tokenizer, encode_raw
    from plm.export.service import window_end
    from plm.export.spark import raw_accounting_spark

    raw, out, _ = world
    manifest = json.loads((out / "prepared" / "manifest.json").read_text())
    tables = {s: pq.read_table(raw / s) for s in ("payments", "logins", "orders")}
    prep = raw_accounting_spark({s: spark.createDataFrame(t) for s, t in tables.items()}, str(out / "prepared"),
                                manifest["cutoff"], ts_max=manifest["ts_window"]["max"])
    for source, acc in prep.items():  # the raw folder plm-prep prepared: its very counts
        m = manifest["accounting"][source]
        assert {k: acc[k] for k in ("input_rows", "kept_rows", "duplicate_rows", "after_cutoff_rows")} == {
            k: m[k] for k in ("input_rows", "kept_rows", "duplicate_rows", "after_cutoff_rows")}, source
        assert {r: n for r, n in acc["quarantined_rows"].items() if n} == {
            r: n for r, n in m["quarantined_rows"].items() if n}, source
    cutoff = "2024-06-01T00:00:00Z"  # before the end of the world: later rows are valid, after it
    pay = tables["payments"].to_pylist()
    at_cutoff = dt.datetime(2024, 6, 1, tzinfo=dt.timezone.utc)
    early = next(r for r in pay if r["ts"] is not None and r["ts"] < at_cutoff - dt.timedelta(days=3)
                 and r["amount"] is not None and r["amount"] > 0)
    pay += [pay[0], {**pay[1], "ts": None}, {**pay[2], "event_id": "nan-row", "amount": float("nan")},
            {**pay[3], "event_id": "at-cutoff", "ts": at_cutoff},
            {**early, "amount": early["amount"] + 1, "ts": at_cutoff + dt.timedelta(days=2)}]  # same id, later
    tables["payments"] = pa.Table.from_pylist(pay, schema=tables["payments"].schema)
    end = window_end(manifest)
    got = raw_accounting_spark({s: spark.createDataFrame(t) for s, t in tables.items()}, str(out / "prepared"), cutoff,
                               ts_max=end)
    want: dict = {}
    tok = Tokenizer.from_dict(json.loads((out / "prepared" / "tokenizer.json").read_text()))
    encode_raw(tables, tok, cutoff=cutoff, ts_min=manifest["ts_window"]["min"], ts_max=end, accounting=want)
    assert got == want
    p, before = got["payments"], prep["payments"]

    def more(reason):  # quarantined for `reason` beyond the prepared folder's own rows
        return p["quarantined_rows"].get(reason, 0) - before["quarantined_rows"].get(reason, 0)

    assert p["duplicate_rows"] == before["duplicate_rows"] + 1
    assert p["after_cutoff_rows"] > 100  # every valid row from 1 June on, the one at the cut-off among them
    assert more("null_ts") == 1 and more("amount_invalid") == 1 and more("ts_out_of_range") == 0
    # the id whose second row comes after the cut-off: both rows conflict, as plm-prep has it
    assert more("conflicting_event_id") == 2
    assert got["logins"]["quarantined_rows"]["conflicting_event_id"] == 2  # the shared id, both users' rows
    for source, acc in got.items():
        assert acc["input_rows"] == tables[source].num_rows
        assert acc["input_rows"] == acc["kept_rows"] + acc["quarantined_total"] + acc["duplicate_rows"], source
    with pytest.raises(ValueError, match="^raw_accounting_spark: cutoff='June' is not an ISO-8601 time"):
        raw_accounting_spark({s: spark.createDataFrame(t) for s, t in tables.items()}, str(out / "prepared"), "June")


def test_spark_raw_path_errors_name_the_problem(world, spark):
    """Bad input to embed_raw_spark fails on the driver, before any task, naming what is wrong."""
    from plm.data.schema import ContractError
    from plm.export.spark import embed_raw_spark

    raw, out, _ = world
    ckpt, prep = str(out / "train" / "final.pt"), str(out / "prepared")
    pay = spark.read.parquet(str(raw / "payments"))
    with pytest.raises(ContractError, match="unknown source"):
        embed_raw_spark({"payment": pay}, ckpt, prep, "2024-06-29T00:00:00Z")
    with pytest.raises(ContractError, match="'amount' .*payments.* is missing"):
        embed_raw_spark({"payments": pay.drop("amount")}, ckpt, prep, "2024-06-29T00:00:00Z")
    with pytest.raises(ContractError, match="'amount' .*has type string; expected double"):
        embed_raw_spark({"payments": pay.withColumn("amount", pay["amount"].cast("string"))}, ckpt, prep,
                        "2024-06-29T00:00:00Z")
    with pytest.raises(ValueError, match="cutoff='June' is not an ISO-8601 time"):
        embed_raw_spark({"payments": pay}, ckpt, prep, "June")
    with pytest.raises(ValueError, match="rows_per_call=0"):
        embed_raw_spark({"payments": pay}, ckpt, prep, "2024-06-29T00:00:00Z", rows_per_call=0)
    with pytest.raises(ValueError, match="pooling="):
        embed_raw_spark({"payments": pay}, ckpt, prep, "2024-06-29T00:00:00Z", pooling="median")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        embed_raw_spark({"payments": pay}, str(out / "nope.pt"), prep, "2024-06-29T00:00:00Z")


def test_plm_export_raw_mode(world, spark, tmp_path):
    """plm-export raw=DIR: Spark reads the raw folder, embeds on its executors and writes the
    batch export's rows (same vectors), a record, and refuses to overwrite other data; with
    quantize=int8 the agreement with fp32 is checked first and recorded."""
    from plm.config import SparkConfig
    from plm.export import ExportConfig, read_identity, run_export

    raw, out, _ = world
    dest = tmp_path / "raw_emb"
    cfg = ExportConfig(ckpt=str(out / "train" / "final.pt"), data=str(out / "prepared"), out=str(dest), raw=str(raw),
                       spark=SparkConfig(master="local[2]", app_name="plm-export", log_level="ERROR"))
    rec = run_export(cfg)
    batch = pq.read_table(out / "embeddings").sort_by("user_id")
    got = pq.read_table(dest).sort_by("user_id")
    assert got.column("user_id").to_pylist() == batch.column("user_id").to_pylist()
    np.testing.assert_allclose(np.stack(got.column("embedding").to_numpy(zero_copy_only=False)),
                               np.stack(batch.column("embedding").to_numpy(zero_copy_only=False)), rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in dest.glob("*.parquet")) == [p["path"] for p in rec["outputs"]["parts"]]
    assert json.loads((dest / "_export.json").read_text())["outputs"]["users"] == batch.num_rows == rec["outputs"]["users"]
    assert pq.read_schema(next(dest.glob("part-*.parquet"))).equals(pq.read_schema(next((out / "embeddings").glob("part-*.parquet"))))
    assert read_identity(dest) == rec["identity"]  # the batch export's schema, metadata included
    assert {k: v for k, v in rec["identity"].items() if k != "checkpoint"} == \
        {k: v for k, v in read_identity(out / "embeddings").items() if k != "checkpoint"}
    assert rec["inputs"]["sources"]["payments"]["rows"] == pq.read_metadata(next((raw / "payments").glob("*.parquet"))).num_rows
    assert rec["inputs"]["sources"]["logins"]["files"] == 2
    assert rec["inputs"]["max_tokens"] == 4096  # the CPU budget of the tiny model, as the executors use
    assert rec["inputs"]["sources"]["logins"]["shared_event_ids_left_out"] == 1
    assert rec["inputs"]["sources"]["payments"]["shared_event_ids_left_out"] == 0
    # every row the executors embedded is accounted for, and they kept and quarantined what
    # plm-prep did (its conflicting_event_id rows were left out before, as shared ids)
    manifest = json.loads((out / "prepared" / "manifest.json").read_text())["accounting"]
    for source, src in rec["inputs"]["sources"].items():
        acc, want = src["accounting"], manifest[source]
        assert acc["input_rows"] == acc["kept_rows"] + acc["quarantined_total"] + acc["duplicate_rows"], source
        assert acc["kept_rows"] == want["kept_rows"], source
        assert {r: n for r, n in acc["quarantined_rows"].items() if n} == \
            {r: n for r, n in want["quarantined_rows"].items() if n and r != "conflicting_event_id"}, source
    with pytest.raises(FileExistsError, match="overwrite=true"):
        run_export(cfg)
    cfg.overwrite, cfg.cutoff = True, "1995-01-01T00:00:00Z"
    with pytest.raises(ValueError, match="no user has a valid event before cutoff=1995"):
        run_export(cfg)
    assert pq.read_table(dest).num_rows == batch.num_rows  # the earlier export is still there
    cfg.cutoff, cfg.quantize = "", "int8"
    rec = run_export(cfg)
    assert rec["agreement"]["int8_vs_fp32"]["cosine_min"] >= 0.99
    q = pq.read_table(dest).sort_by("user_id")
    a = np.stack(q.column("embedding").to_numpy(zero_copy_only=False))
    b = np.stack(got.column("embedding").to_numpy(zero_copy_only=False))
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.99 and set(q.column("model").to_pylist()) == set(got.column("model").to_pylist())


def test_shared_ids_found_alike_collected_or_joined(world, spark, monkeypatch):
    """The shared-id step finds the world's one login id that two users share, whether the ids are
    collected and broadcast (a few) or kept as a cached aggregation (beyond _COLLECT_IDS)."""
    from data_prep import prep
    from plm.export import spark as S

    raw, _, _ = world
    sources = {s: spark.read.parquet(str(raw / s)) for s in ("payments", "logins", "orders")}
    collected = S._shared_ids(sources, "1990-01-01T00:00:00Z", "2100-01-01T00:00:00Z")
    monkeypatch.setattr(prep, "_COLLECT_IDS", 0)  # plm-prep's limit, which the export shares
    joined = S._shared_ids(sources, "1990-01-01T00:00:00Z", "2100-01-01T00:00:00Z")
    for found in (collected, joined):
        assert {k: n for k, (_, n) in found.items()} == {"payments": 0, "logins": 1, "orders": 0}
        assert [r.event_id for r in found["logins"][0].collect()] == [SHARED["event_id"]]
        assert found["payments"][0] is None and found["orders"][0] is None
