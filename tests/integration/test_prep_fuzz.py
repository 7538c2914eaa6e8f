"""Property-based fuzzing of dirty rows: Spark's flag_rows and the pure-Python clean_source agree
on every row's fate, and the accounting closes."""

import datetime as dt
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import payment, source_table
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_prep import transforms as T
from data_prep.prep import RawFile, read_source
from plm.data.tokenizer import clean_source

pytestmark = [pytest.mark.spark, pytest.mark.slow]

TS_MIN, TS_MAX = "1990-01-01T00:00:00Z", "2030-01-01T00:00:00Z"
UTC = dt.timezone.utc

amounts = st.one_of(
    st.none(), st.just(float("nan")), st.just(float("inf")), st.just(-1.0), st.just(0.0),
    st.floats(min_value=0.01, max_value=1e6, allow_nan=False),
)
times = st.one_of(
    st.none(),
    st.datetimes(min_value=dt.datetime(1980, 1, 1), max_value=dt.datetime(2040, 1, 1), timezones=st.just(UTC)),
)
rows = st.fixed_dictionaries(
    {
        "event_id": st.one_of(st.none(), st.sampled_from(["e1", "e2", "e3", "e4", "e5", "e6"])),
        "user_id": st.one_of(st.none(), st.sampled_from(["u1", "u2", "u3"])),
        "when": times,
        "amount": amounts,
        "mcc": st.one_of(st.none(), st.sampled_from([5411, 12345, -1, 0, 9999])),
        "currency": st.one_of(st.none(), st.sampled_from(["EUR", "USD"])),
    }
)


def _table(draw_rows):
    out = []
    for r in draw_rows:
        out.append(payment(r["event_id"], r["user_id"], r["when"], amount=r["amount"], mcc=r["mcc"], currency=r["currency"]))
    return source_table("payments", out)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(rows, min_size=1, max_size=12).flatmap(lambda rs: st.just(rs + rs[: len(rs) // 3])))
def test_spark_and_python_agree_on_dirty_rows(spark, draw_rows):
    table = _table(draw_rows)
    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "p.parquet")
        pq.write_table(table, path)
        f = RawFile(path, path, table.num_rows, False, ())
        flagged = T.flag_rows(read_source(spark, "payments", [f]), "payments", TS_MIN, TS_MAX).collect()
    spark_status = {}
    for r in flagged:
        key = (r["_status"], r["reason"])
        spark_status[key] = spark_status.get(key, 0) + 1
        if r["_copies"] > 1:
            spark_status[("duplicate", None)] = spark_status.get(("duplicate", None), 0) + r["_copies"] - 1
    kept, q, n_dup = clean_source(table, "payments", TS_MIN, TS_MAX)
    py_status = {("kept", None): kept.num_rows} if kept.num_rows else {}
    if n_dup:
        py_status[("duplicate", None)] = n_dup
    for reason in q.column("reason").to_pylist():
        py_status[("quarantined", reason)] = py_status.get(("quarantined", reason), 0) + 1
    assert spark_status == py_status
    assert sum(spark_status.values()) == table.num_rows  # accounting closes
    spark_kept = sorted((r["event_id"], r["amount"]) for r in flagged if r["_status"] == "kept")
    assert spark_kept == sorted(zip(kept.column("event_id").to_pylist(), kept.column("amount").to_pylist()))
