"""`plm-prep`: raw payment/login/order events -> tokenised per-user sequences (Spark).

Reads `RAW/{payments,logins,orders}/*.parquet` (each optional) and `RAW/labels.parquet`
(optional), writes `OUT/` per `docs/data-contracts.md`:

    OUT/manifest.json      config, inputs and row counts, per-source accounting, cut-off, splits, shards
    OUT/tokenizer.json     vocabularies and bin edges (fitted on training users only)
    OUT/{train,val,test}/part-00000.parquet ...   one row per window of one user's events
    OUT/quarantine/{source}/part-00000.parquet    invalid rows with a `reason` column

Every input file's schema is checked before Spark starts; a violation stops the job with an
error naming the file, the column and the expected type, and nothing is written. Outputs are
written to a staging folder beside OUT and moved into place only when the job succeeds.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.parquet as pq

from data_prep import transforms as T
from data_prep.storage import Location, finalize_spark_output
from plm.data.schema import (
    CATEGORICAL_FIELDS,
    NUMERIC_FIELDS,
    PRIVATE_COLUMNS,
    RAW_SOURCES,
    REASONS,
    SHARD_FORMAT_VERSION,
    SPLITS,
    ContractError,
    check_file_schema,
)
from plm.data.tokenizer import Tokenizer, TokenizerFormatError, numeric_spec_from_sample

# Performance defaults (a user's spark.conf overrides them). JVM settings only take effect when
# this process starts the JVM (local mode, client mode), not for a session that already runs.
DEFAULT_SPARK_CONF = {
    # Spark generates one big Java method per plan stage; HotSpot leaves methods above 8,000
    # bytes of bytecode interpreted, which the tokenizer's and validation's stages exceed:
    # tokenising 630k events took 12 s instead of 3 s on 2 cores. Executors need it too.
    "spark.driver.extraJavaOptions": "-XX:-DontCompileHugeMethods",
    "spark.executor.extraJavaOptions": "-XX:-DontCompileHugeMethods",
    # In local mode the driver JVM does all the work: 1g (Spark's default) spent ~18% of task
    # time in GC on the bench's 1.5 M events.
    "spark.driver.memory": "3g",
    # The tokenised frames have more columns than the 25 Spark prints before warning once per
    # job that it truncated a plan's text (a log line a user cannot act on)
    "spark.sql.debug.maxToStringFields": "200",
}

# Spark settings PLM relies on (a user's spark.conf overrides the rest, not these).
# What a plm-prep output folder holds (overwrite=true deletes a folder of these names only)
PREP_OUTPUTS = ("manifest.json", "tokenizer.json", "train", "val", "test", "quarantine", "_SUCCESS")

REQUIRED_SPARK_CONF = {
    "spark.sql.session.timeZone": "UTC",
    # Parquet INT64 TIMESTAMP(NANOS) columns are read as longs and converted in normalize_source.
    "spark.sql.legacy.parquet.nanosAsLong": "true",
    # Timestamps written as INT64 microseconds (UTC-adjusted), not the legacy INT96.
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
    # Column names as the contract spells them: an extra column that differs from a contract
    # column only in case (`AMOUNT` beside `amount`) is an extra column, ignored; Spark's default
    # resolution failed the read ("[COLUMN_ALREADY_EXISTS] amount").
    "spark.sql.caseSensitive": "true",
}


def log(msg: str) -> None:
    print(f"[plm-prep] {msg}", flush=True)


# --------------------------------------------------------------------------------- inputs


@dataclass
class RawFile:
    path: str  # inside the filesystem
    uri: str  # for Spark
    rows: int
    ts_is_nanos: bool
    signature: tuple  # contract columns' physical types (files read together by Spark)


def discover_inputs(raw: Location) -> tuple[dict[str, list[RawFile]], Location | None]:
    """List each source's Parquet files and check every file's schema against the contract.

    Raises ContractError (file, column, expected type) on the first violation. A missing or
    empty source folder is allowed (no files). Extra columns are ignored.
    """
    if not raw.is_dir():
        raise ContractError(f"raw folder {raw.uri} does not exist or is not a folder")
    found: dict[str, list[RawFile]] = {}
    for source, cols in RAW_SOURCES.items():
        loc = raw.child(source)
        files = []
        for path in loc.list_files(".parquet"):
            try:
                with loc.fs.open_input_file(path) as f:
                    pf = pq.ParquetFile(f)
                    schema, rows = pf.schema_arrow, pf.metadata.num_rows
            except Exception as e:  # unreadable footer: name the file
                raise ContractError(f"{loc.uri_of(path)}: not a readable Parquet file ({e})") from e
            check_file_schema(source, loc.uri_of(path), schema)
            ts_type = schema.field("ts").type
            sig = tuple((c.name, str(schema.field(c.name).type)) for c in cols)
            files.append(RawFile(path, loc.uri_of(path), rows, ts_type.unit == "ns", sig))
        found[source] = files
    labels = raw.child("labels.parquet")
    if labels.exists():
        with labels.fs.open_input_file(labels.path) as f:
            schema = pq.ParquetFile(f).schema_arrow
        idx = schema.get_field_index("user_id")
        if idx < 0 or str(schema.field(idx).type) not in ("string", "large_string"):
            raise ContractError(f"{labels.uri}: labels need a string column 'user_id'")
        return found, labels
    return found, None


def read_source(spark, source: str, files: list[RawFile]):
    """One DataFrame of a source's files in canonical columns (files grouped by physical schema)."""
    groups: dict[tuple, list[RawFile]] = defaultdict(list)
    for f in files:
        groups[f.signature].append(f)
    df = None
    for sig in sorted(groups):
        group = groups[sig]
        part = T.normalize_source(spark.read.parquet(*[f.uri for f in group]), source, group[0].ts_is_nanos)
        df = part if df is None else df.unionByName(part)
    return df


# ---------------------------------------------------------------------------------- spark


# log4j2 configuration of a JVM that plm-prep starts in local mode (see the file's header)
LOCAL_LOG4J = Path(__file__).with_name("log4j2-local.properties")


def session_conf(spark_cfg) -> dict[str, str]:
    """The settings `spark_session` builds a session with: the job's defaults, then the user's
    `spark.conf`, then `REQUIRED_SPARK_CONF`.

    In local mode (`master` local, local[N], local[*]) the driver JVM also gets PLM's log4j2
    configuration (`LOCAL_LOG4J`: Spark's defaults at WARN, without the native-hadoop warning and
    the start-up banner lines) unless the user sets `spark.driver.extraJavaOptions` (then theirs
    is used as is). A cluster's driver keeps the cluster's logging."""
    # Spark's console progress bar redraws one line with carriage returns: on a terminal it is the
    # job's progress bar; in a log file or CI it is a run-on line, so it is off there (a user conf wins)
    console = {"spark.ui.showConsoleProgress": str(sys.stderr.isatty()).lower()}
    defaults = dict(DEFAULT_SPARK_CONF)
    if is_local(spark_cfg.master):
        key = "spark.driver.extraJavaOptions"
        defaults[key] = f"{defaults[key]} -Dlog4j2.configurationFile={LOCAL_LOG4J.as_uri()}"
    return {k: str(v) for k, v in {**defaults, **console, **spark_cfg.conf, **REQUIRED_SPARK_CONF}.items()}


def is_local(master: str) -> bool:
    return master == "local" or master.startswith("local[")


def spark_session(spark_cfg):
    """Get or create the SparkSession described by `SparkConfig` (master, conf, log level)."""
    from pyspark.sql import SparkSession

    if is_local(spark_cfg.master):
        # Local mode needs no network address: without this Spark looks one up, warns twice that
        # the host name resolves to loopback, and binds to the first interface (a user's
        # SPARK_LOCAL_IP wins). Read by the JVM this process starts, not by a running one.
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        # Python workers (plm.export.spark's mapInArrow) run this interpreter, which has PLM,
        # not whatever `python3` is first on PATH (PySpark's default; a user's setting wins).
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.master(spark_cfg.master).appName(spark_cfg.app_name)
    for k, v in session_conf(spark_cfg).items():
        builder = builder.config(k, v)
    try:
        spark = builder.getOrCreate()
    except Exception as e:  # noqa: BLE001 - a py4j error from deep in the JVM: say what failed
        first = next((ln.strip(": ") for ln in str(e).splitlines() if ln.strip(": ")), type(e).__name__)
        raise ConnectionError(
            f"Spark could not start a session with spark.master={spark_cfg.master!r} ({first[:200]}): check the "
            "master URL, that Java 17+ runs here (java -version, JAVA_HOME) and that the cluster answers; "
            "Spark's log lines above say why ('local[*]' needs no cluster)"
        ) from None
    spark.sparkContext.setLogLevel(spark_cfg.log_level)
    # py4j logs its connection life at INFO, which reaches the CLI's root handler: a stray
    # "Closing down clientserver connection" after the job's last line, and at interpreter exit
    # a logging traceback when that stream is already closed (pytest)
    logging.getLogger("py4j").setLevel(logging.WARNING)
    for k, v in {**spark_cfg.conf, **REQUIRED_SPARK_CONF}.items():
        try:  # a reused session (tests, notebooks) gets the runtime settings too
            spark.conf.set(k, str(v))
        except Exception:  # static settings of an existing session cannot change
            pass
    return spark


# -------------------------------------------------------------------------------- the job


def accounting_line(source: str, acc: dict) -> str:
    """One source's accounting as plm-prep logs it (plm-export raw= too): `payments: 500 in = 480
    kept + 20 quarantined (amount_invalid 12, null_ts 8) + 0 duplicates`."""
    order = {r: i for i, r in enumerate(REASONS)}
    reasons = ", ".join(f"{r} {n:,}" for r, n in sorted(acc["quarantined_rows"].items(), key=lambda x: order.get(x[0], 99))
                        if n)
    return (f"{source}: {acc['input_rows']:,} in = {acc['kept_rows']:,} kept + {acc['quarantined_total']:,} quarantined"
            + (f" ({reasons})" if reasons else "") + f" + {acc['duplicate_rows']:,} duplicates")


def _iso(ts: dt.datetime) -> str:
    return ts.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _iso_us(us: int) -> str:
    """Epoch microseconds -> ISO UTC time (exact: no float seconds)."""
    return _iso(dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(microseconds=us))


def _parse_time(value: str, what: str) -> dt.datetime:
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as e:
        raise ValueError(f"{what}={value!r} is not an ISO time (e.g. 2024-07-01T00:00:00Z)") from e
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def check_config(cfg) -> None:
    """Reject bad values with a message naming the key (before any work)."""
    if not 0 <= cfg.val_fraction < 1 or not 0 <= cfg.test_fraction < 1 or cfg.val_fraction + cfg.test_fraction >= 1:
        raise ValueError(f"val_fraction={cfg.val_fraction}, test_fraction={cfg.test_fraction}: each in [0, 1), sum < 1")
    if cfg.max_events < 1:
        raise ValueError(f"max_events={cfg.max_events} must be >= 1")
    if not 0 < cfg.stride <= cfg.max_events:
        raise ValueError(f"stride={cfg.stride} must be in 1..max_events ({cfg.max_events})")
    if cfg.rows_per_shard < 1:
        raise ValueError(f"rows_per_shard={cfg.rows_per_shard} must be >= 1")
    if cfg.vocab.min_count < 1 or cfg.vocab.max_size < 1:
        raise ValueError("vocab.min_count and vocab.max_size must be >= 1")
    unknown = set(cfg.vocab.max_size_by_field) - {f.name for f in CATEGORICAL_FIELDS}
    if unknown:
        raise ValueError(f"vocab.max_size_by_field names unknown fields {sorted(unknown)}")
    if cfg.bins.n_bins < 2 or cfg.bins.max_sample < 100:
        raise ValueError("bins.n_bins must be >= 2 and bins.max_sample >= 100")
    for key in ("cutoff", "ts_min", "ts_max"):
        if getattr(cfg, key) is not None:
            _parse_time(getattr(cfg, key), key)
    if cfg.tokenizer:  # nothing is fitted: fitting settings would be recorded but have no effect
        from dataclasses import asdict, fields

        from plm.config import BinsConfig, VocabConfig

        changed = [f"{group}.{f.name}" for group, default in (("vocab", VocabConfig()), ("bins", BinsConfig()))
                   for f in fields(default) if asdict(getattr(cfg, group))[f.name] != asdict(default)[f.name]]
        if changed:
            raise ValueError(f"{', '.join(changed)} set with tokenizer={cfg.tokenizer}: they fit a tokenizer, and "
                             "tokenizer= applies an existing one unchanged; drop them (or drop tokenizer= to fit anew)")


def fit_tokenizer(train_events, cfg, n_train_users: int) -> Tokenizer:
    """Vocabularies and numeric bins from training users' events only."""
    caps = {f.name: cfg.vocab.max_size_by_field.get(f.name, cfg.vocab.max_size) for f in CATEGORICAL_FIELDS}
    rows = T.categorical_counts(train_events, cfg.vocab.min_count, caps).collect()
    ranked: dict[str, list[tuple[int, str]]] = {f.name: [] for f in CATEGORICAL_FIELDS}
    for r in rows:
        ranked[r["field"]].append((r["rank"], r["value"]))
    categorical = {k: [v for _, v in sorted(vals)] for k, vals in ranked.items()}

    counts = T.numeric_counts(train_events).collect()[0].asDict()
    fractions = {k: min(1.0, cfg.bins.max_sample / n) if n else 1.0 for k, n in counts.items()}
    sample = T.numeric_sample(train_events, fractions).toArrow()
    fields = sample.column("field").to_numpy(zero_copy_only=False)
    xs = sample.column("x").to_numpy(zero_copy_only=False)
    numeric = {
        f.name: numeric_spec_from_sample(f.name, xs[fields == f.name], cfg.bins.n_bins) for f in NUMERIC_FIELDS
    }
    fit = {
        "train_users": n_train_users,
        "numeric_rows": counts,
        "numeric_sample_fraction": fractions,
        "vocab": asdict(cfg.vocab),
        "bins": asdict(cfg.bins),
    }
    return Tokenizer(categorical=categorical, numeric=numeric, fit=fit)


def load_tokenizer(path: str) -> tuple[Tokenizer, str]:
    """`tokenizer=`: a tokenizer.json, or a plm-prep output folder holding one -> (tokenizer, uri)."""
    loc = Location.of(path)
    if loc.is_dir():
        loc = loc.child("tokenizer.json")
    if not loc.exists():
        raise FileNotFoundError(f"tokenizer={path}: no tokenizer.json there")
    try:
        return Tokenizer.from_dict(loc.read_json()), loc.uri
    except TokenizerFormatError as e:
        raise ValueError(f"tokenizer={path}: {e}") from e
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"tokenizer={path}: not a plm-prep tokenizer.json ({type(e).__name__}: {e})") from e


def split_stats(events, max_events: int, stride: int) -> dict[str, dict]:
    """{split: {users, windows, events}} from per-user event counts (one small aggregation;
    the window count per user follows from its history length, see `T.build_windows`)."""
    from pyspark.sql import functions as F

    n = F.col("n")
    n_windows = F.when(n <= max_events, F.lit(1)).otherwise(F.lit(1) + F.ceil((n - F.lit(max_events)) / F.lit(stride)))
    per_user = events.groupBy("split", "user_id").agg(F.count(F.lit(1)).alias("n"))
    rows = (
        per_user.groupBy("split")
        .agg(F.count(F.lit(1)).alias("users"), F.sum(n_windows).alias("windows"), F.sum(n).alias("events"))
        .collect()
    )
    return {r["split"]: {"users": r["users"], "windows": int(r["windows"]), "events": int(r["events"])} for r in rows}


def _partition_keys(spark, n: int) -> list[int]:
    """For p in 0..n-1 a long whose Spark hash partition among n is p (`pmod(hash(key), n)`,
    what `repartition(n, col)` uses): repartitioning by these keys puts chosen rows in chosen
    partitions."""
    from pyspark.sql import functions as F

    m = 64 * n
    while True:
        part = F.pmod(F.hash(F.col("id")), F.lit(n)).alias("p")
        found = dict(spark.range(m).groupBy(part).agg(F.min("id").alias("k")).collect())
        if len(found) == n:
            return [found[p] for p in range(n)]
        m *= 4


def write_shards(spark, windows, n_shards: dict[str, int], staging: Location) -> dict[str, list[dict]]:
    """Write every split's shards in one Spark job: split s gets n_shards[s] files, a user's
    windows go to shard `pmod(hash(user_id), n_shards[s])` of its split (Spark's hash
    partitioning), rows sorted by (user_id, window_index). Returns {split: [{path, rows}]}."""
    from pyspark.sql import functions as F

    offsets, n_total = {}, 0
    for split in SPLITS:
        offsets[split], n_total = n_total, n_total + n_shards[split]
    out = {split: [] for split in SPLITS}
    if n_total:
        # global shard id (partition of the write), then a key that hash-partitions onto it
        gid = F.lit(None).cast("int")
        for split in SPLITS:
            if n_shards[split]:
                shard = F.pmod(F.hash(F.col("user_id")), F.lit(n_shards[split])) + F.lit(offsets[split])
                gid = F.when(F.col("split") == split, shard).otherwise(gid)
        keys = F.array(*[F.lit(k).cast("long") for k in _partition_keys(spark, n_total)])
        tmp = staging.child("_shards")
        (
            windows.withColumn("_key", F.element_at(keys, gid + 1))
            .repartition(n_total, "_key")
            .sortWithinPartitions("user_id", "window_index")
            .drop("_key")
            .write.parquet(tmp.uri)
        )
        by_split: dict[str, Location] = {}
        for path in tmp.list_files(".parquet", recursive=False):
            part = int(path.rsplit("/", 1)[-1].split("-")[1])  # part-<partition>-<uuid>...
            split = next(s for s in reversed(SPLITS) if n_shards[s] and offsets[s] <= part)
            loc = by_split.setdefault(split, staging.child(split))
            loc.mkdir()
            tmp.fs.move(path, loc.child(path.rsplit("/", 1)[-1]).path)
        tmp.delete()
    for split in SPLITS:
        loc = staging.child(split)
        loc.mkdir()
        out[split] = [{"path": f"{split}/{n}", "rows": r} for n, r in finalize_spark_output(loc)]
    return out


def run_prep(cfg, spark=None) -> dict:
    """Run the whole job; returns the manifest (also written to OUT/manifest.json)."""
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    check_config(cfg)
    now = dt.datetime.now(dt.timezone.utc)
    ts_min = _iso(_parse_time(cfg.ts_min, "ts_min"))
    ts_max = _iso(_parse_time(cfg.ts_max, "ts_max") if cfg.ts_max else now + dt.timedelta(days=1))

    raw, out = Location.of(cfg.raw), Location.of(cfg.out)
    inputs, labels = discover_inputs(raw)  # raises before anything is written
    given = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None  # likewise
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out={cfg.out} exists and is a file, not a folder")
    if out.exists() and not out.is_empty_dir():
        if not cfg.overwrite:
            raise FileExistsError(f"out={cfg.out} exists and is not empty; pass overwrite=true to replace it")
        if not out.child("manifest.json").exists():  # replace an earlier run only, never other data
            raise FileExistsError(f"out={cfg.out} holds other data (no manifest.json of an earlier plm-prep run); "
                                  "overwrite=true replaces only a plm-prep output folder: pick another out")
        other = [n for n in out.entry_names() if n not in PREP_OUTPUTS]
        if other:  # an earlier run's folder with something else put in it: that is not ours to delete
            raise FileExistsError(f"out={cfg.out} holds files plm-prep did not write ({', '.join(other[:5])}); "
                                  "overwrite=true replaces only plm-prep's own output: move them, or pick another out")
    n_input = {s: sum(f.rows for f in files) for s, files in inputs.items()}
    if sum(n_input.values()) == 0:  # before starting Spark
        raise ValueError(f"no valid events in {cfg.raw}: every source is missing or empty "
                         f"({', '.join(f'{s} {len(inputs[s])} files' for s in RAW_SOURCES)})")
    log(
        "inputs: "
        + ", ".join(f"{s} {len(inputs[s])} files / {n_input[s]:,} rows" if inputs[s]
                    else f"{s} none (no Parquet files in {s}/)" for s in RAW_SOURCES)
        + (f", labels {labels.uri}" if labels else ", no labels")
    )
    staging = Location.of(cfg.out.rstrip("/") + ".__staging__")
    staging.delete()
    staging.mkdir()

    t = time.perf_counter()
    own_spark = spark is None
    spark = spark or spark_session(cfg.spark)
    timings["spark_start_s"] = time.perf_counter() - t
    try:
        manifest = _run(cfg, spark, inputs, labels, n_input, staging, ts_min, ts_max, timings, given)
    except BaseException:
        staging.delete()
        raise
    finally:
        if own_spark:
            spark.stop()
    timings["total_s"] = time.perf_counter() - t_start
    manifest["timings"] = {k: round(v, 3) for k, v in timings.items()}
    manifest["created_at"] = _iso(now)
    staging.child("manifest.json").write_json(manifest)
    if out.exists():
        out.delete()
    staging.move_to(out)
    log(f"done in {timings['total_s']:.1f}s -> {out.uri}")
    return manifest


# event_ids shared by valid rows of two users, up to this many: collected and broadcast to the
# flags' join (more: joined as a cached frame, a shuffle of the distinct rows by event_id)
_COLLECT_IDS = 1_000_000


def broadcastable(spark, ids):
    """`T.distinct_shared_ids` -> None if there are none, else a frame to join: broadcast from
    the driver (built from Arrow, as the vocabularies) when small, else the cached frame."""
    import pyarrow as pa
    from pyspark.sql import functions as F

    rows = ids.limit(_COLLECT_IDS + 1).collect()
    if not rows:
        return None
    if len(rows) > _COLLECT_IDS:
        return ids.cache()
    table = pa.table({T.SOURCE: pa.array([r[T.SOURCE] for r in rows], pa.string()),
                      "event_id": pa.array([r["event_id"] for r in rows], pa.string())})
    return F.broadcast(spark.createDataFrame(table))


def tally_flags(flagged, accounting: dict, after: str | None = None) -> dict:
    """Count `T.flag_distinct`'s rows into `accounting` ({source: {kept_rows, duplicate_rows,
    quarantined_rows: {reason: n}}}, added to) in one aggregation. Returns {source: {"arrived":
    input rows seen, "first_us"/"last_us": epoch µs of the first/last kept row, "after": kept
    rows at or after `after` (ISO time; 0 without)}}."""
    from pyspark.sql import functions as F

    kept = F.col("_status") == "kept"
    late = kept & (F.col("ts") >= F.lit(after).cast("timestamp")) if after else F.lit(False)
    counts = flagged.groupBy(T.SOURCE, "_status", "reason").agg(
        F.count(F.lit(1)).alias("rows"),
        F.sum("_copies").alias("arrived"),
        F.min(F.unix_micros("ts")).alias("first_us"),  # ints: no local-time conversion
        F.max(F.unix_micros("ts")).alias("last_us"),
        F.sum(F.when(late, 1).otherwise(0)).alias("after"),
    )
    seen: dict = {}
    for r in counts.collect():
        acc, info = accounting[r[T.SOURCE]], seen.setdefault(r[T.SOURCE], {"arrived": 0, "after": 0})
        acc["duplicate_rows"] += int(r["arrived"]) - int(r["rows"])
        info["arrived"] += int(r["arrived"])
        info["after"] += int(r["after"])
        if r["_status"] == "kept":
            acc["kept_rows"] += int(r["rows"])
            info["first_us"], info["last_us"] = r["first_us"], r["last_us"]
        else:
            acc["quarantined_rows"][r["reason"]] = acc["quarantined_rows"].get(r["reason"], 0) + int(r["rows"])
    return seen


def _run(cfg, spark, inputs, labels, n_input, staging, ts_min, ts_max, timings, given=None) -> dict:
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    t = time.perf_counter()
    # Partitions of the per-user stage: ~1M input rows each, at least 2 per core (an explicit
    # spark.sql.shuffle.partitions in spark.conf wins). Other shuffles are sized by AQE.
    n_partitions = int(
        cfg.spark.conf.get("spark.sql.shuffle.partitions")
        or max(2 * spark.sparkContext.defaultParallelism, math.ceil(sum(n_input.values()) / 1_000_000))
    )
    if "spark.sql.shuffle.partitions" not in cfg.spark.conf:
        # cached frames keep their shuffle partitions (AQE does not coalesce them): size them
        spark.conf.set("spark.sql.shuffle.partitions", str(n_partitions))
    # 1. validate, quarantine, dedupe: every source in one frame, shuffled once, by user
    accounting = {}
    for source, files in inputs.items():
        accounting[source] = {"input_rows": n_input[source], "kept_rows": 0, "duplicate_rows": 0,
                              "quarantined_rows": {}, "present": bool(files)}
    frames = {source: read_source(spark, source, files) for source, files in inputs.items() if files}
    distinct = T.distinct_rows(frames, ts_min, ts_max, n_partitions).persist(StorageLevel.MEMORY_AND_DISK)
    shared = broadcastable(spark, T.distinct_shared_ids(distinct))
    flagged = T.flag_distinct(distinct, ts_min, ts_max, shared)
    seen = tally_flags(flagged, accounting).values()
    # epoch µs of the first and last kept rows (the default cut-off: after the last)
    first_us = min((i["first_us"] for i in seen if "first_us" in i), default=None)
    last_us = max((i["last_us"] for i in seen if "last_us" in i), default=None)
    quarantine_files = {}
    for source in frames:
        qloc = staging.child("quarantine", source)
        if sum(accounting[source]["quarantined_rows"].values()):
            public = [c.name for c in RAW_SOURCES[source] if c.name not in PRIVATE_COLUMNS]
            q = flagged.where((F.col(T.SOURCE) == source) & (F.col("_status") == "quarantined")).select(*public, "reason")
            # one file in a total order (no range-partitioning sample job)
            q.repartition(1).sortWithinPartitions("reason", *public).write.parquet(qloc.uri)
        quarantine_files[source] = [f"quarantine/{source}/{n}" for n, _ in finalize_spark_output(qloc)]
    for source, acc in accounting.items():
        q_total = sum(acc["quarantined_rows"].values())
        acc["quarantined_total"] = q_total
        acc["quarantined_rows"] = {r: acc["quarantined_rows"].get(r, 0) for r in REASONS}
        if acc["input_rows"] != acc["kept_rows"] + q_total + acc["duplicate_rows"]:
            raise RuntimeError(f"accounting does not close for {source}: {acc}")
        if not acc["present"]:  # the inputs line named it already; the manifest holds its zeros
            log(f"{source}: absent, nothing to prepare")
            continue
        log(accounting_line(source, acc))
    timings["validate_s"] = time.perf_counter() - t
    if sum(a["kept_rows"] for a in accounting.values()) == 0:
        raise ValueError(f"no valid events in {cfg.raw}: nothing to prepare (see the accounting above)")

    # 2. cut-off, per-user features, split (the events are partitioned by user already)
    t = time.perf_counter()
    events = T.to_events(flagged.where(F.col("_status") == "kept"))
    if cfg.cutoff:
        cutoff = _iso(_parse_time(cfg.cutoff, "cutoff"))
        in_window = F.col("ts") < F.lit(cutoff).cast("timestamp")
        after = dict(events.where(~in_window).groupBy("event_type").count().collect())
    else:  # just after the last kept event: nothing is after it, no need to count
        cutoff = _iso_us(last_us + 1)
        in_window = F.col("ts") < F.lit(cutoff).cast("timestamp")
        after = {}
    for source, acc in accounting.items():
        acc["after_cutoff_rows"] = after.get(T.EVENT_TYPE_NAME[source], 0)
        acc["sequence_rows"] = acc["kept_rows"] - acc["after_cutoff_rows"]
    n_after = sum(after.values())
    if n_after:
        n_kept = sum(a["kept_rows"] for a in accounting.values())
        log(f"cutoff {cutoff}: {n_after:,} of {n_kept:,} kept events are at or after it, left out of the sequences ("
            + ", ".join(f"{s} {a['after_cutoff_rows']:,}" for s, a in accounting.items() if a["after_cutoff_rows"]) + ")")
        if n_after == n_kept:
            raise ValueError(f"cutoff={cfg.cutoff}: every kept event is at or after it (the first is at {_iso_us(first_us)}); "
                             "nothing to prepare: pick a later cutoff")
    events = events.where(in_window)
    events = T.add_history_features(events)
    events = T.assign_split(events, cfg.split_salt, cfg.val_fraction, cfg.test_fraction)
    events = events.persist(StorageLevel.MEMORY_AND_DISK)
    stats = split_stats(events, cfg.max_events, cfg.stride)
    train = events.where(F.col("split") == "train")
    n_train_users = int(stats["train"]["users"]) if "train" in stats else 0
    if n_train_users == 0 and given is None:
        raise ValueError("no training users: every user hashed into val/test; lower val_fraction/test_fraction")
    distinct.unpersist()
    if shared is not None:
        shared.unpersist()  # the cached frame of many shared ids (a no-op on the broadcast one)
    timings["features_s"] = time.perf_counter() - t

    # 3. fit the tokenizer on training users only (or apply a given one, unchanged)
    t = time.perf_counter()
    tokenizer = given[0] if given else fit_tokenizer(train, cfg, n_train_users)
    staging.child("tokenizer.json").write_json(tokenizer.to_dict())
    timings["fit_tokenizer_s"] = time.perf_counter() - t
    # in the schema's field order, fitted or given (a loaded tokenizer.json has its keys sorted)
    order = {f.name: i for i, f in enumerate(CATEGORICAL_FIELDS + NUMERIC_FIELDS)}
    sizes = sorted(tokenizer.vocab_sizes().items(), key=lambda kv: order.get(kv[0], len(order)))
    log(("tokenizer (given, " + given[1] + "): " if given else "tokenizer: ") + ", ".join(f"{k}={v}" for k, v in sizes))

    # 4. tokenise, window, write the shards of every split in one job
    t = time.perf_counter()
    windows = T.build_windows(T.tokenize(events, tokenizer), cfg.max_events, cfg.stride)
    shard_columns = windows.columns
    n_shards = {s: max(1, math.ceil(stats[s]["windows"] / cfg.rows_per_shard)) if s in stats else 0 for s in SPLITS}
    splits = write_shards(spark, windows, n_shards, staging)
    for split in SPLITS:
        st = stats.get(split, {"users": 0, "windows": 0, "events": 0})
        splits[split] = {k: int(st[k]) for k in ("users", "windows", "events")} | {"shards": splits[split]}
        log(f"{split}: {splits[split]['users']:,} users, {st['windows']:,} windows, {len(splits[split]['shards'])} shards")
    timings["tokenize_write_s"] = time.perf_counter() - t

    labels_info = None
    if labels is not None:
        users = events.select("user_id").distinct()
        lab = spark.read.parquet(labels.uri)
        labelled = users.join(lab.select("user_id").distinct(), "user_id").count()
        labels_info = {
            "path": labels.uri,
            "rows": lab.count(),
            "columns": [c for c in lab.columns if c != "user_id"],
            "users_with_sequences_and_labels": labelled,
        }
    events.unpersist()

    return {
        "format_version": SHARD_FORMAT_VERSION,
        "producer": {"job": "plm-prep", "spark_version": spark.version, "spark_master": spark.sparkContext.master},
        "config": asdict(cfg),
        "cutoff": cutoff,
        "ts_window": {"min": ts_min, "max": ts_max},
        "inputs": {
            s: {"files": [{"path": f.uri, "rows": f.rows} for f in files]} for s, files in inputs.items()
        },
        "labels": labels_info,
        "accounting": accounting,
        "quarantine": quarantine_files,
        "tokenizer": {"path": "tokenizer.json", "vocab_sizes": tokenizer.vocab_sizes(),
                      "fitted": given is None, **({"source": given[1]} if given else {})},
        "splits": splits,
        "shard_columns": shard_columns,
    }
