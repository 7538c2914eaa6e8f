"""plm-prep on inline dirty worlds: quarantine, accounting, OOV, schema errors, windows,
Spark == pure-Python tokens, private columns never written."""

import datetime as dt
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import login, order, payment, source_table, ts, write_raw

from data_prep.prep import run_prep
from plm.config import VocabConfig
from plm.data.schema import HASHED_FIELDS, OOV, REASONS, ContractError
from plm.data.tokenizer import Tokenizer, encode_raw, pseudonymise

pytestmark = [pytest.mark.spark, pytest.mark.slow]


def _users(n):
    return [f"u{i:03d}" for i in range(n)]


def dirty_world(root):
    """60 users with clean histories, plus every kind of bad row, replays, extra columns, a
    second payments file in ms timestamps and a naive-timestamp logins file."""
    pays, logs, ords = [], [], []
    for i, u in enumerate(_users(60)):
        for j in range(6 + i % 5):
            pays.append(payment(f"p{i}-{j}", u, ts(1 + j, 8 + i % 10, j), amount=5.0 + 3 * j + i,
                                merchant_id=f"m{(i + j) % 7}", device_id=f"dev-secret-{i}" if j % 2 else None,
                                country="DE" if j != 3 else "FR", note="extra column"))
        logs.append(login(f"l{i}", u, ts(2, 7, i % 60), device_id=f"dev-secret-{i}", ip_country="DE"))
        if i % 3 == 0:
            ords.append(order(f"o{i}", u, ts(4, 9), merchant_id=f"m{i % 7}", n_items=1 + i % 4,
                              category="books" if i % 2 else "toys"))
    bad = [
        payment("p0-0", "u000", ts(1, 8, 0), amount=5.0, merchant_id="m0", device_id=None, country="DE", note="extra column"),  # replay
        payment(None, "u001", ts(3)),
        payment("bad-user", None, ts(3)),
        payment("bad-ts", "u002", None),
        payment("p5-1", "u005", None),  # a null-ts copy of a valid event: quarantined alone
        payment("old", "u002", dt.datetime(1985, 5, 5, tzinfo=dt.timezone.utc)),
        payment("future", "u002", dt.datetime(2200, 1, 1, tzinfo=dt.timezone.utc)),
        payment("nan", "u003", ts(3), amount=float("nan")),
        payment("neg", "u003", ts(3), amount=-2.0),
        payment("mcc", "u003", ts(3), mcc=-5),
        payment("clash", "u004", ts(3), currency="EUR"),
        payment("clash", "u004", ts(3), currency="USD"),
        payment("new-cur", "u005", ts(9), currency="XYZ", merchant_id="never-seen"),
    ]
    ords.append(order("zero-items", "u006", ts(5), n_items=0))
    late = [payment(f"late{i}", "u007", ts(30, 12, i)) for i in range(3)]  # after the cut-off
    raw = write_raw(root, payments=pays + bad + late, logins=logs, orders=ords)
    # a second payments file with millisecond timestamps
    t = source_table("payments", [payment("ms-1", "u008", ts(9, 10)), payment("ms-2", "u100", ts(9, 11))])
    t = t.set_column(t.schema.get_field_index("ts"), "ts", t.column("ts").cast(pa.timestamp("ms", tz="UTC")))
    pq.write_table(t, raw / "payments" / "part-1.parquet")
    # a naive-timestamp logins file (read as UTC)
    t = source_table("logins", [login("naive-1", "u009", ts(9, 6))])
    t = t.set_column(t.schema.get_field_index("ts"), "ts", t.column("ts").cast(pa.timestamp("us")))
    pq.write_table(t, raw / "logins" / "part-1.parquet")
    # a payments file whose mcc is int64 (any integer width is accepted) with a value int32
    # cannot hold, and an extra column that differs from a contract column only in case
    wide = [payment("big-mcc", "u010", ts(9, 13), mcc=3_000_000_000, AMOUNT=1.0),
            payment("wide-ok", "u010", ts(9, 14), mcc=5812, device_id="", AMOUNT=2.0),
            payment("empty-dev", "u010", ts(9, 15), device_id="", AMOUNT=3.0),  # "" is a device
            payment("zero", "u011", ts(9, 13), amount=0.0, AMOUNT=4.0),
            payment("zero", "u011", ts(9, 13), amount=-0.0, AMOUNT=4.0)]  # -0.0 == 0.0: a replay
    t = source_table("payments", [{k: v for k, v in r.items() if k != "mcc"} for r in wide])
    t = t.set_column(t.schema.get_field_index("mcc"), "mcc", pa.array([r["mcc"] for r in wide], pa.int64()))
    pq.write_table(t, raw / "payments" / "part-2.parquet")
    # an orders file in nanoseconds (one a nanosecond before the cut-off) with int64 n_items
    # (one too large for int32)
    t = source_table("orders", [order("ns-1", "u012", ts(9, 10)), order("ns-2", "u012", ts(19, 23)),
                                order("big-items", "u012", ts(9, 11))])
    base = t.column("ts").cast(pa.int64()).to_numpy() * 1000
    ns = pa.array(np.array([base[0] + 999, 1_705_708_799_999_999_999, base[2]]), pa.int64()).cast(
        pa.timestamp("ns", tz="UTC"))
    t = t.set_column(t.schema.get_field_index("ts"), "ts", ns)
    t = t.set_column(t.schema.get_field_index("n_items"), "n_items", pa.array([1, 2, 2**32 + 1], pa.int64()))
    pq.write_table(t, raw / "orders" / "part-1.parquet")
    # a logins file with legacy INT96 timestamps (Spark's own default output): pyarrow reports them
    # as timestamp[ns], Spark reads a timestamp (not nanoseconds as longs)
    t = source_table("logins", [login("int96-1", "u013", ts(9, 8))])
    pq.write_table(t, raw / "logins" / "part-2.parquet", use_deprecated_int96_timestamps=True)
    labels = pa.table({"user_id": _users(60), "churn": [i % 2 for i in range(60)]})
    pq.write_table(labels, raw / "labels.parquet")
    return raw, len(pays) + len(bad) + len(late) + 2 + len(wide), len(logs) + 2, len(ords) + 3


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, spark, prep_config):
    root = tmp_path_factory.mktemp("dirty")
    raw, n_pay, n_log, n_ord = dirty_world(root / "raw")
    cfg = prep_config(raw, root / "out", cutoff="2024-01-20T00:00:00Z", max_events=4, stride=2,
                      vocab=VocabConfig(min_count=2, max_size=1000, max_size_by_field={"merchant": 5}),
                      val_fraction=0.2, test_fraction=0.2, rows_per_shard=50)
    manifest = run_prep(cfg, spark=spark)
    return root, manifest, (n_pay, n_log, n_ord)


def read_raw(folder):
    """Every file of a raw source folder as one table (the files' schemas differ: widths of ints,
    timestamp units, extra columns), as a service would hand them to `encode_raw`."""
    tables = []
    for f in sorted(folder.glob("*.parquet")):
        t = pq.read_table(f)
        i = t.schema.get_field_index("ts")
        if t.schema.field(i).type.tz is None:  # naive: UTC, as the contract reads it
            t = t.set_column(i, "ts", t.column(i).cast(pa.timestamp(t.schema.field(i).type.unit, tz="UTC")))
        tables.append(t)
    return pa.concat_tables(tables, promote_options="permissive")


def read_split(out, split):
    files = sorted((out / split).glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else None


def test_accounting_closes_with_every_reason(prepared):
    root, m, (n_pay, n_log, n_ord) = prepared
    acc = m["accounting"]
    assert acc["payments"]["input_rows"] == n_pay
    assert acc["logins"]["input_rows"] == n_log
    assert acc["orders"]["input_rows"] == n_ord
    for a in acc.values():
        assert a["input_rows"] == a["kept_rows"] + a["quarantined_total"] + a["duplicate_rows"]
        assert set(a["quarantined_rows"]) == set(REASONS)
    q = acc["payments"]["quarantined_rows"]
    # mcc_invalid: -5, and 3,000,000,000 in an int64 column (too large for the contract's int32);
    # amount_invalid: NaN, -2 and 0.0 (its -0.0 copy is an exact duplicate, as Spark groups them)
    assert q == {"null_event_id": 1, "null_user_id": 1, "null_ts": 2, "ts_out_of_range": 2, "amount_invalid": 3,
                 "n_items_invalid": 0, "mcc_invalid": 2, "conflicting_event_id": 2}
    assert acc["payments"]["duplicate_rows"] == 2
    assert acc["payments"]["after_cutoff_rows"] == 3
    assert acc["orders"]["quarantined_rows"]["n_items_invalid"] == 2  # 0, and 2^32 + 1 in int64
    # nanoseconds are floored exactly: 1 ns before the cut-off is before it (a double division
    # rounded it up to the cut-off)
    assert acc["orders"]["after_cutoff_rows"] == 0
    assert m["cutoff"] == "2024-01-20T00:00:00Z"
    on_disk = json.loads((root / "out" / "manifest.json").read_text())
    assert on_disk["accounting"] == acc and on_disk["splits"] == m["splits"]


def test_quarantine_rows_have_reasons_and_no_private_columns(prepared):
    root, m, _ = prepared
    q = pq.read_table(root / "out" / "quarantine" / "payments")
    assert q.num_rows == sum(m["accounting"]["payments"]["quarantined_rows"].values())
    assert "reason" in q.column_names and None not in q.column("reason").to_pylist()
    assert "device_id" not in q.column_names and "note" not in q.column_names
    # the valid original of the null-ts copy is kept, not quarantined as a conflict
    assert sorted(r for e, r in zip(q.column("event_id").to_pylist(), q.column("reason").to_pylist()) if e == "p5-1") == ["null_ts"]
    assert q.schema.field("ts").type == pa.timestamp("us", tz="UTC")
    assert m["quarantine"]["logins"] == []


def test_splits_are_disjoint_and_complete(prepared):
    root, m, _ = prepared
    seen = {}
    for split in ("train", "val", "test"):
        t = read_split(root / "out", split)
        if t is None:
            continue
        assert set(t.column("split").to_pylist()) == {split}
        users = set(t.column("user_id").to_pylist())
        assert not users & set(seen), "a user is in two splits"
        seen.update(dict.fromkeys(users, split))
        assert m["splits"][split]["users"] == len(users)
        assert sum(s["rows"] for s in m["splits"][split]["shards"]) == t.num_rows
    # every user with a valid event before the cut-off, and no other
    expected = set(_users(60)) | {"u100", "u009"} - set()
    assert set(seen) == expected
    assert all(m["splits"][s]["users"] for s in ("train", "val", "test"))
    assert m["labels"]["columns"] == ["churn"] and m["labels"]["users_with_sequences_and_labels"] == 60


def test_windows_and_time_order(prepared):
    root, _, _ = prepared
    rows = [r for s in ("train", "val", "test") if (t := read_split(root / "out", s)) for r in t.to_pylist()]
    by_user = {}
    for r in rows:
        by_user.setdefault(r["user_id"], []).append(r)
        assert r["n_events"] == len(r["ts"]) == len(r["merchant"]) <= 4
        assert r["ts"] == sorted(r["ts"])
        assert max(r["ts"]) < 1705708800000000  # 2024-01-20: nothing at/after the cut-off
    for ws in by_user.values():
        ws.sort(key=lambda r: r["window_index"])
        n = ws[0]["history_len"]
        assert ws[0]["window_start"] + ws[0]["n_events"] == n  # window 0 ends at the last event
        assert ws[-1]["window_start"] == 0
        assert [w["window_index"] for w in ws] == list(range(len(ws)))


def test_spark_tokens_equal_pure_python(prepared):
    root, m, _ = prepared
    tok = Tokenizer.load(root / "out" / "tokenizer.json")
    tables = {s: read_raw(root / "raw" / s) for s in ("payments", "logins", "orders")}
    acc: dict = {}
    py = encode_raw(tables, tok, cutoff=m["cutoff"], ts_min=m["ts_window"]["min"], ts_max=m["ts_window"]["max"],
                    max_events=4, stride=2, accounting=acc)
    # the same accounting (an int64 mcc too large for int32, -0.0 beside 0.0, nanoseconds ...)
    for source, a in acc.items():
        want = m["accounting"][source]
        assert {k: a[k] for k in ("input_rows", "kept_rows", "duplicate_rows", "after_cutoff_rows")} == {
            k: want[k] for k in ("input_rows", "kept_rows", "duplicate_rows", "after_cutoff_rows")}, source
        assert {r: n for r, n in a["quarantined_rows"].items() if n} == {
            r: n for r, n in want["quarantined_rows"].items() if n}, source
    spark_rows = pa.concat_tables([t for s in ("train", "val", "test") if (t := read_split(root / "out", s))])
    keys = [("user_id", "ascending"), ("window_index", "ascending")]
    py, spark_rows = py.sort_by(keys), spark_rows.sort_by(keys)
    assert py.num_rows == spark_rows.num_rows
    for col in py.column_names:
        a, b = py.column(col).to_pylist(), spark_rows.column(col).to_pylist()
        if col.endswith("_value"):  # log1p may differ in the last bit between the JVM and numpy
            assert [len(x) for x in a] == [len(x) for x in b]
            np.testing.assert_allclose(np.concatenate(a), np.concatenate(b), rtol=1e-6, atol=1e-6, err_msg=col)
        else:
            assert a == b, col


def test_unseen_values_become_oov_and_vocab_is_train_only(prepared):
    root, _, _ = prepared
    tok = Tokenizer.load(root / "out" / "tokenizer.json")
    assert "XYZ" not in tok.categorical["currency"]
    assert pseudonymise(pa.array(["never-seen"]), HASHED_FIELDS["merchant"])[0].as_py() not in tok.categorical["merchant"]
    rows = [r for s in ("train", "val", "test") if (t := read_split(root / "out", s)) for r in t.to_pylist()]
    u5 = [r for r in rows if r["user_id"] == "u005" and r["window_index"] == 0][0]
    assert u5["currency"][-1] == OOV and u5["merchant"][-1] == OOV
    # vocabularies come from training users only
    train_users = set(read_split(root / "out", "train").column("user_id").to_pylist())
    pays = read_raw(root / "raw" / "payments").to_pylist()
    eval_only = {p["merchant_id"] for p in pays if p["user_id"] not in train_users} - {
        p["merchant_id"] for p in pays if p["user_id"] in train_users}
    assert not set(pseudonymise(pa.array(sorted(eval_only)), HASHED_FIELDS["merchant"]).to_pylist()) & set(tok.categorical["merchant"])
    assert tok.fit["train_users"] == len(train_users)


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def test_private_identifiers_never_written(prepared):
    """device_id nowhere; event_id and merchant_id only in the quarantine (for the data owner):
    tokenizer.json holds merchant pseudonyms, which the raw events map to."""
    root, _, _ = prepared
    raw = {s: read_raw(root / "raw" / s) for s in ("payments", "logins", "orders")}
    ids = {v for t in raw.values() for c in ("event_id", "merchant_id") if c in t.column_names
           for v in t.column(c).to_pylist() if v is not None}
    merchants = sorted({v for s in ("payments", "orders") for v in raw[s].column("merchant_id").to_pylist() if v})
    tok = Tokenizer.load(root / "out" / "tokenizer.json")
    ids -= set(tok.to_dict()["fields"])  # the inline world has an event_id "mcc"
    assert len(ids) > 100 and len(tok.categorical["merchant"]) >= 5
    assert set(tok.categorical["merchant"]) <= set(pseudonymise(pa.array(merchants), HASHED_FIELDS["merchant"]).to_pylist())
    n_files = 0
    for f in (root / "out").rglob("*"):
        if f.suffix == ".parquet":
            t = pq.read_table(f)
            assert "device_id" not in t.column_names, f
            values = set(_strings(t.to_pylist()))
        elif f.suffix == ".json":
            values = set(_strings(json.loads(f.read_text())))
        else:
            continue
        n_files += 1
        assert not any(v.startswith("dev-secret-") for v in values), f
        if "quarantine" not in f.parts:
            assert not values & ids, (f, sorted(values & ids)[:5])
    assert n_files >= 5


def test_wrong_schema_fails_clearly_without_output(tmp_path, spark, prep_config):
    raw = write_raw(tmp_path / "raw", payments=[payment("p1", "u1", ts(1))])
    bad = source_table("orders", [order("o1", "u1", ts(1))])
    bad = bad.set_column(bad.schema.get_field_index("amount"), "amount", pa.array(["20.0"]))
    (raw / "orders").mkdir()
    pq.write_table(bad, raw / "orders" / "bad.parquet")
    out = tmp_path / "out"
    with pytest.raises(ContractError, match=r"orders/bad.parquet: column 'amount' \(orders\) has type string; expected double"):
        run_prep(prep_config(raw, out), spark=spark)
    assert not out.exists() and not list(tmp_path.glob("out*"))


def test_missing_and_empty_sources(tmp_path, spark, prep_config, capsys):
    empty = source_table("orders", [])
    raw = write_raw(tmp_path / "raw", logins=[login(f"l{i}", f"u{i}", ts(1 + i)) for i in range(12)], orders=empty)
    m = run_prep(prep_config(raw, tmp_path / "out", val_fraction=0.0, test_fraction=0.0), spark=spark)
    printed = capsys.readouterr().out.splitlines()
    inputs = next(line for line in printed if "inputs:" in line)
    assert "payments none (no Parquet files in payments/)" in inputs and "logins 1 files / 12 rows" in inputs
    # the accounting lines: a missing source is said to be absent, an empty one counts its zero rows
    assert "[plm-prep] payments: absent, nothing to prepare" in printed
    assert "[plm-prep] orders: 0 in = 0 kept + 0 quarantined + 0 duplicates" in printed
    assert "[plm-prep] logins: 12 in = 12 kept + 0 quarantined + 0 duplicates" in printed
    assert m["accounting"]["payments"] == {**m["accounting"]["payments"], "present": False, "input_rows": 0}
    assert m["accounting"]["orders"]["input_rows"] == 0
    assert m["splits"]["train"]["users"] == 12
    assert (tmp_path / "out" / "val").is_dir() and m["splits"]["val"]["shards"] == []


def test_a_cutoff_before_every_event_is_named(tmp_path, spark, prep_config, capsys):
    """cutoff= earlier than every kept event: the error says so (it said every user had hashed
    into val/test); a cutoff inside the data prints how many events it leaves out, per source."""
    raw = write_raw(tmp_path / "raw", logins=[login(f"l{i}", f"u{i}", ts(3 + i)) for i in range(12)])
    with pytest.raises(ValueError, match=r"cutoff=2024-01-02T00:00:00Z: every kept event is at or after it "
                                         r"\(the first is at 2024-01-03T12:00:00Z\); nothing to prepare"):
        run_prep(prep_config(raw, tmp_path / "out", cutoff="2024-01-02T00:00:00Z"), spark=spark)
    assert not (tmp_path / "out").exists()
    assert "12 of 12 kept events are at or after it, left out of the sequences (logins 12)" in capsys.readouterr().out
    m = run_prep(prep_config(raw, tmp_path / "out", cutoff="2024-01-10T00:00:00Z", val_fraction=0.0,
                             test_fraction=0.0), spark=spark)
    assert "[plm-prep] cutoff 2024-01-10T00:00:00Z: 5 of 12 kept events are at or after it, left out of the " \
           "sequences (logins 5)" in capsys.readouterr().out.splitlines()
    assert m["accounting"]["logins"]["after_cutoff_rows"] == 5 and m["splits"]["train"]["users"] == 7


def test_a_source_whose_every_row_is_quarantined_says_why(tmp_path, spark, prep_config, capsys):
    """The accounting line names the quarantine reasons (when nothing is left to prepare, the
    quarantine file is not published, and the log is where the user learns why)."""
    raw = write_raw(tmp_path / "raw", logins=[login(f"l{i}", f"u{i}", ts(1 + i)) for i in range(3)],
                    payments=[payment(f"p{i}", "u1", ts(2), amount=-1.0) for i in range(2)])
    run_prep(prep_config(raw, tmp_path / "out", val_fraction=0.0, test_fraction=0.0), spark=spark)
    printed = capsys.readouterr().out.splitlines()
    assert "[plm-prep] payments: 2 in = 0 kept + 2 quarantined (amount_invalid 2) + 0 duplicates" in printed, printed


def test_out_exists_needs_overwrite(tmp_path, spark, prep_config):
    raw = write_raw(tmp_path / "raw", logins=[login("l1", "u1", ts(1))])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite=true"):
        run_prep(prep_config(raw, tmp_path / "out"), spark=spark)
    assert (tmp_path / "out" / "keep.txt").exists()
    # overwrite=true replaces an earlier plm-prep output only, never other data or a file
    with pytest.raises(FileExistsError, match="holds other data"):
        run_prep(prep_config(raw, tmp_path / "out", overwrite=True), spark=spark)
    assert (tmp_path / "out" / "keep.txt").exists()
    (tmp_path / "afile").write_text("")
    with pytest.raises(FileExistsError, match="is a file"):
        run_prep(prep_config(raw, tmp_path / "afile", overwrite=True), spark=spark)
    # an earlier output with someone's file put in it: refused, not deleted with the output
    run_prep(prep_config(raw, tmp_path / "prep"), spark=spark)
    (tmp_path / "prep" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds files plm-prep did not write \(notes.txt\)"):
        run_prep(prep_config(raw, tmp_path / "prep", overwrite=True), spark=spark)
    assert (tmp_path / "prep" / "notes.txt").read_text() == "mine"
    (tmp_path / "prep" / "notes.txt").unlink()
    run_prep(prep_config(raw, tmp_path / "prep", overwrite=True), spark=spark)  # its own output: replaced


def test_no_input_rows_fails_before_spark(tmp_path, prep_config):
    raw = write_raw(tmp_path / "raw", logins=[])
    with pytest.raises(ValueError, match="every source is missing or empty"):
        run_prep(prep_config(raw, tmp_path / "out"), spark=None)  # would start a session if it got that far
    assert not (tmp_path / "out").exists()


def test_shared_event_ids_are_the_cross_user_conflicts(spark, tmp_path):
    """shared_event_ids: the ids that valid rows of two users share (flag_rows quarantines them as
    conflicting_event_id); not conflicts within one user, not ids whose other row is invalid."""
    from pyspark.sql import functions as F

    from data_prep.transforms import flag_rows, normalize_source, shared_event_ids, valid_rows

    rows = [
        payment("a", "u1", ts(3)), payment("a", "u2", ts(3)),  # two users: shared
        payment("b", "u1", ts(3)), payment("b", "u1", ts(3), amount=11.0),  # one user: the tasks see it
        payment("c", "u1", ts(3)), payment("c", "u2", ts(3), amount=float("nan")),  # the other row is invalid
        payment("d", "u1", ts(3)), payment("d", "u2", None),  # null ts: invalid
        payment("e", "u3", ts(3)), payment("e", "u3", ts(3)),  # an exact replay
        payment("f", "u1", ts(3)), payment("f", "u2", dt.datetime(2200, 1, 1, tzinfo=dt.timezone.utc)),
        payment("g", "u1", ts(3)), payment("g", "u2", ts(4)), payment("g", "u3", ts(5)),  # three users
        payment(None, "u1", ts(3)), payment(None, "u2", ts(3)),
    ]
    pq.write_table(source_table("payments", rows), tmp_path / "p.parquet")
    df = normalize_source(spark.read.parquet(str(tmp_path / "p.parquet")), "payments")
    lo, hi = "2000-01-01T00:00:00Z", "2100-01-01T00:00:00Z"
    got = sorted(r.event_id for r in shared_event_ids(valid_rows(df, "payments", lo, hi)).collect())
    assert got == ["a", "g"]
    flagged = flag_rows(df, "payments", lo, hi).where("reason = 'conflicting_event_id'")
    cross = {r.event_id for r in flagged.groupBy("event_id").agg(F.countDistinct("user_id").alias("n")).collect()
             if r.n > 1}
    assert cross == set(got)  # the same ids the batch job quarantines across users


@pytest.mark.parametrize("collect_limit", [1_000_000, 0])
def test_conflicts_within_and_across_users_in_the_one_shuffle_by_user(tmp_path, spark, prep_config, monkeypatch,
                                                                      collect_limit):
    """plm-prep validates every source in one shuffle by user: conflicting ids within one user
    (the window) and across users (the shared ids, broadcast when few, joined as a frame when
    more than `_COLLECT_IDS`) are quarantined alike; ids are per source (a payment and a login may
    share one); an exact replay of another user's row stays a duplicate."""
    import data_prep.prep as prep

    monkeypatch.setattr(prep, "_COLLECT_IDS", collect_limit)
    pays = [payment(f"p{i}", f"u{i % 4}", ts(1 + i)) for i in range(12)]
    pays += [
        payment("x", "u1", ts(20)), payment("x", "u2", ts(20)),  # two users: both quarantined
        payment("y", "u3", ts(21)), payment("y", "u3", ts(21), amount=11.0),  # one user: both quarantined
        payment("z", "u0", ts(22)), payment("z", "u1", None),  # the other copy is invalid: z kept
        payment("p0", "u0", ts(1)),  # an exact replay
    ]
    logs = [login(f"l{i}", f"u{i % 4}", ts(2 + i)) for i in range(8)] + [login("x", "u3", ts(23))]  # "x" again
    raw = write_raw(tmp_path / "raw", payments=pays, logins=logs)
    m = run_prep(prep_config(raw, tmp_path / "out", val_fraction=0.0, test_fraction=0.0), spark=spark)
    acc = m["accounting"]
    assert acc["payments"]["quarantined_rows"]["conflicting_event_id"] == 4
    assert acc["payments"]["quarantined_rows"]["null_ts"] == 1
    assert acc["payments"]["duplicate_rows"] == 1 and acc["payments"]["kept_rows"] == 13
    assert acc["logins"]["kept_rows"] == 9 and acc["logins"]["quarantined_total"] == 0
    q = pq.read_table(tmp_path / "out" / m["quarantine"]["payments"][0]).to_pylist()
    assert sorted((r["event_id"], r["user_id"]) for r in q if r["reason"] == "conflicting_event_id") == [
        ("x", "u1"), ("x", "u2"), ("y", "u3"), ("y", "u3")]
    assert m["quarantine"]["logins"] == [] and "orders" not in m["quarantine"]
