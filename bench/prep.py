"""Data-prep benchmark: `plm-prep` (Spark, `local[2]`) against a single-node reference.

    .venv/bin/python bench/prep.py            # ~1.5 M events (14,000 users), several minutes
    .venv/bin/python bench/prep.py --quick    # a tiny world, to check the bench itself
    make bench-prep

Generates a synthetic world (`data_prep.synth`, fixed seed, 1% dirty rows), then in the same
run:

* the reference: `reference_prep`, the same transformation on one node with pyarrow/numpy,
  built from the pure-Python twin in `plm.data.tokenizer` (validate + dedupe + quarantine per
  source, union, cut-off, per-user time features, split by user, vocabularies and numeric bins
  fitted on training users, token ids, per-user windows, Parquet shards per split);
* ours: `data_prep.prep.run_prep` in-process with `spark.master=local[2]` and a fresh
  SparkSession (the job's own defaults otherwise).

Events = total input rows (all sources, dirty rows included). Spark events/s is on the job
time without the JVM/session start-up (`manifest["timings"]["spark_start_s"]`, reported
separately); the figure with start-up is printed too. The last line is one JSON object:
`{"bench": "prep", "ours": ..., "reference": ..., "unit": "events/s", "ratio": ours/reference,
"target": 0.33}` (higher is better; the target is the least acceptable ratio).

The reference hashes users into splits exactly like Spark's `xxhash64(salt, user_id)` (with the
`xxhash` package, a dependency of wandb and torch-geometric), so both sides must produce the
same accounting, cut-off, vocabularies, splits and windows; the bench checks that (and, unless
`--no-verify-content`, that every shard row is equal) and warns loudly if not.

It also prints the CPU seconds of both sides (the reference's process; Spark's JVM, start-up
included, plus the Python driver) and how many cores other processes kept busy meanwhile
(from /proc/stat): on a shared machine wall-clock figures swing a lot, CPU seconds much less.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from plm.data.schema import (
    CATEGORICAL_FIELDS,
    EVENT_TYPE_NAME,
    NUMERIC_FIELDS,
    PRIVATE_COLUMNS,
    RAW_SOURCES,
    REASONS,
    SHARD_FORMAT_VERSION,
    SPLITS,
    TS_TYPE,
)
from plm.data.tokenizer import (
    Tokenizer,
    build_windows,
    canonicalize,
    clean_source,
    history_features,
    numeric_spec_from_sample,
    unify,
    vocab_from_counts,
)

TARGET_RATIO = 0.33  # Spark within 3x of the single-node reference
DEFAULT_USERS = 14_000  # ~1.49 M valid events with the default synth rates (+1% dirty rows)
QUICK_USERS = 300
SPARK_SEED = 42  # seed of Spark's xxhash64 (Murmur3/XxHash64 expressions)

# --------------------------------------------------------------------------- split by user


def _spark_xxhash64(parts: list[bytes]) -> int:
    """Spark's `xxhash64(c1, c2, ...)` of string columns: XXH64 of each value in turn, seeded
    with the previous hash (the first with 42); a signed 64-bit result like Spark's."""
    import xxhash

    h = SPARK_SEED
    for p in parts:
        h = xxhash.xxh64_intdigest(p, seed=h & 0xFFFF_FFFF_FFFF_FFFF)
    return h - (1 << 64) if h >= 1 << 63 else h


def split_buckets(user_ids: list[str], salt: str) -> tuple[np.ndarray, str]:
    """Bucket in [0, 1) per user id and the name of the hash used.

    With `xxhash` installed this is exactly `data_prep.transforms.assign_split`'s
    `pmod(xxhash64(salt, user_id), 1e6) / 1e6`, so the reference puts every user in the same
    split as Spark; otherwise a stable blake2b hash (same split sizes in expectation only).
    """
    try:
        import xxhash  # noqa: F401
    except ImportError:
        out = np.empty(len(user_ids), dtype=np.float64)
        for i, u in enumerate(user_ids):
            d = hashlib.blake2b(f"{salt}\x00{u}".encode(), digest_size=8).digest()
            out[i] = (int.from_bytes(d, "little") % 1_000_000) / 1_000_000.0
        return out, "blake2b"
    s = salt.encode()
    return (
        np.array([(_spark_xxhash64([s, u.encode()]) % 1_000_000) / 1_000_000.0 for u in user_ids], np.float64),
        "xxhash64 (as Spark)",
    )


def split_codes(buckets: np.ndarray, val_fraction: float, test_fraction: float) -> np.ndarray:
    """0 = train, 1 = val, 2 = test (indices into `SPLITS`), like `assign_split`."""
    return np.where(buckets < test_fraction, 2, np.where(buckets < test_fraction + val_fraction, 1, 0)).astype(np.int8)


# ------------------------------------------------------------------------------ reference


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _parse_time(value: str) -> dt.datetime:
    t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def _applies(event_type: pa.ChunkedArray, field) -> pa.ChunkedArray:
    return pc.is_in(event_type, value_set=pa.array([EVENT_TYPE_NAME[s] for s in field.sources], pa.string()))


def _source_column(name: str) -> str:
    return "dt_seconds" if name == "log_dt" else name


class _SampleHashes:
    """`pmod(xxhash64(event_id, field), 2^30)` of `data_prep.transforms.numeric_sample`, with the
    per-event first round (XXH64(event_id, seed 42)) computed once for all fields."""

    def __init__(self, event_ids: pa.ChunkedArray):
        self.event_ids = event_ids
        self._seeds: np.ndarray | None = None

    def keep(self, mask: np.ndarray, name: str, frac: float) -> np.ndarray:
        """Which rows of `mask` (a bool mask over the events) the sample keeps."""
        n = int(mask.sum())
        if frac >= 1.0:
            return np.ones(n, dtype=bool)
        try:
            import xxhash
        except ImportError:  # no Spark-identical hash: any deterministic sample of the same size
            return np.random.default_rng(0).random(n) < frac
        if self._seeds is None:
            ids = self.event_ids.to_pylist()
            self._seeds = np.fromiter(
                (xxhash.xxh64_intdigest(e.encode(), seed=SPARK_SEED) for e in ids), np.uint64, len(ids)
            )
        f, hash_ = name.encode(), xxhash.xxh64_intdigest
        h = np.fromiter((hash_(f, seed=s) for s in self._seeds[mask].tolist()), np.uint64, n)
        # pmod(signed, 2^30) == unsigned mod 2^30, as 2^64 is a multiple of 2^30
        return (h & np.uint64((1 << 30) - 1)).astype(np.float64) < frac * float(1 << 30)


def fit_reference_tokenizer(train: pa.Table, cfg, n_train_users: int) -> Tokenizer:
    """Vocabularies (group-by counts + `vocab_from_counts`) and numeric bins
    (`numeric_spec_from_sample`) on training users' events, like `data_prep.prep.fit_tokenizer`."""
    etype = train.column("event_type")
    categorical = {}
    for f in CATEGORICAL_FIELDS:
        col = train.column(_source_column(f.name)).filter(_applies(etype, f)).drop_null()
        vc = pc.value_counts(col)
        counts = dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()))
        cap = cfg.vocab.max_size_by_field.get(f.name, cfg.vocab.max_size)
        categorical[f.name] = vocab_from_counts(counts, cfg.vocab.min_count, cap)
    numeric, n_rows, fractions = {}, {}, {}
    hashes = _SampleHashes(train.column("event_id"))
    for f in NUMERIC_FIELDS:
        col = train.column(_source_column(f.name))
        mask = pc.and_(_applies(etype, f), pc.is_valid(col)).to_numpy(zero_copy_only=False)
        n = int(mask.sum())
        n_rows[f.name] = n
        fractions[f.name] = min(1.0, cfg.bins.max_sample / n) if n else 1.0
        x = col.filter(pa.array(mask)).cast(pa.float64()).to_numpy()
        x = x[hashes.keep(mask, f.name, fractions[f.name])]
        numeric[f.name] = numeric_spec_from_sample(f.name, x, cfg.bins.n_bins)
    fit = {
        "train_users": n_train_users,
        "numeric_rows": n_rows,
        "numeric_sample_fraction": fractions,
        "vocab": dataclasses.asdict(cfg.vocab),
        "bins": dataclasses.asdict(cfg.bins),
    }
    return Tokenizer(categorical=categorical, numeric=numeric, fit=fit)


def _read_source(folder: Path, source: str) -> tuple[pa.Table | None, int]:
    files = sorted(p for p in folder.rglob("*.parquet") if not any(x.startswith(("_", ".")) for x in p.parts[-1:]))
    if not files:
        return None, 0
    cols = [c.name for c in RAW_SOURCES[source]]
    parts = [canonicalize(pq.read_table(p, columns=cols), source) for p in files]
    table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
    return table, table.num_rows


def reference_prep(raw_dir, out_dir, cfg) -> dict:
    """Single-node (pyarrow/numpy) twin of `data_prep.prep.run_prep` on a local raw folder.

    `cfg` is a `plm.config.PrepConfig` (its `raw`, `out` and `spark` are ignored). Writes
    `out_dir/{tokenizer.json, quarantine/<source>/part-00000.parquet, <split>/part-NNNNN.parquet,
    stats.json}` and returns the stats: `events_in`, per-source `accounting` (as in the
    manifest), `cutoff`, `splits` ({users, windows, events, shards}), `vocab_sizes`,
    `split_hash` and per-phase `timings`.
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    raw, out = Path(raw_dir), Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    now = dt.datetime.now(dt.timezone.utc)
    ts_min = _iso(_parse_time(cfg.ts_min))
    ts_max = _iso(_parse_time(cfg.ts_max) if cfg.ts_max else now + dt.timedelta(days=1))

    # 1. read, validate, quarantine, dedupe (per source)
    t = time.perf_counter()
    kept: dict[str, pa.Table] = {}
    accounting: dict[str, dict] = {}
    for source, cols in RAW_SOURCES.items():
        table, n_in = _read_source(raw / source, source)
        acc = {"input_rows": n_in, "present": table is not None}
        accounting[source] = acc
        if table is None:
            acc.update(kept_rows=0, duplicate_rows=0, quarantined_total=0, quarantined_rows=dict.fromkeys(REASONS, 0))
            continue
        k, q, n_dup = clean_source(table, source, ts_min, ts_max)
        reasons = pc.value_counts(q.column("reason")) if q.num_rows else None
        by_reason = dict(zip(reasons.field("values").to_pylist(), reasons.field("counts").to_pylist())) if reasons else {}
        acc.update(
            kept_rows=k.num_rows,
            duplicate_rows=n_dup,
            quarantined_total=q.num_rows,
            quarantined_rows={r: by_reason.get(r, 0) for r in REASONS},
        )
        if n_in != k.num_rows + q.num_rows + n_dup:
            raise RuntimeError(f"reference: accounting does not close for {source}: {acc}")
        if q.num_rows:
            public = [c.name for c in cols if c.name not in PRIVATE_COLUMNS]
            qdir = out / "quarantine" / source
            qdir.mkdir(parents=True)
            q = q.select([*public, "reason"])
            q = q.sort_by([(c, "ascending") for c in ("reason", *public)])  # a total order, like Spark
            pq.write_table(q, qdir / "part-00000.parquet")
        if k.num_rows:
            kept[source] = k
    timings["validate_s"] = time.perf_counter() - t
    if not kept:
        raise ValueError(f"reference: no valid events in {raw}")

    # 2. union, cut-off, per-user features, split
    t = time.perf_counter()
    events = unify(kept)
    del kept
    ts_us = events.column("ts").cast(pa.int64())
    if cfg.cutoff:
        cutoff_dt = _parse_time(cfg.cutoff)
    else:
        last = pc.max(ts_us).as_py()
        cutoff_dt = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(microseconds=last + 1)
    cutoff = _iso(cutoff_dt)
    cutoff_us = int(pa.scalar(cutoff_dt, TS_TYPE).cast(pa.int64()).as_py())
    in_window = pc.less(ts_us, cutoff_us)
    after = pc.value_counts(events.column("event_type").filter(pc.invert(in_window)))
    after = dict(zip(after.field("values").to_pylist(), after.field("counts").to_pylist()))
    for source, acc in accounting.items():
        acc["after_cutoff_rows"] = after.get(EVENT_TYPE_NAME[source], 0)
        acc["sequence_rows"] = acc["kept_rows"] - acc["after_cutoff_rows"]
    events = history_features(events.filter(in_window))  # sorted by (user, ts, source, event_id)
    users = pc.unique(events.column("user_id")) if events.num_rows else pa.array([], pa.string())
    buckets, split_hash = split_buckets(users.to_pylist(), cfg.split_salt)
    user_split = split_codes(buckets, cfg.val_fraction, cfg.test_fraction)
    event_split = user_split[pc.index_in(events.column("user_id"), value_set=users).to_numpy(zero_copy_only=False)]
    n_train_users = int((user_split == 0).sum())
    if n_train_users == 0:
        raise ValueError("reference: no training users")
    timings["features_s"] = time.perf_counter() - t

    # 3. fit the tokenizer on training users only
    t = time.perf_counter()
    tokenizer = fit_reference_tokenizer(events.filter(pa.array(event_split == 0)), cfg, n_train_users)
    (out / "tokenizer.json").write_text(json.dumps(tokenizer.to_dict(), indent=1, sort_keys=True))
    timings["fit_tokenizer_s"] = time.perf_counter() - t

    # 4. tokenise, window, write shards per split
    t = time.perf_counter()
    windows = build_windows(events, tokenizer.encode_events(events), cfg.max_events, cfg.stride)
    del events
    win_split = user_split[pc.index_in(windows.column("user_id"), value_set=users).to_numpy(zero_copy_only=False)]
    windows = windows.add_column(1, "split", pa.array(np.asarray(SPLITS, dtype=object)[win_split], pa.string()))
    splits = {}
    for code, split in enumerate(SPLITS):
        part = windows.filter(pa.array(win_split == code))  # already ordered by (user_id, window_index)
        n_windows = part.num_rows
        sdir = out / split
        sdir.mkdir()
        shards = []
        if n_windows:
            n_shards = max(1, math.ceil(n_windows / cfg.rows_per_shard))
            bounds = np.linspace(0, n_windows, n_shards + 1).round().astype(int)
            for i in range(n_shards):
                name = f"part-{i:05d}.parquet"
                pq.write_table(part.slice(bounds[i], bounds[i + 1] - bounds[i]), sdir / name, compression="snappy")
                shards.append({"path": f"{split}/{name}", "rows": int(bounds[i + 1] - bounds[i])})
        first = pc.equal(part.column("window_index"), 0)
        splits[split] = {
            "users": int(pc.sum(first).as_py() or 0),
            "windows": n_windows,
            "events": int(pc.sum(part.column("history_len").filter(first)).as_py() or 0),
            "shards": shards,
        }
    timings["tokenize_write_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start
    stats = {
        "format_version": SHARD_FORMAT_VERSION,
        "producer": {"job": "bench/prep.py reference_prep (pyarrow/numpy)"},
        "events_in": sum(a["input_rows"] for a in accounting.values()),
        "accounting": accounting,
        "cutoff": cutoff,
        "ts_window": {"min": ts_min, "max": ts_max},
        "splits": splits,
        "split_hash": split_hash,
        "vocab_sizes": tokenizer.vocab_sizes(),
        "shard_columns": windows.column_names,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True))
    return stats


# ----------------------------------------------------------------------------- comparison


def compare(manifest: dict, stats: dict, spark_out: Path, ref_out: Path, content: bool) -> list[str]:
    """Differences between the Spark job's outputs and the reference's (empty = agree)."""
    problems = []
    tot = {k: (sum(s[k] for s in manifest["splits"].values()), sum(s[k] for s in stats["splits"].values()))
           for k in ("users", "events", "windows")}
    for k in ("users", "events"):
        if tot[k][0] != tot[k][1]:
            problems.append(f"total {k}: spark {tot[k][0]:,} != reference {tot[k][1]:,}")
    if stats["split_hash"].startswith("xxhash64"):  # same splits: everything else must match too
        if tot["windows"][0] != tot["windows"][1]:
            problems.append(f"total windows: spark {tot['windows'][0]:,} != reference {tot['windows'][1]:,}")
        if manifest["cutoff"] != stats["cutoff"]:
            problems.append(f"cutoff: spark {manifest['cutoff']} != reference {stats['cutoff']}")
        for source, acc in manifest["accounting"].items():
            ref = stats["accounting"][source]
            for key in ("input_rows", "kept_rows", "duplicate_rows", "quarantined_rows", "sequence_rows"):
                if acc.get(key) != ref.get(key):
                    problems.append(f"{source} {key}: spark {acc.get(key)} != reference {ref.get(key)}")
        for split in SPLITS:
            a, b = manifest["splits"][split], stats["splits"][split]
            for key in ("users", "windows", "events"):
                if a[key] != b[key]:
                    problems.append(f"{split} {key}: spark {a[key]:,} != reference {b[key]:,}")
        tok_s = json.loads((spark_out / "tokenizer.json").read_text())
        tok_r = json.loads((ref_out / "tokenizer.json").read_text())
        for kind in ("categorical", "numeric"):
            for name, v in tok_s[kind].items():
                if v != tok_r[kind][name]:
                    problems.append(f"tokenizer {kind} {name}: spark and reference differ")
        if content and not problems:
            problems += compare_shards(spark_out, ref_out)
    return problems


def compare_shards(spark_out: Path, ref_out: Path) -> list[str]:
    """Row-by-row comparison of every split (ids exact; standardised values to 1e-5)."""
    problems = []
    for split in SPLITS:
        tables = []
        for root in (spark_out, ref_out):
            files = sorted((root / split).glob("*.parquet"))
            if not files:
                tables.append(None)
                continue
            t = pa.concat_tables([pq.read_table(f) for f in files])
            tables.append(t.sort_by([("user_id", "ascending"), ("window_index", "ascending")]))
        a, b = tables
        if a is None or b is None:
            if (a is None) != (b is None):
                problems.append(f"{split}: only one side wrote shards")
            continue
        if a.column_names != b.column_names:
            problems.append(f"{split}: columns differ: {a.column_names} vs {b.column_names}")
            continue
        for name in a.column_names:
            x, y = a.column(name).combine_chunks(), b.column(name).combine_chunks()
            if name.endswith("_value"):
                xo, yo = pc.list_flatten(x).to_numpy(), pc.list_flatten(y).to_numpy()
                same = x.value_lengths().equals(y.value_lengths()) and np.allclose(xo, yo, rtol=1e-5, atol=1e-5)
            else:
                same = x.cast(y.type).equals(y)
            if not same:
                problems.append(f"{split}: column {name} differs")
    return problems


# ------------------------------------------------------------------------------------ main


def _jvm_cpu_seconds() -> float | None:
    """CPU seconds (user + system, all threads, since launch) of PySpark's JVM; None if unknown
    (no JVM yet, or no /proc)."""
    try:
        from pyspark import SparkContext

        if SparkContext._gateway is None:
            return None
        pid = SparkContext._gateway.jvm.java.lang.ProcessHandle.current().pid()
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    except Exception:
        return None


def _machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy (all cores, all processes), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            cpu = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return (sum(cpu) - cpu[3] - cpu[4]) / os.sysconf("SC_CLK_TCK")
    except Exception:
        return None


def _others(busy0: float | None, busy1: float | None, ours: float | None, wall: float) -> float | None:
    """Average number of cores other processes kept busy during `wall` seconds."""
    if busy0 is None or busy1 is None or ours is None:
        return None
    return max(0.0, (busy1 - busy0) - ours) / wall


def _fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=None, help=f"users in the world (default {DEFAULT_USERS:,}: ~1.5 M events)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dirty", type=float, default=0.01, help="dirty_fraction of the world (invalid + duplicate rows)")
    ap.add_argument("--quick", action="store_true", help=f"tiny world ({QUICK_USERS} users) to check the bench")
    ap.add_argument("--keep", metavar="DIR", help="keep the world and both outputs in DIR (default: a temp dir, removed)")
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE", help="extra Spark setting (repeatable)")
    ap.add_argument("--no-verify-content", action="store_true", help="compare counts/vocabularies only, not every row")
    args = ap.parse_args(argv)
    users = args.users or (QUICK_USERS if args.quick else DEFAULT_USERS)

    from data_prep.synth import SynthConfig, generate_world, write_world
    from plm.config import PrepConfig, SparkConfig

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="plm-bench-prep-"))
    root.mkdir(parents=True, exist_ok=True)
    raw, spark_out, ref_out = root / "raw", root / "spark_out", root / "reference_out"
    try:
        t = time.perf_counter()
        world = generate_world(SynthConfig(users=users, seed=args.seed, dirty_fraction=args.dirty))
        write_world(world, raw, overwrite=True)
        rows = {s: world[s].num_rows for s in RAW_SOURCES}
        del world
        gc.collect()
        events = sum(rows.values())
        print(
            f"world: {users:,} users, seed {args.seed}, dirty {args.dirty}: {events:,} input rows ("
            + ", ".join(f"{s} {n:,}" for s, n in rows.items())
            + f") in {time.perf_counter() - t:.1f}s -> {raw}",
            flush=True,
        )

        conf = {"spark.ui.showConsoleProgress": "false"}
        for kv in args.conf:
            k, _, v = kv.partition("=")
            conf[k] = v
        cfg = PrepConfig(
            raw=str(raw), out=str(spark_out), overwrite=True, spark=SparkConfig(master=args.master, conf=conf)
        )

        print("reference (pyarrow/numpy, one process) ...", flush=True)
        busy0, t, c = _machine_busy_seconds(), time.perf_counter(), time.process_time()
        stats = reference_prep(raw, ref_out, cfg)
        ref_s, ref_cpu = time.perf_counter() - t, time.process_time() - c
        ref_others = _others(busy0, _machine_busy_seconds(), ref_cpu, ref_s)
        gc.collect()

        print(f"plm-prep (Spark, {args.master}) ...", flush=True)
        from data_prep.prep import run_prep

        jvm0 = _jvm_cpu_seconds() or 0.0  # 0: the job launches the JVM itself
        busy0, t, c = _machine_busy_seconds(), time.perf_counter(), time.process_time()
        manifest = run_prep(cfg)
        spark_wall, driver_cpu = time.perf_counter() - t, time.process_time() - c
        jvm_cpu = _jvm_cpu_seconds()
        jvm_cpu = None if jvm_cpu is None else jvm_cpu - jvm0
        spark_cpu = None if jvm_cpu is None else jvm_cpu + driver_cpu
        spark_others = _others(busy0, _machine_busy_seconds(), spark_cpu, spark_wall)
        start_s = manifest["timings"]["spark_start_s"]
        spark_job = spark_wall - start_s

        problems = compare(manifest, stats, spark_out, ref_out, content=not args.no_verify_content)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    ours, ref_rate = events / spark_job, events / ref_s
    ratio = ours / ref_rate
    w = 44
    print()
    print(f"== bench prep: {events:,} input events, {args.master}, {os.cpu_count()} CPUs ==")
    print(f"{'':{w}} {'seconds':>9} {'events/s':>12}")
    print(f"{'reference (pyarrow/numpy, single node)':{w}} {ref_s:9.2f} {_fmt_rate(ref_rate):>12}")
    print(f"{'plm-prep Spark, job without start-up':{w}} {spark_job:9.2f} {_fmt_rate(ours):>12}")
    print(f"{'plm-prep Spark, with JVM/session start-up':{w}} {spark_wall:9.2f} {_fmt_rate(events / spark_wall):>12}")
    print(f"{'  JVM/session start-up (spark_start_s)':{w}} {start_s:9.2f}")
    print(f"ratio ours/reference = {ratio:.3f} (target >= {TARGET_RATIO}: {'met' if ratio >= TARGET_RATIO else 'MISSED'})")
    # CPU time hardly depends on what else the machine runs: the check on a busy machine.
    print(f"CPU seconds: reference {ref_cpu:.1f}", end="")
    if spark_cpu is not None:
        print(
            f", Spark {spark_cpu:.1f} (JVM {jvm_cpu:.1f} incl. start-up, Python driver {driver_cpu:.1f});"
            f" Spark uses {spark_cpu / max(ref_cpu, 1e-9):.1f}x the reference's CPU"
        )
    else:
        print(f", Spark Python driver {driver_cpu:.1f} (JVM CPU unknown)")
    if ref_others is not None and spark_others is not None:
        print(f"other processes kept {ref_others:.2f} cores busy during the reference, {spark_others:.2f} during Spark", end="")
        print(" (a busy machine: the figures are noisy)" if max(ref_others, spark_others) > 0.25 else "")
    print()
    print("per phase (s)            spark  reference")
    ref_t = stats["timings"]
    for k in ("spark_start_s", "validate_s", "features_s", "fit_tokenizer_s", "tokenize_write_s", "total_s"):
        sp = manifest["timings"].get(k)
        print(f"  {k:20} {sp if sp is not None else float('nan'):8.2f} {ref_t.get(k, float('nan')):10.2f}")
    print()
    print("outputs                 spark      reference")
    for split in SPLITS:
        a, b = manifest["splits"][split], stats["splits"][split]
        print(f"  {split:5} users   {a['users']:>12,} {b['users']:>12,}")
        print(f"  {split:5} windows {a['windows']:>12,} {b['windows']:>12,}")
        print(f"  {split:5} events  {a['events']:>12,} {b['events']:>12,}")
    for k in ("users", "events"):
        a = sum(s[k] for s in manifest["splits"].values())
        b = sum(s[k] for s in stats["splits"].values())
        print(f"  total {k:7} {a:>12,} {b:>12,}")
    print(f"  split hash of the reference: {stats['split_hash']}")
    if problems:
        print("\n" + "!" * 78, file=sys.stderr)
        print("WARNING: Spark and the reference DISAGREE:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        print("!" * 78 + "\n", file=sys.stderr, flush=True)
    else:
        what = "counts, vocabularies" + ("" if args.no_verify_content else " and every shard row")
        print(f"  check: Spark and the reference agree ({what})")
    print(
        json.dumps(
            {
                "bench": "prep",
                "ours": round(ours, 1),
                "reference": round(ref_rate, 1),
                "unit": "events/s",
                "ratio": round(ratio, 4),
                "target": TARGET_RATIO,
            }
        ),
        flush=True,
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
