"""Shared fixtures: one local SparkSession per test session, and inline raw-event builders."""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("WANDB_MODE", "offline")

UTC = dt.timezone.utc
BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def cli(tool: str, *args: str, cwd=None, env=None, timeout: int = 120):
    """Run console script `plm-<tool>` (or `python -m plm.cli.<tool>` where it is not installed)
    with hydra overrides `args`; the CompletedProcess (text, stdout/stderr captured)."""
    import subprocess

    script = Path(sys.executable).with_name(f"plm-{tool}")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", f"plm.cli.{tool}"]
    return subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def bench_module(name: str):
    """Generator for a fixture: `bench/<name>.py` (scripts, not a package) imported as module
    `bench_<name>`, unregistered afterwards. `yield from bench_module("prep")`."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def ts(day: int, hour: int = 12, minute: int = 0, second: int = 0) -> dt.datetime:
    """A UTC time in January 2024 (day 1..31)."""
    return dt.datetime(2024, 1, day, hour, minute, second, tzinfo=UTC)


def payment(event_id, user_id, when, amount=10.0, currency="EUR", merchant_id="m1", mcc=5411,
            channel="card_present", status="success", device_id=None, country="DE", **extra):
    return dict(event_id=event_id, user_id=user_id, ts=when, amount=amount, currency=currency,
                merchant_id=merchant_id, mcc=mcc, channel=channel, status=status,
                device_id=device_id, country=country, **extra)


def login(event_id, user_id, when, device_id="d1", ip_country="DE", auth_method="password", success=True, **extra):
    return dict(event_id=event_id, user_id=user_id, ts=when, device_id=device_id,
                ip_country=ip_country, auth_method=auth_method, success=success, **extra)


def order(event_id, user_id, when, merchant_id="m1", amount=20.0, n_items=1, category="books", **extra):
    return dict(event_id=event_id, user_id=user_id, ts=when, merchant_id=merchant_id,
                amount=amount, n_items=n_items, category=category, **extra)


def source_table(source: str, rows: list[dict]) -> pa.Table:
    """Rows -> a table in the contract schema (extra keys become extra columns)."""
    from plm.data.schema import canonical_schema

    schema = canonical_schema(source)
    extra = sorted({k for r in rows for k in r} - set(schema.names))
    cols = {n: pa.array([r.get(n) for r in rows], schema.field(n).type) for n in schema.names}
    for k in extra:
        cols[k] = pa.array([r.get(k) for r in rows])
    return pa.table(cols)


def write_raw(root: Path, labels: pa.Table | None = None, **sources: list[dict] | pa.Table) -> Path:
    """Write RAW/{source}/part-0.parquet for each given source (a list of row dicts or a table)."""
    root.mkdir(parents=True, exist_ok=True)
    for source, rows in sources.items():
        table = rows if isinstance(rows, pa.Table) else source_table(source, rows)
        (root / source).mkdir(exist_ok=True)
        pq.write_table(table, root / source / "part-0.parquet")
    if labels is not None:
        pq.write_table(labels, root / "labels.parquet")
    return root


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op torch thread is faster and immune to OpenMP oversubscription
    when other processes load the machine; the previous setting is restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def spark():
    from data_prep.prep import spark_session
    from plm.config import SparkConfig

    s = spark_session(
        SparkConfig(
            master="local[2]",
            app_name="plm-tests",
            conf={
                "spark.sql.shuffle.partitions": "4",
                "spark.ui.enabled": "false",
                "spark.ui.showConsoleProgress": "false",
                "spark.driver.memory": "2g",
            },
            log_level="ERROR",
        )
    )
    yield s
    s.stop()


@pytest.fixture(scope="session")
def prep_config():
    """Factory: a PrepConfig for tiny data (min_count 1, small bins)."""
    from plm.config import BinsConfig, PrepConfig, VocabConfig

    def make(raw, out, **kw):
        kw.setdefault("vocab", VocabConfig(min_count=1, max_size=1000, max_size_by_field={}))
        kw.setdefault("bins", BinsConfig(n_bins=4, max_sample=1000))
        return PrepConfig(raw=str(raw), out=str(out), **kw)

    return make
