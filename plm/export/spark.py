"""Embed raw events where they live, with Spark: `embed_raw_spark`.

    from plm.export.spark import embed_raw_spark
    df = embed_raw_spark({"payments": spark.read.parquet(".../payments"),
                          "logins": spark.read.parquet(".../logins")},
                         ckpt="final.pt", data="prepared/", cutoff="2024-06-29T00:00:00Z")
    df.write.parquet("embeddings/")   # user_id, embedding array<float>, n_events, identity columns

For hundreds of millions of users whose raw events sit in a cluster's tables: no prepared
shards, no collect to the driver. Each source is reduced to its contract columns, packed into a
struct and unioned with the others, repartitioned by `user_id` (every event of a user lands in
one partition) and sorted by `user_id` within each partition; `mapInArrow` then streams each
partition's Arrow batches through `UserEmbedder.embed_raw`, the pure-Python twin of `plm-prep`
(the same validation, merge order, tokens and windows) and the same model as `plm-export`,
cutting the stream only between users, so memory per task is bounded by `rows_per_call` (plus
the largest single user) whatever the partition's size. A user's vector equals the batch
export's for the same events and cut-off (tested on local Spark).

The checkpoint and the prepared folder's `manifest.json` + `tokenizer.json` (not its shards)
reach the executors through `SparkContext.addFile`; each Python worker loads them once
(`weights_only=True`, the same identity checks as `plm-export`) and uses `spark.task.cpus`
threads. Needs PLM (with torch) on the executors, and pandas: PySpark's `mapInArrow` is built on
`pandas_udf`, which refuses to start without it (`pip install 'plm[spark]'`; cluster images
such as Databricks' and EMR's ship it).

No task sees two users, so before the embedding job one aggregation over all sources finds
the `event_id`s that valid rows of different users share, which the batch job quarantines as
`conflicting_event_id`, and leaves those rows out (a warning gives the count); conflicts within
one user are found by the tasks, as by the batch job.
`embed_raw_spark` returns the batch parts' columns (the embedding as `list<float32>`, which the
contract allows); Spark's Parquet writer cannot set a file's schema metadata, so written by
Spark the identity is in the columns only. It drops invalid rows and duplicates as `plm-prep`
does; `raw_accounting_spark` counts them, per source and reason. `write_raw_spark` (what `plm-export raw=` calls)
has each task write its users in the batch export's exact file schema instead.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from plm.data.schema import RAW_SOURCES, ContractError, check_file_schema
from plm.data.tokenizer import iso_us, zero_accounting

_log = logging.getLogger("plm.export")
_SRC = "__plm_source"
_BUNDLES: dict[tuple[str, str], str] = {}  # (Spark application, bundle name) -> driver path
_WORKER_CACHE: dict[tuple, object] = {}  # (bundle, options) -> UserEmbedder, per Python worker


def embed_raw_spark(sources: dict, ckpt: str, data: str, cutoff: str, *,
                    partitions: int | None = None, rows_per_call: int = 200_000, pooling: str | None = None,
                    normalize: bool = False, quantize: str = "none", max_len: int = 0, max_tokens: int = 0,
                    ts_max: str | None = None):
    """Raw contract DataFrames -> a DataFrame of user embeddings, computed on the executors.

    `sources`: {"payments"|"logins"|"orders": DataFrame} (any subset; extra columns ignored;
    types as `plm-prep` accepts them). `ckpt`, `data`: as for `UserEmbedder.from_files` (a
    final.pt or run folder; the prepared folder the model was trained on). `cutoff`: ISO time,
    the as-of time of every vector (the `as_of` column): events at or after it are ignored.
    `partitions`: partitions by user_id (default: sized by Spark's adaptive execution from
    spark.sql.shuffle.partitions and spark.sql.adaptive.advisoryPartitionSizeInBytes). `rows_per_call`:
    raw rows handed to the model at once per task. `ts_max`: the end of the valid time window
    (default: the prepared folder's configured one, else one day after this call, plm-prep's
    rule; rows after the cut-off and before it are valid, left out of the sequences). One row per
    user with at least one valid event before the cut-off.
    """
    from pyspark.sql import functions as F

    plan = _plan(sources, ckpt, data, cutoff, partitions, rows_per_call,
                 {"pooling": pooling, "normalize": normalize, "quantize": quantize, "max_len": max_len,
                  "max_tokens": max_tokens, "ts_max": ts_max})
    key, names = plan["key"], plan["names"]

    def embed(batches):
        yield from _embed_partition(batches, key, names, cutoff, rows_per_call)

    identity = plan["identity"]
    out = plan["ordered"].mapInArrow(embed, "user_id string, embedding array<float>, n_events int")
    return out.select(
        "user_id", "embedding", "n_events",
        *[F.lit(identity[k]).alias(k) for k in ("model", "model_sha256", "checkpoint", "tokenizer_sha256", "pooling")],
        F.lit(identity["as_of"]).cast("timestamp").alias("as_of"),
    )


def write_raw_spark(sources: dict, ckpt: str, data: str, cutoff: str, staging_uri: str, *,
                    partitions: int | None = None, rows_per_call: int = 200_000, **opts) -> tuple[dict, list[dict]]:
    """As `embed_raw_spark`, but each task writes its users straight into `staging_uri` (a
    folder every executor can write, as a pyarrow filesystem URI) in the batch export's exact
    schema (`fixed_size_list<float32>[d]`, the identity repeated in the schema metadata), which
    Spark's Parquet writer cannot produce. Returns (identity, files, shared, accounting): `files`,
    one dict per written file of a successful task attempt (path, partition, rows, events);
    `shared`, {source: how many event_ids valid rows of two users shared (their rows left out)};
    `accounting`, {source: what happened to the rows the tasks embedded, as `encode_raw` counts
    them: kept, quarantined per reason, duplicates, after the cut-off}. Files of
    failed or speculative attempts are the caller's to delete (`plm-export raw=` does)."""
    plan = _plan(sources, ckpt, data, cutoff, partitions, rows_per_call, opts)
    key, names, identity = plan["key"], plan["names"], plan["identity"]
    ident_json, dim = json.dumps(identity), int(identity["dim"])

    def write(batches):
        yield from _write_partition(batches, key, names, cutoff, rows_per_call, staging_uri, ident_json, dim)

    rows = plan["ordered"].mapInArrow(write, "path string, partition int, rows long, events long, accounting string")
    rows = sorted((r.asDict() for r in rows.collect()), key=lambda r: r["partition"])
    accounting: dict = {}
    for r in rows:
        add_accounting(accounting, json.loads(r.pop("accounting")))
    files = [r for r in rows if r["path"] is not None]
    return identity, files, plan["shared_event_ids"], accounting


def _plan(sources: dict, ckpt: str, data: str, cutoff: str, partitions: int | None, rows_per_call: int,
          opts: dict) -> dict:
    """Checks on the driver, files shipped, and the user-partitioned, user-sorted union."""
    from pyspark.sql import functions as F

    from plm.export.model import DEFAULT_POOLING
    from plm.export.service import UserEmbedder, window_end

    sources = _checked_sources(sources, cutoff)
    if rows_per_call < 1:
        raise ValueError(f"rows_per_call={rows_per_call}: must be >= 1")
    if partitions is not None and partitions < 1:
        raise ValueError(f"partitions={partitions}: must be >= 1")
    opts = {"pooling": opts.get("pooling") or DEFAULT_POOLING, "normalize": bool(opts.get("normalize", False)),
            "quantize": opts.get("quantize", "none"), "max_len": int(opts.get("max_len", 0)),
            "max_tokens": int(opts.get("max_tokens", 0)), "ts_max": opts.get("ts_max")}
    local = UserEmbedder.from_files(ckpt, data, **opts)  # the checkpoint's checks, on the driver
    # the valid time window's end, resolved once here: every executor validates with it
    local.ts_max = opts["ts_max"] = window_end(ts_max=local.ts_max)
    _require_pandas()
    spark = next(iter(sources.values())).sparkSession
    _check_workers(spark)
    bundle = _ship(spark, local.loaded.path, data, local.tokenizer_sha256)

    shared = _shared_ids(sources, local.ts_min, local.ts_max)
    frames = []
    for name, df in sources.items():
        if shared[name][0] is not None:
            df = df.join(shared[name][0], "event_id", "left_anti")
        cols = [c.name for c in RAW_SOURCES[name]]
        frames.append(df.select(F.col("user_id"), F.lit(name).alias(_SRC), F.struct(*cols).alias(name)))
    union = frames[0]
    for f in frames[1:]:
        union = union.unionByName(f, allowMissingColumns=True)
    # partitions=None: Spark's adaptive execution sizes them (coalescing small ones, keeping the
    # default parallelism); a number fixes them
    by_user = union.repartition(int(partitions), "user_id") if partitions else union.repartition("user_id")
    return {"ordered": by_user.sortWithinPartitions("user_id"), "names": tuple(sources),
            "key": (bundle, tuple(sorted(opts.items()))), "identity": _identity(local, cutoff, opts),
            "shared_event_ids": {name: n for name, (_, n) in shared.items()}}


def _checked_sources(sources: dict, cutoff: str, what: str = "embed_raw_spark") -> dict:
    """The given source DataFrames, their schemas and the cut-off checked (clear errors that
    name `what` was called)."""
    sources = {k: v for k, v in sources.items() if v is not None}
    unknown = sorted(set(sources) - set(RAW_SOURCES))
    if unknown:
        raise ContractError(f"unknown source(s) {unknown}: the raw sources are {sorted(RAW_SOURCES)}")
    if not sources:
        raise ValueError(f"{what}: no source DataFrame given (payments, logins or orders)")
    if not cutoff:
        raise ValueError(f"{what}: cutoff=ISO-TIME is required (the as-of time of every vector)")
    try:
        iso_us(cutoff)
    except ValueError:
        raise ValueError(f"{what}: cutoff={cutoff!r} is not an ISO-8601 time (e.g. 2024-06-29T00:00:00Z)") from None
    for name, df in sources.items():
        check_file_schema(name, f"{name} DataFrame", _arrow_schema(df))
    return sources


def raw_accounting_spark(sources: dict, data: str, cutoff: str, ts_max: str | None = None) -> dict:
    """What `embed_raw_spark(sources, ckpt, data, cutoff)` does with every input row, per source,
    counted as plm-prep's manifest counts them: {source: {input_rows, kept_rows, duplicate_rows,
    quarantined_rows: {reason: n}, quarantined_total, after_cutoff_rows}}, `input_rows = kept_rows
    + quarantined_total + duplicate_rows`. The embedding job drops the quarantined rows and the
    duplicates; this names them. The valid time window is plm-prep's (`service.window_end`: from
    the prepared folder's start to `ts_max`, else its configured end, else one day after now);
    valid rows at or after the cut-off are `after_cutoff_rows`; ids that valid rows of two users
    share are `conflicting_event_id`, as in plm-prep (the embedding job leaves them out before its
    tasks). `data`: the prepared folder the model was trained on. One shuffle by user (plm-prep's
    validation) and one small collect.
    """
    from data_prep.prep import broadcastable, tally_flags
    from data_prep.transforms import distinct_rows, distinct_shared_ids, flag_distinct, normalize_source
    from plm.data.datamodule import read_manifest
    from plm.export.service import window_end, window_start

    sources = _checked_sources(sources, cutoff, "raw_accounting_spark")
    manifest = read_manifest(data)
    ts_min, ts_max = window_start(manifest), window_end(manifest, ts_max)
    spark = next(iter(sources.values())).sparkSession
    distinct = distinct_rows({name: normalize_source(df, name) for name, df in sources.items()}, ts_min, ts_max)
    distinct = distinct.persist()
    try:
        shared = broadcastable(spark, distinct_shared_ids(distinct))
        accounting = {name: zero_accounting() for name in sources}
        seen = tally_flags(flag_distinct(distinct, ts_min, ts_max, shared), accounting, after=cutoff)
    finally:
        distinct.unpersist()
    for name, acc in accounting.items():
        acc["input_rows"] = seen.get(name, {}).get("arrived", 0)
        acc["after_cutoff_rows"] = seen.get(name, {}).get("after", 0)
        acc["quarantined_total"] = sum(acc["quarantined_rows"].values())
    return accounting


def _shared_ids(sources: dict, ts_min: str, ts_max: str) -> dict:
    """{source: (DataFrame of the event_ids that valid rows of two or more users share, or None;
    how many)}. The batch job quarantines all such rows as `conflicting_event_id`; no task here
    sees both users, so they are left out before the embedding job. One job for every source
    (one shuffle of three columns), collected and broadcast like plm-prep's (`broadcastable`:
    beyond a million, a cached frame); conflicts within one user are the tasks' to find, as the
    batch job's."""
    from pyspark.sql import functions as F

    from data_prep import prep
    from data_prep.transforms import SOURCE, normalize_source, shared_event_ids, valid_rows

    valid = [valid_rows(normalize_source(df, name), name, ts_min, ts_max)
             .select(F.lit(name).alias(SOURCE), "event_id", "user_id") for name, df in sources.items()]
    union = valid[0]
    for v in valid[1:]:
        union = union.unionByName(v)
    ids = prep.broadcastable(union.sparkSession, shared_event_ids(union, by=(SOURCE,)))
    counts = {} if ids is None else {r[SOURCE]: r["count"] for r in ids.groupBy(SOURCE).count().collect()}
    collected = sum(counts.values()) <= prep._COLLECT_IDS  # the anti-joins broadcast them
    out = {}
    for name in sources:
        n = counts.get(name, 0)
        part = ids.where(F.col(SOURCE) == name).select("event_id") if n else None
        out[name] = (F.broadcast(part) if part is not None and collected else part, n)
        if n:
            _log.warning("%s: %d event_id(s) used by valid rows of different users: those rows are left out, "
                         "as plm-prep quarantines them (conflicting_event_id)", name, n)
    return out


# ---------------------------------------------------------------------------------- driver side


def _require_pandas() -> None:
    try:
        import pandas  # noqa: F401
    except ImportError:
        raise ImportError(
            "embed_raw_spark needs pandas on the driver and the executors: PySpark's mapInArrow is "
            "built on pandas_udf, which refuses to start without it. pip install 'plm[spark]' (or pandas)"
        ) from None


def _check_workers(spark) -> None:
    """One tiny task: can the executors' Python import PLM, torch, pyarrow and pandas? A clear
    error naming that Python instead of a worker traceback in the middle of the job."""

    def probe(_):  # nested, so Spark ships it by value: it runs even where PLM is missing
        import sys

        try:
            import pandas  # noqa: F401
            import pyarrow  # noqa: F401
            import torch  # noqa: F401

            import plm.export.service  # noqa: F401
        except Exception as e:  # noqa: BLE001 - reported to the driver
            return sys.executable, f"{type(e).__name__}: {e}"
        return sys.executable, ""

    exe, err = spark.sparkContext.parallelize([0], 1).map(probe).collect()[0]
    if err:
        import sys

        raise RuntimeError(
            f"embed_raw_spark: the executors' Python ({exe}) cannot run PLM ({err}). Install PLM there "
            "(pip install 'plm[spark]'), or point Spark at a Python that has it: PYSPARK_PYTHON or "
            f"spark.pyspark.python (in local mode, this driver's Python: {sys.executable})"
        )


def _arrow_schema(df) -> pa.Schema:
    from pyspark.sql.pandas.types import to_arrow_type

    fields = []
    for f in df.schema.fields:
        try:
            t = to_arrow_type(f.dataType, timezone="UTC")
        except Exception:  # noqa: BLE001 - a type Arrow cannot hold is no contract type either
            t = pa.null()
        fields.append(pa.field(f.name, t))
    return pa.schema(fields)


def _ship(spark, ckpt_path: str, data: str, tok_sha: str) -> str:
    """A folder with the checkpoint, manifest.json and tokenizer.json, added with
    SparkContext.addFile (once per driver and model); returns its name for SparkFiles.get."""
    from plm.data.datamodule import read_manifest, read_tokenizer_json

    manifest = read_manifest(data)
    ck = Path(ckpt_path)
    digest = hashlib.sha256(f"{ck.resolve()}:{ck.stat().st_mtime_ns}:{tok_sha}".encode()).hexdigest()[:16]
    name = f"plm-embed-{digest}"
    app = spark.sparkContext.applicationId  # a new SparkContext has none of the earlier files
    if (app, name) in _BUNDLES:
        return name
    root = Path(tempfile.mkdtemp(prefix="plm-embed-")) / name
    root.mkdir()
    atexit.register(shutil.rmtree, root.parent, True)
    shutil.copyfile(ck, root / "final.pt")
    (root / "manifest.json").write_text(json.dumps(manifest))
    rel = (manifest.get("tokenizer") or {}).get("path", "tokenizer.json")
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(read_tokenizer_json(data, manifest))
    spark.sparkContext.addFile(str(root), recursive=True)
    _BUNDLES[(app, name)] = str(root)
    return name


def _identity(local, cutoff: str, opts: dict) -> dict:
    from plm.export.run import model_identity

    return model_identity(local.loaded, local.tokenizer_sha256, cutoff, local.embedder,
                          normalize=opts["normalize"], quantize=opts["quantize"])


# -------------------------------------------------------------------------------- executor side


def _worker_embedder(key: tuple):
    emb = _WORKER_CACHE.get(key)
    if emb is None:
        import torch
        from pyspark import SparkFiles, TaskContext

        from plm.export.service import UserEmbedder

        ctx = TaskContext.get()
        cpus = ctx.cpus() if ctx is not None else 1
        torch.set_num_threads(max(1, int(cpus)))
        folder = SparkFiles.get(key[0])
        emb = UserEmbedder.from_files(os.path.join(folder, "final.pt"), folder, **dict(key[1]))
        _WORKER_CACHE[key] = emb
    return emb


def _embedded_tables(batches, key: tuple, names: tuple, cutoff: str, rows_per_call: int, acc: dict | None = None):
    """Arrow batches of one partition, sorted by user_id -> embed_raw tables (user_id, embedding
    fixed_size_list, n_events), one per call of about rows_per_call rows, cut between users;
    `acc` sums the calls' accountings (`add_accounting`)."""
    emb = None
    pending: list[pa.RecordBatch] = []
    rows = 0
    for b in batches:
        if b.num_rows == 0:
            continue
        pending.append(b)
        rows += b.num_rows
        if rows < rows_per_call:
            continue
        table = pa.Table.from_batches(pending)
        uid = table.column("user_id")
        last = uid[-1]
        start = pc.index(uid, last).as_py() if last.is_valid else table.num_rows
        if start <= 0:  # one user so far: keep reading
            continue
        emb = emb or _worker_embedder(key)
        out = _embed_rows(emb, table.slice(0, start), names, cutoff, acc)
        if out is not None:
            yield out
        tail = table.slice(start)
        pending, rows = tail.to_batches(), tail.num_rows
    if rows:
        emb = emb or _worker_embedder(key)
        out = _embed_rows(emb, pa.Table.from_batches(pending), names, cutoff, acc)
        if out is not None:
            yield out


def _embed_partition(batches, key: tuple, names: tuple, cutoff: str, rows_per_call: int):
    """The embedded tables as Arrow batches of Spark's `array<float>` (list<float32>)."""
    for out in _embedded_tables(batches, key, names, cutoff, rows_per_call):
        vec = out.column("embedding").cast(pa.list_(pa.float32()))
        yield from pa.table({"user_id": out.column("user_id"), "embedding": vec,
                             "n_events": out.column("n_events")}).to_batches()


def _write_partition(batches, key: tuple, names: tuple, cutoff: str, rows_per_call: int, staging_uri: str,
                     ident_json: str, dim: int):
    """The embedded tables written by this task attempt into one Parquet file of the batch
    export's schema; yields one row (path, partition, rows, events, accounting) if the partition
    had any row: `path` is null when no user of it had a valid event before the cut-off, and
    `accounting` (JSON) counts its input rows as `encode_raw` does."""
    import pyarrow.parquet as pq
    from pyspark import TaskContext

    from data_prep.storage import Location
    from plm.export.run import embedding_schema, embedding_table

    ctx = TaskContext.get()
    part, attempt = (ctx.partitionId(), ctx.taskAttemptId()) if ctx is not None else (0, 0)
    identity = json.loads(ident_json)
    schema = embedding_schema(dim, identity)
    loc = Location.of(staging_uri).child(f"attempt-{part:05d}-{attempt}.parquet")
    stream = writer = None
    rows = events = 0
    acc: dict = {}
    try:
        for out in _embedded_tables(batches, key, names, cutoff, rows_per_call, acc):
            if writer is None:
                stream = loc.fs.open_output_stream(loc.path)
                writer = pq.ParquetWriter(stream, schema)
            flat = out.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            n = out.column("n_events").to_numpy()
            writer.write_table(embedding_table(out.column("user_id").to_pylist(), flat.reshape(-1, dim), n,
                                               identity, schema))
            rows += out.num_rows
            events += int(n.sum())
    finally:
        if writer is not None:
            writer.close()
        if stream is not None:
            stream.close()
    if rows or acc:
        yield pa.RecordBatch.from_pydict({"path": pa.array([loc.path if rows else None], pa.string()),
                                          "partition": pa.array([part], pa.int32()),
                                          "rows": pa.array([rows], pa.int64()), "events": pa.array([events], pa.int64()),
                                          "accounting": pa.array([json.dumps(acc, sort_keys=True)], pa.string())})


def _embed_rows(emb, table: pa.Table, names: tuple, cutoff: str, acc: dict | None = None) -> pa.Table | None:
    src = table.column(_SRC)
    tables = {}
    for name in names:
        part = table.filter(pc.equal(src, name))
        if part.num_rows:
            tables[name] = pa.Table.from_struct_array(part.column(name))
    if not tables:
        return None
    out = emb.embed_raw(tables, cutoff=cutoff)
    if acc is not None:
        add_accounting(acc, emb.accounting)
    return out if out.num_rows else None


def add_accounting(total: dict, part: dict) -> dict:
    """Sum `encode_raw` accountings ({source: counts}) into `total` (in place; also returned)."""
    for source, a in part.items():
        t = total.setdefault(source, zero_accounting())
        for k in ("input_rows", "kept_rows", "duplicate_rows", "quarantined_total", "after_cutoff_rows"):
            t[k] += int(a[k])
        for reason, n in a["quarantined_rows"].items():
            t["quarantined_rows"][reason] = t["quarantined_rows"].get(reason, 0) + int(n)
    return total
