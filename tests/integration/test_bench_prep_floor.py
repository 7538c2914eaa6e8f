"""bench/prep_floor.py: the floor job writes one row per user (null user ids form one group)
holding every one of that user's rows (their non-null values), and main prints the timings as one JSON line."""

import json

import pyarrow.parquet as pq
import pytest
from conftest import bench_module

from data_prep.synth import SynthConfig, generate_world, write_world

pytestmark = [pytest.mark.spark, pytest.mark.slow]


@pytest.fixture(scope="module")
def floor():
    yield from bench_module("prep_floor")


def test_floor_job_lists_every_row_of_every_user(floor, spark, tmp_path, capsys):
    raw = tmp_path / "raw"
    write_world(generate_world(SynthConfig(users=30, seed=5, dirty_fraction=0.05)), raw)
    (raw / "orders").rename(tmp_path / "orders-away")  # a missing source is skipped
    users = floor.floor_job(spark, raw, tmp_path / "out")
    rows = {}
    for source in ("payments", "logins"):
        t = pq.read_table(raw / source, columns=["user_id", "event_id"])
        for u, e in zip(t.column("user_id").to_pylist(), t.column("event_id").to_pylist()):
            rows[u] = rows.get(u, 0) + (e is not None)  # collect_list leaves nulls out
    out = pq.read_table(tmp_path / "out")
    assert users == out.num_rows == len(rows)
    got = dict(zip(out.column("user_id").to_pylist(), (len(x) for x in out.column("event_id").to_pylist())))
    assert got == rows
    assert floor.main(["--raw", str(raw)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["bench"] == "prep_floor" and line["users"] == users and line["fresh_s"] > 0 and line["warm_s"] > 0
