"""Pure Spark transforms of `plm-prep`: each takes DataFrames (and plain values) and returns a
DataFrame, built only from Spark's built-in functions (no Python UDFs on the per-row path).

The pipeline (`data_prep.prep.run_prep` wires it):

    normalize_source  -> canonical contract columns and types (extra columns dropped), per source
    distinct_rows     -> the sources in one frame, partitioned by user; exact duplicates collapsed
    flag_distinct     -> status kept | quarantined, and the quarantine `reason`
                         (`flag_rows`: both steps for one source)
    to_events         -> one unified event schema across sources (string categoricals)
    add_history_features (per user, time order) -> log_dt, hour, dow, device_new, device_age, country_foreign
    assign_split      -> train / val / test by a stable hash of user_id
    tokenize          -> int ids per field from the fitted tokenizer (`plm.data.tokenizer`)
    build_windows     -> one row per window of a user's time-ordered events (lists per field)

`plm.data.tokenizer.encode_raw` is the pure-Python twin of the same steps; a test proves both
give identical tokens on the same events.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from plm.data.schema import (
    CATEGORICAL_FIELDS,
    EVENT_TYPE_NAME,
    EVENT_TYPE_ORDER,
    HASHED_FIELDS,
    INT32_OUT_OF_RANGE,
    MISSING,
    N_SPECIALS,
    NA,
    NUMERIC_FIELDS,
    NUMERIC_RANGES,
    OOV,
    RAW_SOURCES,
    value_column,
)

# Columns of the unified event frame (before tokenisation).
EVENT_STRING_COLS = (
    "currency",
    "mcc",
    "channel",
    "status",
    "merchant",
    "country",
    "auth_method",
    "login_success",
    "category",
)
EVENT_DOUBLE_COLS = ("amount", "n_items")

def _spark_type(arrow_type) -> T.DataType:
    import pyarrow as pa

    if pa.types.is_string(arrow_type):
        return T.StringType()
    if pa.types.is_int32(arrow_type):
        return T.IntegerType()
    if pa.types.is_float64(arrow_type):
        return T.DoubleType()
    if pa.types.is_boolean(arrow_type):
        return T.BooleanType()
    raise TypeError(arrow_type)


def normalize_source(df: DataFrame, source: str, ts_is_nanos_long: bool = False) -> DataFrame:
    """Select the contract columns of `source` and cast them to their canonical types.

    `ts` becomes a UTC timestamp (naive timestamps are read as UTC: the session time zone is UTC;
    nanosecond files, read by Spark as longs, are converted). Extra columns are dropped.
    """
    import pyarrow as pa

    cols = []
    wide = {f.name for f in df.schema.fields if isinstance(f.dataType, (T.LongType, T.DecimalType))}
    # nanoseconds arrive as longs (INT64 NANOS with spark.sql.legacy.parquet.nanosAsLong); a legacy
    # INT96 column, which pyarrow also reports as timestamp[ns], is read by Spark as a timestamp
    ts_is_nanos_long = ts_is_nanos_long and "ts" in wide
    for c in RAW_SOURCES[source]:
        if c.name == "ts":
            # exact integer floor of ns / 1000 (a double division rounds: ns epochs are past 2^53)
            ns = F.col("ts")
            col = F.timestamp_micros(F.expr("(ts - pmod(ts, 1000)) div 1000")) if ts_is_nanos_long else ns
            cols.append(col.cast(T.TimestampType()).alias("ts"))
        elif pa.types.is_int32(c.type) and c.name in wide:
            # a wider integer than the contract's int32: a value int32 cannot hold becomes
            # INT32_OUT_OF_RANGE, which the range checks quarantine (the cast would fail the job)
            x = F.col(c.name)
            col = F.when((x > F.lit(2**31 - 1)) | (x < F.lit(-(2**31))), F.lit(INT32_OUT_OF_RANGE)).otherwise(x)
            cols.append(col.cast(T.IntegerType()).alias(c.name))
        else:
            cols.append(F.col(c.name).cast(_spark_type(c.type)).alias(c.name))
    return df.select(*cols)


def _invalid_number(col: Column, name: str) -> Column:
    lo, lo_exclusive, hi = NUMERIC_RANGES[name]
    d = col.cast("double")
    too_low = (d <= lo) if lo_exclusive else (d < lo)
    # null is "missing" (a MISSING token), not invalid; NaN and +-inf are invalid.
    return col.isNotNull() & (F.isnan(d) | (F.abs(d) == float("inf")) | too_low | (d > hi))


def row_checks(source: str | None, ts_min: str, ts_max: str, columns=None) -> list[tuple[str, Column]]:
    """The per-row quarantine checks of `source` (every reason of `plm.data.schema.REASONS` but
    `conflicting_event_id`, which needs the other rows), in order, on canonical columns.

    `source=None` with `columns`: the checks of a frame of several sources (`union_sources`); a
    numeric check of a column that a row's source lacks passes (the column is null there)."""
    cols = set(columns) if source is None else {c.name for c in RAW_SOURCES[source]}
    checks: list[tuple[str, Column]] = [
        ("null_event_id", F.col("event_id").isNull()),
        ("null_user_id", F.col("user_id").isNull()),
        ("null_ts", F.col("ts").isNull()),
        (
            "ts_out_of_range",
            (F.col("ts") < F.lit(ts_min).cast("timestamp")) | (F.col("ts") > F.lit(ts_max).cast("timestamp")),
        ),
    ]
    for name in ("amount", "n_items", "mcc"):
        if name in cols:
            checks.append((f"{name}_invalid", _invalid_number(F.col(name), name)))
    return checks


def _fails_any(checks: list[tuple[str, Column]]) -> Column:
    invalid = F.lit(False)
    for _, cond in checks:
        invalid = invalid | F.coalesce(cond, F.lit(False))
    return invalid


def valid_rows(df: DataFrame, source: str, ts_min: str, ts_max: str) -> DataFrame:
    """The rows of `source` (canonical columns) that pass every `row_checks` check."""
    return df.where(~_fails_any(row_checks(source, ts_min, ts_max)))


def shared_event_ids(valid: DataFrame, by: tuple[str, ...] = ()) -> DataFrame:
    """The `event_id`s that two or more users share among `valid` rows (`valid_rows`):
    `flag_rows` quarantines all of them as `conflicting_event_id`. A job that sees one user at
    a time (`plm.export.spark`) cannot see these and removes them first. One aggregation by
    (*by, event_id) over `user_id`; `by` keeps several sources' ids apart in one job."""
    per_id = valid.groupBy(*by, "event_id").agg(F.min("user_id").alias("_a"), F.max("user_id").alias("_b"))
    return per_id.where(F.col("_a") != F.col("_b")).select(*by, "event_id")


# The source of each row in a frame of several sources (`union_sources`).
SOURCE = "_source"


def union_sources(frames: dict[str, DataFrame]) -> DataFrame:
    """Canonical frames of several sources (`normalize_source`) -> one frame: `_source` (the
    source's name) and every contract column of the given sources, null where a row's source
    does not have it (same-named columns share their contract type)."""
    out = None
    for source, df in frames.items():
        part = df.select(F.lit(source).alias(SOURCE), *df.columns)
        out = part if out is None else out.unionByName(part, allowMissingColumns=True)
    return out


def distinct_rows(frames: dict[str, DataFrame], ts_min: str, ts_max: str, partitions: int | None = None) -> DataFrame:
    """The distinct rows of every source in one frame, hash-partitioned by `user_id`: `_source`,
    the contract columns (`union_sources`), `_copies` (how many arrived), `_invalid` (fails a
    `row_checks` check) and `_n_user` (distinct rows passing every check with this row's source,
    user and `event_id`). `flag_distinct` finishes the flags.

    One shuffle, by user: an exact duplicate has its original's `user_id`, and so do the rows
    of one user that share an `event_id`; the aggregation and the window need no other shuffle,
    and the per-user features downstream none either. Event ids shared across users are the one
    check that needs them side by side: `shared_event_ids` over the valid rows (three columns)."""
    union = union_sources(frames)
    cols = [c for c in union.columns if c != SOURCE]
    by_user = union.repartition(partitions, "user_id") if partitions else union.repartition("user_id")
    distinct = by_user.groupBy(SOURCE, *cols).agg(F.count(F.lit(1)).alias("_copies"))
    invalid = _fails_any(row_checks(None, ts_min, ts_max, cols))
    n_user = F.sum(F.when(F.col("_invalid"), 0).otherwise(1)).over(Window.partitionBy(SOURCE, "user_id", "event_id"))
    return distinct.withColumn("_invalid", invalid).withColumn("_n_user", n_user)


def distinct_shared_ids(distinct: DataFrame) -> DataFrame:
    """(`_source`, `event_id`) of the ids that valid rows of `distinct_rows` of two or more
    users share."""
    return shared_event_ids(distinct.where(~F.col("_invalid")).select(SOURCE, "event_id", "user_id"), by=(SOURCE,))


def flag_distinct(distinct: DataFrame, ts_min: str, ts_max: str, shared: DataFrame | None) -> DataFrame:
    """`distinct_rows` -> `_source`, the contract columns, `_copies`, `_status` (kept |
    quarantined) and `reason` (see `flag_rows`). `shared`: `distinct_shared_ids` of the same
    rows, or a (broadcast) copy of it, or None when there are none."""
    cols = [c for c in distinct.columns if c not in (SOURCE, "_copies", "_invalid", "_n_user")]
    if shared is not None:
        flagged = distinct.join(shared.select(SOURCE, "event_id", F.lit(True).alias("_shared")), [SOURCE, "event_id"], "left")
        is_shared = F.coalesce(F.col("_shared"), F.lit(False))
    else:
        flagged, is_shared = distinct, F.lit(False)
    checks = row_checks(None, ts_min, ts_max, cols)
    checks.append(("conflicting_event_id", F.col("event_id").isNotNull() & ((F.col("_n_user") > 1) | is_shared)))
    reason = F.lit(None).cast("string")
    for name, cond in reversed(checks):
        reason = F.when(cond, F.lit(name)).otherwise(reason)
    return (
        flagged.withColumn("reason", reason)
        .withColumn("_status", F.when(F.col("reason").isNull(), F.lit("kept")).otherwise(F.lit("quarantined")))
        .select(SOURCE, *cols, "_copies", "_status", "reason")
    )


def flag_rows(df: DataFrame, source: str, ts_min: str, ts_max: str) -> DataFrame:
    """Distinct rows of a source with `_copies`, `_status` (kept | quarantined) and `reason`.

    - Exact duplicates (all contract columns equal, nulls equal) collapse into one row whose
      `_copies` says how many arrived: the `_copies - 1` extra ones are upstream replays,
      dropped and counted as duplicate rows.
    - The first failing check in `plm.data.schema.REASONS` quarantines a row (`reason`).
    - Rows that pass every other check and share an `event_id` but differ in content are all
      quarantined as `conflicting_event_id` (no arbitrary winner is picked). A row already
      quarantined for its own reason (a copy with a null `user_id` or `ts`, say) takes no part:
      it cannot cost the valid row with its id that row's place, so a user's kept events depend
      only on rows that could be that user's events.

    The same steps as `plm-prep`'s for all sources at once (`distinct_rows`, `flag_distinct`),
    for one source (`plm-prep` broadcasts the shared ids; here they are joined as a frame).
    """
    distinct = distinct_rows({source: df}, ts_min, ts_max)
    cols = [c.name for c in RAW_SOURCES[source]]
    return flag_distinct(distinct, ts_min, ts_max, distinct_shared_ids(distinct)).select(*cols, "_copies", "_status", "reason")


def to_events(df: DataFrame) -> DataFrame:
    """Kept rows of `union_sources` (any of the sources) -> the unified event frame.

    Columns: user_id, event_id, ts, type_order, event_type, device_id (dropped after features),
    the string categoricals in EVENT_STRING_COLS and the doubles in EVENT_DOUBLE_COLS; a column
    that a row's source does not have is null (it becomes the N/A token at tokenisation).
    """
    present = set(df.columns)

    def s(raw: str) -> Column:
        return F.col(raw).cast("string") if raw in present else F.lit(None).cast("string")

    def d(raw: str) -> Column:
        return F.col(raw).cast("double") if raw in present else F.lit(None).cast("double")

    def per_source(values: dict) -> Column:
        col = F.lit(None)
        for source, value in values.items():
            col = F.when(F.col(SOURCE) == source, F.lit(value)).otherwise(col)
        return col

    return df.select(
        "user_id",
        "event_id",
        "ts",
        per_source(EVENT_TYPE_ORDER).cast("int").alias("type_order"),
        per_source(EVENT_TYPE_NAME).cast("string").alias("event_type"),
        s("device_id").alias("device_id"),
        s("currency").alias("currency"),
        s("mcc").alias("mcc"),
        s("channel").alias("channel"),
        s("status").alias("status"),
        # the raw id never leaves the job: its pseudonym (HASHED_FIELDS, same as the Python twin)
        F.substring(F.sha2(s("merchant_id"), 256), 1, HASHED_FIELDS["merchant"]).alias("merchant"),
        # payments' country, logins' IP country (each null in the other's rows)
        F.coalesce(s("country"), s("ip_country")).alias("country"),
        s("auth_method").alias("auth_method"),
        # bool -> "true"/"false", the same strings the pure-Python tokenizer uses
        F.lower(s("success")).alias("login_success"),
        s("category").alias("category"),
        d("amount").alias("amount"),
        d("n_items").alias("n_items"),
    )


def _merge_order() -> list[Column]:
    return [F.col("ts").asc(), F.col("type_order").asc(), F.col("event_id").asc()]


def add_history_features(events: DataFrame) -> DataFrame:
    """Per-user features that need the user's time-ordered history (merge order: ts, source, id).

    - `dt_seconds`: seconds since the user's previous event (null on the first), `hour`, `dow`
      (UTC; Monday = 0), `ts_us` (epoch microseconds);
    - `device_new`: "true" on the first event of the user with this device, else "false"
      (null device -> null = MISSING); `device_age`: seconds since that first event (null
      without a device); `device_id` is dropped here and never reaches outputs;
    - `country_foreign`: the event's country differs from the user's home country, the first
      non-null country in the user's history (causal: known from the first event on).

    All three windows share one partitioning and order, so Spark sorts the events once.
    """
    by_user = Window.partitionBy("user_id").orderBy(*_merge_order())
    # clustered by user already: this window adds a sort, not a shuffle
    by_device = Window.partitionBy("user_id", "device_id")
    before = by_user.rowsBetween(Window.unboundedPreceding, -1)
    whole = by_user.rowsBetween(Window.unboundedPreceding, Window.unboundedFollowing)
    ts_us = F.unix_micros("ts")
    home = F.first("country", ignorenulls=True).over(whole)
    seen_devices = F.collect_set("device_id").over(before)  # a user's devices are few
    return (
        events.withColumn("ts_us", ts_us)
        .withColumn("dt_seconds", (F.col("ts_us") - F.lag("ts_us").over(by_user)) / F.lit(1e6))
        .withColumn("hour", F.hour("ts").cast("string"))
        .withColumn("dow", ((F.dayofweek("ts") + 5) % 7).cast("string"))
        .withColumn(
            "device_new",
            F.when(F.col("device_id").isNull(), F.lit(None).cast("string")).otherwise(
                F.when(F.array_contains(seen_devices, F.col("device_id")), F.lit("false")).otherwise(F.lit("true"))
            ),
        )
        .withColumn(
            "device_age",
            F.when(F.col("device_id").isNull(), F.lit(None).cast("double")).otherwise(
                (F.col("ts_us") - F.min("ts_us").over(by_device)) / F.lit(1e6)
            ),
        )
        .withColumn(
            "country_foreign",
            F.when(F.col("country").isNull(), F.lit(None).cast("string")).otherwise(
                F.when(F.col("country") != home, F.lit("true")).otherwise(F.lit("false"))
            ),
        )
        .drop("device_id")
    )


def assign_split(events: DataFrame, salt: str, val_fraction: float, test_fraction: float) -> DataFrame:
    """`split` = train | val | test from a stable 64-bit hash of (salt, user_id): the same user
    always lands in the same split, whatever else is in the data."""
    bucket = F.pmod(F.xxhash64(F.lit(salt), F.col("user_id")), F.lit(1_000_000)) / F.lit(1_000_000.0)
    return events.withColumn(
        "split",
        F.when(bucket < test_fraction, F.lit("test"))
        .when(bucket < test_fraction + val_fraction, F.lit("val"))
        .otherwise(F.lit("train")),
    )


# ------------------------------------------------------------------------------- fitting


def field_source_column(field_name: str) -> str:
    """Unified-event column feeding a field (the raw column names are mapped in `to_events`)."""
    return {
        "event_type": "event_type",
        "hour": "hour",
        "dow": "dow",
        "log_dt": "dt_seconds",
    }.get(field_name, field_name)


def _applies(field) -> Column:
    names = [EVENT_TYPE_NAME[s] for s in field.sources]
    return F.col("event_type").isin(names)


def categorical_counts(train_events: DataFrame, min_count: int, max_size_by_field: dict[str, int]) -> DataFrame:
    """(field, value, count) of each categorical value among applicable, non-null occurrences,
    keeping values seen at least `min_count` times and at most the cap per field, most frequent
    first (ties by value), as `rank` 0.."""
    pairs = F.explode(
        F.array(
            *[
                F.struct(
                    F.lit(f.name).alias("field"),
                    F.when(_applies(f), F.col(field_source_column(f.name))).alias("value"),
                )
                for f in CATEGORICAL_FIELDS
            ]
        )
    )
    counts = (
        train_events.select(pairs.alias("p"))
        .select("p.field", "p.value")
        .where(F.col("value").isNotNull())
        .groupBy("field", "value")
        .count()
        .where(F.col("count") >= min_count)
    )
    cap = F.lit(None).cast("int")
    for name, size in max_size_by_field.items():
        cap = F.when(F.col("field") == name, F.lit(size)).otherwise(cap)
    rank = F.row_number().over(Window.partitionBy("field").orderBy(F.col("count").desc(), F.col("value").asc())) - 1
    return counts.withColumn("rank", rank).where(F.col("rank") < cap)


def numeric_sample(train_events: DataFrame, fractions: dict[str, float]) -> DataFrame:
    """(field, x) sample of raw numeric values for fitting bins, chosen by a hash of
    (event_id, field) so the same data always gives the same sample (deterministic)."""
    pairs = F.explode(
        F.array(
            *[
                F.struct(
                    F.lit(f.name).alias("field"),
                    F.when(_applies(f), F.col(field_source_column(f.name))).cast("double").alias("x"),
                    F.lit(fractions.get(f.name, 1.0)).alias("frac"),
                    F.pmod(F.xxhash64(F.col("event_id"), F.lit(f.name)), F.lit(1 << 30)).alias("h"),
                )
                for f in NUMERIC_FIELDS
            ]
        )
    )
    return (
        train_events.select(pairs.alias("p"))
        .select("p.*")
        .where(F.col("x").isNotNull() & (F.col("h") < F.col("frac") * F.lit(float(1 << 30))))
        .select("field", "x")
    )


def numeric_counts(train_events: DataFrame) -> DataFrame:
    """One row: applicable non-null count per numeric field (to size the sample)."""
    return train_events.agg(
        *[
            F.count(F.when(_applies(f), F.col(field_source_column(f.name)))).alias(f.name)
            for f in NUMERIC_FIELDS
        ]
    )


# ------------------------------------------------------------------------------ tokenise

SMALL_VOCAB = 256  # fields with at most this many values are looked up in a literal map


def _lookup_categorical(events: DataFrame, field, values: list[str]) -> tuple[DataFrame, Column]:
    """Return (events, id column) for a categorical field: NA if not applicable, MISSING if
    null, the fitted id if known, else OOV. Small vocabularies use a literal map; large ones a
    broadcast hash join (a Spark map lookup is a linear scan)."""
    src = F.col(field_source_column(field.name))
    if len(values) <= SMALL_VOCAB:
        if values:
            mapping = F.create_map(*[x for i, v in enumerate(values) for x in (F.lit(v), F.lit(N_SPECIALS + i))])
            known = F.element_at(mapping, src)
        else:
            known = F.lit(None).cast("int")
        idcol = F.coalesce(known, F.lit(OOV))
    else:
        import pyarrow as pa

        spark = events.sparkSession
        key = f"_k_{field.name}"
        # from an Arrow table: the JVM reads it directly, where a list of rows would start a
        # Python worker to pickle them (seconds on a busy machine)
        vocab = spark.createDataFrame(
            pa.table(
                {
                    key: pa.array(values, pa.string()),
                    f"_id_{field.name}": pa.array(range(N_SPECIALS, N_SPECIALS + len(values)), pa.int32()),
                }
            )
        )
        events = events.join(F.broadcast(vocab), src == F.col(key), "left").drop(key)
        idcol = F.coalesce(F.col(f"_id_{field.name}"), F.lit(OOV))
    col = F.when(~_applies(field), F.lit(NA)).when(src.isNull(), F.lit(MISSING)).otherwise(idcol)
    return events, col.cast("int")


def tokenize(events: DataFrame, tokenizer) -> DataFrame:
    """Unified events (with history features) -> token ids per field plus standardised values.

    Numeric bins: id = N_SPECIALS + (number of edges <= x), exactly `numpy.searchsorted(edges,
    x, side="right")` in the pure-Python tokenizer; value = (log1p(x) or x - mean) / std.
    """
    out_cols = ["user_id", "split", "event_id", "ts_us", "type_order"]
    id_cols: dict[str, Column] = {}
    for f in CATEGORICAL_FIELDS:
        events, col = _lookup_categorical(events, f, tokenizer.categorical[f.name])
        id_cols[f.name] = col
    for f in NUMERIC_FIELDS:
        spec = tokenizer.numeric[f.name]
        x = F.col(field_source_column(f.name)).cast("double")
        n_le = F.lit(0)
        for e in spec.edges:
            n_le = n_le + (x >= F.lit(float(e))).cast("int")
        bin_id = F.when(~_applies(f), F.lit(NA)).when(x.isNull(), F.lit(MISSING)).otherwise(F.lit(N_SPECIALS) + n_le)
        v = F.log1p(x) if spec.log else x
        value = F.when(_applies(f) & x.isNotNull(), (v - F.lit(spec.mean)) / F.lit(spec.std)).otherwise(F.lit(0.0))
        id_cols[f.name] = bin_id.cast("int")
        id_cols[value_column(f.name)] = value.cast("float")
    return events.select(*out_cols, *[c.alias(n) for n, c in id_cols.items()])


def token_columns() -> list[str]:
    cols = [f.name for f in CATEGORICAL_FIELDS]
    for f in NUMERIC_FIELDS:
        cols += [f.name, value_column(f.name)]
    return cols


def build_windows(tokens: DataFrame, max_events: int, stride: int) -> DataFrame:
    """Tokenised events -> one row per window of a user's events in merge order.

    A history of n <= max_events events is one window. A longer one gives windows ending at
    n, n - stride, n - 2*stride, ... until a window starts at the first event; window 0 is
    always the most recent `max_events` events.
    """
    if not (0 < stride <= max_events):
        raise ValueError(f"stride must be in 1..max_events ({max_events}), got {stride}")
    cols = token_columns()
    ev = F.struct(F.col("ts_us"), F.col("type_order"), F.col("event_id"), *[F.col(c) for c in cols])
    per_user = tokens.groupBy("user_id", "split").agg(F.sort_array(F.collect_list(ev)).alias("ev"))
    n = F.size("ev")
    n_windows = F.when(n <= max_events, F.lit(1)).otherwise(
        F.lit(1) + F.ceil((n - F.lit(max_events)) / F.lit(stride)).cast("int")
    )
    per_user = per_user.withColumn("history_len", n).withColumn("k", F.explode(F.sequence(F.lit(0), n_windows - 1)))
    end = F.col("history_len") - F.col("k") * F.lit(stride)
    start = F.greatest(F.lit(0), end - F.lit(max_events))
    win = per_user.select(
        "user_id",
        "split",
        F.col("k").cast("int").alias("window_index"),
        start.cast("int").alias("window_start"),
        F.col("history_len").cast("int").alias("history_len"),
        F.slice("ev", start + 1, end - start).alias("w"),
    )
    return win.select(
        "user_id",
        "split",
        "window_index",
        "window_start",
        "history_len",
        F.size("w").cast("int").alias("n_events"),
        # `w.field` of an array of structs is the array of that field (GetArrayStructFields,
        # generated code); `transform` with a lambda would be evaluated interpreted, per element.
        F.col("w").getField("ts_us").alias("ts"),
        *[F.col("w").getField(c).alias(c) for c in cols],
    )
