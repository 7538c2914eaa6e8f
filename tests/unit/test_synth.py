"""The synthetic world (`data_prep.synth`) and its CLI (`plm-synth`): contract, determinism,
planted label signals and decoys, dirty rows, and hydra config validation."""

from __future__ import annotations

import hashlib
import subprocess
from collections import Counter
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import cli

from data_prep.synth import COUNTRIES, DIRTY_KINDS, SynthConfig, generate_world, validate, write_world
from plm.data.schema import RAW_SOURCES, canonical_schema

MINUTE_US = 60 * 1_000_000


@pytest.fixture(scope="module")
def world():
    return generate_world(SynthConfig(out="unused", users=400, seed=3))


def _ts(table: pa.Table) -> np.ndarray:
    return pc.cast(table["ts"], pa.int64()).to_numpy()


def _cutoff_us(world) -> int:
    return int(datetime.fromisoformat(world["meta"]["cutoff"].replace("Z", "+00:00")).timestamp()) * 1_000_000


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _cli(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    return cli("synth", *overrides, cwd=cwd)


def test_tables_follow_the_raw_contract(world, tmp_path):
    for source in RAW_SOURCES:
        assert world[source].schema.equals(canonical_schema(source), check_metadata=False), source
        assert world[source].num_rows > 0
    write_world(world, tmp_path)
    for source in RAW_SOURCES:
        files = sorted((tmp_path / source).glob("*.parquet"))
        assert files and all(pq.read_schema(f).equals(canonical_schema(source), check_metadata=False) for f in files)
    p = world["payments"]
    assert pc.all(pc.greater(p["amount"], 0)).as_py() and pc.all(pc.greater_equal(world["orders"]["n_items"], 1)).as_py()
    card_present = pc.equal(p["channel"], "card_present")
    assert pc.all(pc.is_null(p["device_id"].filter(card_present))).as_py()
    currency_of = {c.code: c.currency for c in COUNTRIES}
    pairs = set(zip(p["country"].to_pylist(), p["currency"].to_pylist()))
    assert all(currency_of[k] == cur for k, cur in pairs if k is not None)
    assert {"INR", "USD"} <= set(p["currency"].to_pylist())


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    def run(seed: int, name: str) -> dict[str, str]:
        write_world(generate_world(SynthConfig(out="", users=60, seed=seed)), tmp_path / name, part_rows=2000)
        return _hashes(tmp_path / name)

    a, b, c = run(5, "a"), run(5, "b"), run(6, "c")
    assert a == b
    assert sum(name.startswith("payments/") for name in a) > 1  # split into parts
    assert a["payments/part-00000.parquet"] != c["payments/part-00000.parquet"]
    assert a["labels.parquet"] != c["labels.parquet"]


def test_events_strictly_before_cutoff_and_rows_unsorted(world):
    cutoff = _cutoff_us(world)
    start = int(datetime.fromisoformat("2024-01-01T00:00:00+00:00").timestamp()) * 1_000_000
    for source in RAW_SOURCES:
        ts = _ts(world[source])
        assert ts.max() < cutoff and ts.min() >= start, source
        assert not np.all(np.diff(ts) >= 0), source  # upstream tables arrive unsorted
        for col in ("event_id", "user_id", "ts"):
            assert world[source][col].null_count == 0


def test_event_ids_unique_across_sources(world):
    ids = pa.chunked_array([world[s]["event_id"].combine_chunks() for s in RAW_SOURCES])
    assert pc.count_distinct(ids).as_py() == len(ids)
    assert world["labels"]["user_id"][0].as_py().startswith("u")


def test_labels_cover_every_user_with_valid_types(world):
    labels = world["labels"]
    assert labels.num_rows == 400 == pc.count_distinct(labels["user_id"]).as_py()
    users_with_events = set(world["payments"]["user_id"].to_pylist())
    assert users_with_events == set(labels["user_id"].to_pylist())
    assert labels.schema.field("segment").type == pa.int32() and labels.schema.field("future_spend").type == pa.float64()
    segment = labels["segment"].to_numpy()
    assert set(segment) == set(range(len(world["meta"]["labels"]["segment"]["classes"])))
    churn, ato = labels["churn"].to_numpy(), labels["ato"].to_numpy()
    assert set(churn) == set(ato) == {0, 1}
    assert 0.1 <= churn.mean() <= 0.3 and 0.02 <= ato.mean() <= 0.09
    spend = labels["future_spend"].to_numpy()
    assert np.isfinite(spend).all() and (spend >= 0).all()
    assert spend[churn == 1].mean() < spend[churn == 0].mean()
    assert world["meta"]["labels"]["ato"]["prevalence"] == pytest.approx(ato.mean(), abs=1e-4)


def test_fading_churners_slow_down_before_the_cutoff(world):
    cutoff = _cutoff_us(world)
    index = {u: i for i, u in enumerate(world["labels"]["user_id"].to_pylist())}
    user = np.array([index[u] for u in world["payments"]["user_id"].to_pylist()])
    age_days = (cutoff - _ts(world["payments"])) / (86_400 * 1_000_000)
    recent = np.bincount(user[age_days < 21], minlength=400)
    before = np.bincount(user[(age_days >= 21) & (age_days < 84)], minlength=400)
    ratio = (recent + 1) / (before / 3 + 1)  # last 3 weeks vs the average 3 weeks before
    churn = world["labels"]["churn"].to_numpy() == 1
    assert np.median(ratio[churn]) < 0.8 * np.median(ratio[~churn])


def _new_device_foreign_logins(world) -> list[tuple[str, int, str]]:
    """(user, ts, device) of logins that are a device's first event and come from abroad
    (abroad = not the user's most frequent payment country)."""
    p, lg = world["payments"], world["logins"]
    seen = Counter(zip(p["user_id"].to_pylist(), p["country"].to_pylist()))
    home = {}
    for (user, country), _ in sorted(seen.items(), key=lambda kv: kv[1]):  # most frequent last
        if country is not None:
            home[user] = country
    first: dict[str, int] = {}
    for dev, t in zip(p["device_id"].to_pylist() + lg["device_id"].to_pylist(), list(_ts(p)) + list(_ts(lg))):
        if dev is not None and t < first.get(dev, 1 << 62):
            first[dev] = t
    rows = zip(lg["user_id"].to_pylist(), _ts(lg), lg["device_id"].to_pylist(), lg["ip_country"].to_pylist())
    return [(u, t, d) for u, t, d, ip in rows if first[d] == t and ip is not None and ip != home[u]]


def test_ato_is_a_new_foreign_device_then_payments_within_minutes_with_decoys(world):
    labels = world["labels"]
    ato = dict(zip(labels["user_id"].to_pylist(), labels["ato"].to_pylist()))
    p = world["payments"]
    pays: dict[str, list[tuple[int, str, float, str]]] = {}
    for u, t, d, a, ch in zip(p["user_id"].to_pylist(), _ts(p), p["device_id"].to_pylist(), p["amount"].to_pylist(), p["channel"].to_pylist()):
        pays.setdefault(u, []).append((t, d, a, ch))
    followed, risky = set(), set()
    for u, t, d in _new_device_foreign_logins(world):
        median = np.median([a for _, _, a, _ in pays[u]])
        soon = [(a, ch) for tp, dp, a, ch in pays[u] if dp == d and t < tp <= t + 20 * MINUTE_US]
        if soon:
            followed.add(u)
        if any(a > 3 * median and ch in ("ecommerce", "p2p") for a, ch in soon):
            risky.add(u)
    victims = {u for u, y in ato.items() if y == 1}
    foreign_new = {u for u, _, _ in _new_device_foreign_logins(world)}
    assert victims and victims <= followed  # every takeover shows the planted order and timing
    assert len(risky & victims) >= 0.75 * len(victims)  # (amounts abroad are in another currency)
    assert len(foreign_new - victims) >= 10  # decoys: new device abroad, no takeover
    assert len(followed - victims) >= 3  # ... some even pay within minutes (small, local)
    assert len(risky - victims) <= 0.02 * (len(ato) - len(victims))


def test_dirty_rows_of_every_kind(tmp_path):
    w = generate_world(SynthConfig(out="", users=80, seed=2, dirty_fraction=0.05))
    meta = w["meta"]
    cutoff = _cutoff_us(w)
    for source in RAW_SOURCES:
        t, counts = w[source], meta["dirty"][source]
        assert set(counts) == set(DIRTY_KINDS[source]) and min(counts.values()) >= 1, source
        assert t.num_rows == meta["events"][source] + sum(counts.values()) == meta["rows"][source]
        assert t["event_id"].null_count == counts["null_event_id"]
        assert t["user_id"].null_count == counts["null_user_id"]
        assert t["ts"].null_count == counts["null_ts"]
        ts = pc.drop_null(pc.cast(t["ts"], pa.int64())).to_numpy()
        assert ((ts < 0.5 * cutoff) | (ts >= cutoff)).sum() == counts["ts_out_of_range"]
        rows = Counter(zip(*(t[c].to_pylist() for c in t.column_names)))
        assert sum(n - 1 for n in rows.values() if n > 1) >= counts["duplicate"]
        ids = Counter(pc.drop_null(t["event_id"]).to_pylist())
        assert sum(n > 1 for n in ids.values()) >= counts["conflicting_event_id"]
    p, o = w["payments"]["amount"].to_numpy(), w["orders"]["amount"].to_numpy()
    assert np.isnan(p).sum() == meta["dirty"]["payments"]["amount_nan"] and np.isinf(p).any()
    assert (p <= 0).sum() == meta["dirty"]["payments"]["amount_zero"] + meta["dirty"]["payments"]["amount_negative"]
    assert (o < 0).sum() == meta["dirty"]["orders"]["amount_negative"]
    assert (w["payments"]["mcc"].to_numpy() > 9999).sum() == meta["dirty"]["payments"]["mcc_invalid"]
    assert (w["orders"]["n_items"].to_numpy() == 0).sum() == meta["dirty"]["orders"]["n_items_zero"]


def test_write_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    w = generate_world(SynthConfig(out="", users=20, seed=0))
    (tmp_path / "payments").mkdir()
    stale = tmp_path / "payments" / "part-00009.parquet"
    stale.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_world(w, tmp_path)
    write_world(w, tmp_path, overwrite=True)
    assert not stale.exists() and (tmp_path / "world.json").exists()
    assert pq.read_table(tmp_path / "labels.parquet").num_rows == 20


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match=r"^users=0 is out of range: must be >= 1$"):
        validate(SynthConfig(out="x", users=0))
    with pytest.raises(ValueError, match=r"^merchants=5 is out of range: must be 0 \(sized from users\) or >= 240 "):
        validate(SynthConfig(out="x", merchants=5))
    with pytest.raises(ValueError, match="home_countries"):
        validate(SynthConfig(out="x", home_countries={"XX": 1.0}))


def test_cli_writes_a_world_through_hydra(tmp_path):
    res = _cli("out=raw", "users=50", "seed=1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "events" in res.stdout and "ato" in res.stdout
    assert pq.read_table(tmp_path / "raw" / "labels.parquet").num_rows == 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # hydra leaves nothing else behind
    again = _cli("out=raw", "users=50", cwd=tmp_path)
    assert again.returncode != 0 and "overwrite" in again.stdout + again.stderr


@pytest.mark.parametrize("override, named", [("users=abc", "users"), ("userz=3", "userz")])
def test_cli_rejects_bad_overrides(tmp_path, override, named):
    res = _cli("out=raw", override, cwd=tmp_path)
    assert res.returncode != 0
    assert named in res.stdout + res.stderr
    assert not (tmp_path / "raw").exists()
