"""Tiny prepared-data folders written by hand with pyarrow (no Spark), exactly in the shard
schema of `plm.data.schema.shard_schema()`, with a manifest.json and a tokenizer.json.

Every event's values are a function of (user number, event position in the history), so a test
can check that a batch holds the right events in the right order: `ts` = T0 + u * 1e9 + pos *
1e6 (unique per event), `hour` = 5 + pos % 24, `merchant` = 5 + (u * 7 + pos) % 50, numeric
value columns = pos + u / 1000, and so on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from plm.data.schema import (
    CATEGORICAL_FIELDS,
    NUMERIC_FIELDS,
    SHARD_FORMAT_VERSION,
    shard_schema,
    value_column,
)
from plm.data.tokenizer import NumericSpec, Tokenizer

T0 = 1_700_000_000_000_000
CUTOFF = "2024-01-01T00:00:00.000000Z"  # after every event written here (T0 + 1e9 s at most: 2023-11-26)


def windows_of(n: int, max_events: int, stride: int) -> list[tuple[int, int]]:
    """(start, end) of each window of a history of n events, window 0 first (as plm-prep)."""
    k = 1 if n <= max_events else 1 + -(-(n - max_events) // stride)
    out = []
    for j in range(k):
        end = n - j * stride
        out.append((max(0, end - max_events), end))
    return out


def event_values(u: int, pos: np.ndarray) -> dict[str, np.ndarray]:
    """Per-field values of user u's events at history positions `pos`."""
    out: dict[str, np.ndarray] = {"ts": (T0 + u * 1_000_000_000 + pos * 1_000_000).astype(np.int64)}
    for i, f in enumerate(CATEGORICAL_FIELDS):
        out[f.name] = (5 + (u * 7 + pos * (i + 1)) % 20).astype(np.int32)
    for i, f in enumerate(NUMERIC_FIELDS):
        out[f.name] = (5 + (u + pos + i) % 8).astype(np.int32)
        out[value_column(f.name)] = (pos + u / 1000.0 + i).astype(np.float32)
    return out


def shard_table(users: list[tuple[str, int, int]], split: str, max_events: int, stride: int) -> pa.Table:
    """Rows for users [(user_id, user number, history length)], sorted by (user_id, window)."""
    schema = shard_schema()
    cols: dict[str, list] = {n: [] for n in schema.names}
    for uid, u, n in sorted(users):
        for k, (s, e) in enumerate(windows_of(n, max_events, stride)):
            vals = event_values(u, np.arange(s, e))
            cols["user_id"].append(uid)
            cols["split"].append(split)
            cols["window_index"].append(k)
            cols["window_start"].append(s)
            cols["history_len"].append(n)
            cols["n_events"].append(e - s)
            for c, v in vals.items():
                cols[c].append(v.tolist())
    return pa.table({n: pa.array(cols[n], schema.field(n).type) for n in schema.names}, schema=schema)


def toy_tokenizer() -> Tokenizer:
    cat = {f.name: [f"v{i}" for i in range(20)] for f in CATEGORICAL_FIELDS}
    num = {f.name: NumericSpec(edges=[float(i) for i in range(7)], mean=0.0, std=1.0, log=False) for f in NUMERIC_FIELDS}
    return Tokenizer(categorical=cat, numeric=num, fit={"users": 0})


def history_lengths(n_users: int, seed: int = 0, max_n: int = 70) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(x) for x in rng.integers(1, max_n + 1, size=n_users)]


def write_prepared(
    root: Path,
    splits: dict[str, list[int]] | None = None,
    *,
    max_events: int = 16,
    stride: int = 8,
    users_per_shard: int = 7,
    row_group_size: int = 10,
    format_version: str = SHARD_FORMAT_VERSION,
) -> Path:
    """A prepared folder: `splits` maps split -> history length of each of its users (default:
    train 40 users, val 9, test 0 -> test has no shards). Shards hold `users_per_shard` users and
    row groups of `row_group_size` rows, so there are several files and row groups."""
    if splits is None:
        splits = {"train": history_lengths(40, 0), "val": history_lengths(9, 1), "test": []}
    root.mkdir(parents=True, exist_ok=True)
    man_splits = {}
    u_next = 0
    for split, lens in splits.items():
        (root / split).mkdir(exist_ok=True)
        users = []
        for n in lens:
            users.append((f"{split}-u{u_next:04d}", u_next, n))
            u_next += 1
        shards = []
        for i in range(0, len(users), users_per_shard):
            t = shard_table(users[i : i + users_per_shard], split, max_events, stride)
            rel = f"{split}/part-{len(shards):05d}.parquet"
            pq.write_table(t, root / rel, row_group_size=row_group_size)
            shards.append({"path": rel, "rows": t.num_rows})
        man_splits[split] = {
            "users": len(users),
            "windows": sum(s["rows"] for s in shards),
            "events": int(sum(lens)),
            "shards": shards,
        }
    tok = toy_tokenizer()
    tok.save(root / "tokenizer.json")
    manifest = {
        "format_version": format_version,
        "config": {"max_events": max_events, "stride": stride, "ts_min": "1990-01-01T00:00:00Z"},
        "cutoff": CUTOFF,
        "tokenizer": {"path": "tokenizer.json", "vocab_sizes": tok.vocab_sizes()},
        "splits": man_splits,
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root


def read_windows(root: Path, split: str) -> dict[tuple[str, int], dict]:
    """(user_id, window_index) -> {column: list or scalar} of every row of a split's shards."""
    man = json.loads((root / "manifest.json").read_text())
    out = {}
    for s in man["splits"][split]["shards"]:
        for row in pq.read_table(root / s["path"]).to_pylist():
            out[(row["user_id"], row["window_index"])] = row
    return out
