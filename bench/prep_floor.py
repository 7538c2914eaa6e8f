"""The floor under `plm-prep`'s time: the least any Spark job producing per-user ordered lists
must do on the same raw world, timed in a fresh JVM and again warm.

    .venv/bin/python bench/prep_floor.py                 # the bench-prep world (14,000 users)
    .venv/bin/python bench/prep_floor.py --raw DIR       # a raw folder of your own

Reads the three sources' contract columns (every column but user_id and ts as a string, so the
sources union), shuffles once by user_id, sorts within partitions by (user_id, ts), collects
one list per column per user and writes Parquet: what `plm-prep` cannot avoid (it also
validates, deduplicates, derives features, fits and applies the tokenizer and windows). Prints
the session start-up, the first job (a fresh JVM: Spark's own code is still being compiled)
and the same job again (warm), and one JSON line. `bench/prep.py`'s ratio target 0.33 asks
`plm-prep` for about 3x the reference's time; compare that with these figures to see how much of
it the fixed costs take on this machine (docs/benchmarks.md, "Where the floor is").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def floor_job(spark, raw: Path, out: Path) -> int:
    """One run of the floor job; returns the number of users written."""
    from pyspark.sql import functions as F

    from plm.data.schema import RAW_SOURCES

    frames = []
    for source in RAW_SOURCES:
        if not list((raw / source).glob("*.parquet")):
            continue
        df = spark.read.parquet(str(raw / source))
        frames.append(df.select(*[F.col(c.name) if c.name in ("user_id", "ts") else F.col(c.name).cast("string")
                                  for c in RAW_SOURCES[source]]))
    if not frames:
        raise SystemExit(f"bench/prep_floor.py: {raw} has no {{payments,logins,orders}}/*.parquet")
    union = frames[0]
    for f in frames[1:]:
        union = union.unionByName(f, allowMissingColumns=True)
    lists = (union.repartition("user_id").sortWithinPartitions("user_id", "ts").groupBy("user_id")
             .agg(*[F.collect_list(c).alias(c) for c in union.columns if c != "user_id"]))
    lists.write.mode("overwrite").parquet(str(out))
    return spark.read.parquet(str(out)).count()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--raw", help="raw folder (default: a bench-prep world generated in a temp dir)")
    ap.add_argument("--users", type=int, default=14_000, help="users of the generated world")
    ap.add_argument("--master", default="local[2]")
    a = ap.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    from data_prep.prep import spark_session
    from plm.config import SparkConfig

    with tempfile.TemporaryDirectory(prefix="plm-prep-floor-") as tmp:
        raw = Path(a.raw) if a.raw else Path(tmp) / "raw"
        if not a.raw:
            from data_prep.synth import SynthConfig, generate_world, write_world

            write_world(generate_world(SynthConfig(users=a.users, seed=0, dirty_fraction=0.01)), raw)
        t0 = time.perf_counter()
        spark = spark_session(SparkConfig(master=a.master, app_name="plm-prep-floor", log_level="ERROR"))
        t1 = time.perf_counter()
        users = floor_job(spark, raw, Path(tmp) / "first")
        t2 = time.perf_counter()
        floor_job(spark, raw, Path(tmp) / "again")
        t3 = time.perf_counter()
    print(f"floor of a per-user list job on {raw} ({users:,} users, {a.master}):")
    print(f"  session start-up {t1 - t0:6.1f} s")
    print(f"  first job        {t2 - t1:6.1f} s   (fresh JVM)")
    print(f"  same job again   {t3 - t2:6.1f} s   (warm JVM)")
    print(json.dumps({"bench": "prep_floor", "users": users, "start_s": round(t1 - t0, 2),
                      "fresh_s": round(t2 - t1, 2), "warm_s": round(t3 - t2, 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
