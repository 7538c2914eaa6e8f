"""The fitted tokenizer (`tokenizer.json`) and the pure-Python path that applies it.

`plm-prep` fits vocabularies and numeric bin edges on training users (Spark) and saves them
here as JSON. This module re-applies them without Spark, with numpy and pyarrow only: what an
export job or a serving process calls on the raw events of a few users. `encode_raw` runs the
same steps as the Spark job (validate, drop duplicates, merge sources in time order, history
features, tokens, windows) and gives the same token ids; `tests/integration/test_prep_e2e.py`
proves it on the same events.

Example::

    tok = Tokenizer.load("prepared/tokenizer.json")
    seqs = encode_raw({"payments": payments_table}, tok, cutoff="2024-07-01T00:00:00Z")
    seqs.column("merchant")  # list<int32> per window, ids as in the prepared shards

Token ids of every field: 0 PAD, 1 MASK, 2 OOV, 3 MISSING, 4 N/A, then the fitted values
(categorical: most frequent first; numeric: bin k = values with k edges <= x).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from plm.data.schema import (
    CATEGORICAL_FIELDS,
    EVENT_TYPE_NAME,
    EVENT_TYPE_ORDER,
    HASHED_FIELDS,
    INT32_OUT_OF_RANGE,
    LOG_VALUE_FIELDS,
    MISSING,
    N_SPECIALS,
    NA,
    NUMERIC_FIELDS,
    NUMERIC_RANGES,
    OOV,
    RAW_SOURCES,
    SPECIALS,
    TS_TYPE,
    ContractError,
    check_file_schema,
    value_column,
)

TOKENIZER_FORMAT_VERSION = "1.2"  # 1.1: device_age; 1.2: merchant vocabulary as SHA-256 pseudonyms


class TokenizerFormatError(ValueError):
    """A tokenizer.json of another format version (e.g. written by an older plm-prep)."""


@dataclass
class NumericSpec:
    """Bin edges (raw units, ascending, unique) and standardisation of the continuous value."""

    edges: list[float]
    mean: float
    std: float
    log: bool  # value = (log1p(x) - mean) / std if log else (x - mean) / std


@dataclass
class Tokenizer:
    categorical: dict[str, list[str]]  # field -> values; id = N_SPECIALS + position
    numeric: dict[str, NumericSpec]
    fit: dict = field(default_factory=dict)  # how it was fitted (users, rows, settings)
    format_version: str = TOKENIZER_FORMAT_VERSION

    # ------------------------------------------------------------------ sizes and (de)serialise
    def vocab_sizes(self) -> dict[str, int]:
        """Embedding-table size per field, specials included."""
        sizes = {name: N_SPECIALS + len(v) for name, v in self.categorical.items()}
        sizes.update({name: N_SPECIALS + len(s.edges) + 1 for name, s in self.numeric.items()})
        return sizes

    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version,
            "specials": list(SPECIALS),
            "fields": {
                f.name: {"kind": f.kind, "sources": dict(f.sources), "doc": f.doc}
                for f in CATEGORICAL_FIELDS + NUMERIC_FIELDS
            },
            "categorical": self.categorical,
            "numeric": {k: asdict(v) for k, v in self.numeric.items()},
            "vocab_sizes": self.vocab_sizes(),
            "fit": self.fit,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Tokenizer:
        if d.get("format_version") != TOKENIZER_FORMAT_VERSION:
            hint = (" (format 1.1 kept raw merchant ids; 1.2 keeps their SHA-256 pseudonyms):"
                    " prepare the data again with this version of plm-prep") if d.get("format_version") == "1.1" else ""
            raise TokenizerFormatError(
                f"tokenizer format {d.get('format_version')!r} is not supported (expected {TOKENIZER_FORMAT_VERSION}){hint}"
            )
        return cls(
            categorical={k: list(v) for k, v in d["categorical"].items()},
            numeric={k: NumericSpec(**v) for k, v in d["numeric"].items()},
            fit=d.get("fit", {}),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        return cls.from_dict(json.loads(Path(path).read_text()))

    # ---------------------------------------------------------------------------- encoding
    def encode_events(self, events: pa.Table) -> dict[str, np.ndarray]:
        """Unified events with history features (see `history_features`) -> ids per field
        (int32) and standardised values (float32), in the table's row order."""
        etype = events.column("event_type")
        out: dict[str, np.ndarray] = {}
        for f in CATEGORICAL_FIELDS:
            col = events.column(_SOURCE_COLUMN.get(f.name, f.name))
            applies = _applies(etype, f)
            idx = pc.index_in(col, value_set=pa.array(self.categorical[f.name], pa.string()))
            ids = np.where(
                pc.is_null(idx).to_numpy(zero_copy_only=False),
                OOV,
                pc.fill_null(idx, 0).to_numpy(zero_copy_only=False) + N_SPECIALS,
            )
            ids = np.where(pc.is_null(col).to_numpy(zero_copy_only=False), MISSING, ids)
            out[f.name] = np.where(applies, ids, NA).astype(np.int32)
        for f in NUMERIC_FIELDS:
            spec = self.numeric[f.name]
            col = events.column(_SOURCE_COLUMN.get(f.name, f.name)).cast(pa.float64())
            applies = _applies(etype, f)
            isnull = pc.is_null(col).to_numpy(zero_copy_only=False)
            x = pc.fill_null(col, 0.0).to_numpy(zero_copy_only=False).astype(np.float64)
            bins = np.searchsorted(np.asarray(spec.edges, dtype=np.float64), x, side="right") + N_SPECIALS
            bins = np.where(isnull, MISSING, bins)
            out[f.name] = np.where(applies, bins, NA).astype(np.int32)
            with np.errstate(invalid="ignore", divide="ignore"):
                v = np.log1p(x) if spec.log else x
                v = (v - spec.mean) / spec.std
            out[value_column(f.name)] = np.where(applies & ~isnull, v, 0.0).astype(np.float32)
        return out


_SOURCE_COLUMN = {"log_dt": "dt_seconds"}


def _applies(etype: pa.ChunkedArray, f) -> np.ndarray:
    names = pa.array([EVENT_TYPE_NAME[s] for s in f.sources], pa.string())
    return pc.is_in(etype, value_set=names).to_numpy(zero_copy_only=False)


# ----------------------------------------------------------------------------- fitting helpers


def numeric_spec_from_sample(name: str, x: np.ndarray, n_bins: int) -> NumericSpec:
    """Quantile edges (i / n_bins, i = 1..n_bins-1; duplicates merged) and mean/std of the
    (log1p-)value, from a sample of raw values. Shared by the Spark job and the reference."""
    x = np.sort(np.asarray(x, dtype=np.float64))  # sorted: mean/std independent of row order
    x = x[np.isfinite(x)]
    log = name in LOG_VALUE_FIELDS
    if x.size == 0:
        return NumericSpec(edges=[], mean=0.0, std=1.0, log=log)
    edges = np.unique(np.quantile(x, np.arange(1, n_bins) / n_bins))
    v = np.log1p(x) if log else x
    mean, std = float(v.mean()), float(v.std())
    if not math.isfinite(std) or std <= 0:
        std = 1.0
    return NumericSpec(edges=[float(e) for e in edges], mean=mean, std=std, log=log)


def vocab_from_counts(counts: dict[str, int], min_count: int, max_size: int) -> list[str]:
    """Values seen at least `min_count` times, most frequent first (ties by value), capped."""
    kept = [(-c, v) for v, c in counts.items() if c >= min_count]
    kept.sort()
    return [v for _, v in kept[:max_size]]


# ------------------------------------------------------------------- the pure-Python pipeline


def canonicalize(table: pa.Table, source: str) -> pa.Table:
    """Contract columns of `source` in canonical types (ts -> timestamp[us, UTC]; naive read as UTC)."""
    cols, names = [], []
    for c in RAW_SOURCES[source]:
        col = table.column(c.name)
        if c.name == "ts":
            col = col.cast(pa.timestamp(col.type.unit), safe=False) if col.type.tz is None else col
            col = col.cast(pa.timestamp(col.type.unit, tz="UTC"), safe=False).cast(TS_TYPE, safe=False)
        elif pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type).cast(c.type)
        elif pa.types.is_int32(c.type) and pa.types.is_integer(col.type):
            col = to_int32(col)
        elif pa.types.is_float64(c.type):
            # -0.0 as 0.0: Spark's grouping (the exact-duplicate check) does not tell them apart
            col = col.cast(c.type)
            col = pc.if_else(pc.equal(col, 0.0), pa.scalar(0.0), col)
        else:
            col = col.cast(c.type)
        cols.append(col)
        names.append(c.name)
    return pa.table(cols, names=names)


def to_int32(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """An integer column of any width as the contract's int32. A value int32 cannot hold is
    `INT32_OUT_OF_RANGE` (int32's minimum), which every int32 field's range check refuses (mcc
    >= 0, n_items >= 1): the row is quarantined with that field's reason instead of crashing the
    cast. Like `data_prep.transforms.normalize_source`."""
    t = col.type
    if t.bit_width < 32 or pa.types.is_int32(t):
        return col.cast(pa.int32())
    bad = pc.greater(col, pa.scalar(2**31 - 1, t))
    if pa.types.is_signed_integer(t):
        bad = pc.or_(bad, pc.less(col, pa.scalar(-(2**31), t)))
    fit = pc.if_else(bad, pa.scalar(0, t), col).cast(pa.int32())
    return pc.if_else(bad, pa.scalar(INT32_OUT_OF_RANGE, pa.int32()), fit)


def iso_us(value: str) -> int:
    """ISO-8601 UTC time ("...Z", "+00:00" or naive) -> epoch microseconds."""
    return int(np.datetime64(value.replace("Z", "").replace("+00:00", ""), "us").astype(np.int64))


def clean_source(
    table: pa.Table, source: str, ts_min: str, ts_max: str
) -> tuple[pa.Table, pa.Table, int]:
    """Validate one source like `data_prep.transforms.flag_rows`.

    Returns (kept rows, quarantined rows with `reason`, number of exact duplicates dropped).
    """
    table = canonicalize(table, source)
    n_in = table.num_rows
    names = table.column_names
    distinct = table.group_by(names, use_threads=False).aggregate([])
    distinct = distinct.select(names)
    n_dup = n_in - distinct.num_rows

    ev = distinct.column("event_id")
    ts = distinct.column("ts").cast(pa.int64()).to_numpy(zero_copy_only=False)
    null_ts = pc.is_null(distinct.column("ts")).to_numpy(zero_copy_only=False)
    lo, hi = iso_us(ts_min), iso_us(ts_max)
    checks: list[tuple[str, np.ndarray]] = [
        ("null_event_id", pc.is_null(ev).to_numpy(zero_copy_only=False)),
        ("null_user_id", pc.is_null(distinct.column("user_id")).to_numpy(zero_copy_only=False)),
        ("null_ts", null_ts),
        ("ts_out_of_range", ~null_ts & ((ts < lo) | (ts > hi))),
    ]
    for name in ("amount", "n_items", "mcc"):
        if name in names:
            col = distinct.column(name)
            x = pc.fill_null(col.cast(pa.float64()), 1.0).to_numpy(zero_copy_only=False)
            low, low_excl, high = NUMERIC_RANGES[name]
            with np.errstate(invalid="ignore"):
                bad = ~np.isfinite(x) | ((x <= low) if low_excl else (x < low)) | (x > high)
            checks.append((f"{name}_invalid", bad))
    # distinct rows per event_id among the rows no other check quarantines (as flag_rows)
    invalid = np.logical_or.reduce([mask for _, mask in checks])
    valid = distinct.filter(pa.array(~invalid))
    per_event = valid.group_by("event_id", use_threads=False).aggregate([("event_id", "count")])
    conflicted = per_event.filter(pc.greater(per_event.column("event_id_count"), 1)).column("event_id")
    checks.append(
        ("conflicting_event_id", ~invalid & pc.fill_null(pc.is_in(ev, value_set=conflicted), False).to_numpy(zero_copy_only=False))
    )
    reason = np.full(distinct.num_rows, None, dtype=object)
    for name, mask in reversed(checks):
        reason = np.where(mask, name, reason)
    bad = reason != None  # noqa: E711  (object array)
    kept = distinct.filter(pa.array(~bad))
    quarantine = distinct.filter(pa.array(bad)).append_column("reason", pa.array(reason[bad], pa.string()))
    return kept, quarantine, n_dup


def pseudonymise(values: pa.Array | pa.ChunkedArray, digits: int) -> pa.Array:
    """Strings -> the first `digits` hex digits of SHA-256 of their UTF-8 bytes (nulls stay null),
    as Spark's `substring(sha2(x, 256), 1, digits)` computes them (see `HASHED_FIELDS`)."""
    enc = pc.dictionary_encode(values)
    if isinstance(enc, pa.ChunkedArray):
        enc = enc.combine_chunks()
    hashed = pa.array([hashlib.sha256(v.encode()).hexdigest()[:digits] for v in enc.dictionary.to_pylist()], pa.string())
    return pc.take(hashed, enc.indices)


def unify(kept: dict[str, pa.Table]) -> pa.Table:
    """Kept rows of each source -> the unified event table (like `data_prep.transforms.to_events`)."""
    parts = []
    for source, t in kept.items():
        n = t.num_rows
        present = set(t.column_names)

        def s(raw: str, t=t, present=present, n=n) -> pa.Array:
            if raw not in present:
                return pa.nulls(n, pa.string())
            return pc.cast(t.column(raw), pa.string())

        def d(raw: str, t=t, present=present, n=n) -> pa.Array:
            if raw not in present:
                return pa.nulls(n, pa.float64())
            return pc.cast(t.column(raw), pa.float64())

        parts.append(
            pa.table(
                {
                    "user_id": t.column("user_id"),
                    "event_id": t.column("event_id"),
                    "ts": t.column("ts"),
                    "type_order": pa.array(np.full(n, EVENT_TYPE_ORDER[source], np.int32)),
                    "event_type": pa.array([EVENT_TYPE_NAME[source]] * n, pa.string()),
                    "device_id": s("device_id"),
                    "currency": s("currency"),
                    "mcc": s("mcc"),
                    "channel": s("channel"),
                    "status": s("status"),
                    "merchant": pseudonymise(s("merchant_id"), HASHED_FIELDS["merchant"]),
                    "country": s("country" if source == "payments" else "ip_country"),
                    "auth_method": s("auth_method"),
                    "login_success": s("success"),
                    "category": s("category"),
                    "amount": d("amount"),
                    "n_items": d("n_items"),
                }
            ).combine_chunks()
        )
    return pa.concat_tables(parts).combine_chunks() if parts else pa.table({})


def history_features(events: pa.Table) -> pa.Table:
    """Sort in merge order (user, ts, source, event_id) and add ts_us, dt_seconds, hour, dow,
    device_new, device_age, country_foreign (like `data_prep.transforms.add_history_features`)."""
    events = events.sort_by([("user_id", "ascending"), ("ts", "ascending"), ("type_order", "ascending"), ("event_id", "ascending")])
    n = events.num_rows
    user_codes = pc.dictionary_encode(events.column("user_id")).combine_chunks().indices.to_numpy()
    ts_us = events.column("ts").cast(pa.int64()).to_numpy(zero_copy_only=False).astype(np.int64)
    first = np.ones(n, dtype=bool)
    first[1:] = user_codes[1:] != user_codes[:-1]
    dt = np.empty(n, dtype=np.float64)
    dt[0:1] = np.nan
    dt[1:] = (ts_us[1:] - ts_us[:-1]) / 1e6
    dt = np.where(first, np.nan, dt)
    hour = (ts_us // 3_600_000_000) % 24
    dow = (ts_us // 86_400_000_000 + 3) % 7  # 1970-01-01 was a Thursday (Monday = 0)

    dev = events.column("device_id")
    dev_null = pc.is_null(dev).to_numpy(zero_copy_only=False)
    # nulls get their own code (an empty-string device is a device, as in Spark's per-user set)
    dev_codes = pc.dictionary_encode(dev, null_encoding="encode").combine_chunks().indices.to_numpy().astype(np.int64)
    key = user_codes.astype(np.int64) * (int(dev_codes.max(initial=0)) + 1) + dev_codes
    _, first_idx, inverse = np.unique(key, return_index=True, return_inverse=True)
    device_new = np.zeros(n, dtype=bool)
    device_new[first_idx] = True
    device_age = (ts_us - ts_us[first_idx][inverse.reshape(-1)]) / 1e6  # rows are in time order

    country = events.column("country")
    c_null = pc.is_null(country).to_numpy(zero_copy_only=False)
    c_vals = np.asarray(pc.fill_null(country, "").to_pylist(), dtype=object)
    nn = np.flatnonzero(~c_null)
    u_nn, first_nn = np.unique(user_codes[nn], return_index=True)
    home = np.full(int(user_codes.max(initial=-1)) + 1, None, dtype=object)
    home[u_nn] = c_vals[nn[first_nn]]
    foreign = c_vals != home[user_codes] if n else np.zeros(0, bool)

    def tf(mask: np.ndarray, null: np.ndarray) -> pa.Array:
        return pa.array(np.where(mask, "true", "false"), pa.string(), mask=null)

    return (
        events.drop(["device_id"])
        .append_column("ts_us", pa.array(ts_us, pa.int64()))
        .append_column("dt_seconds", pa.array(dt, pa.float64(), mask=np.isnan(dt)))
        .append_column("hour", pa.array(hour.astype(str).astype(object), pa.string()))
        .append_column("dow", pa.array(dow.astype(str).astype(object), pa.string()))
        .append_column("device_new", tf(device_new, dev_null))
        .append_column("device_age", pa.array(device_age, pa.float64(), mask=dev_null))
        .append_column("country_foreign", tf(foreign, c_null))
    )


def window_bounds(history_len: np.ndarray, max_events: int, stride: int) -> tuple[np.ndarray, ...]:
    """(user position, window_index, start, end) of every window; see `build_windows`."""
    n = np.asarray(history_len, dtype=np.int64)
    n_windows = np.where(n <= max_events, 1, 1 + -(-(n - max_events) // stride))
    user = np.repeat(np.arange(n.size), n_windows)
    k = np.arange(user.size) - np.repeat(np.cumsum(n_windows) - n_windows, n_windows)
    end = n[user] - k * stride
    start = np.maximum(0, end - max_events)
    return user, k, start, end


def build_windows(events: pa.Table, tokens: dict[str, np.ndarray], max_events: int, stride: int) -> pa.Table:
    """Sorted events + their tokens -> one row per window (the shard schema minus `split`)."""
    if not (0 < stride <= max_events):
        raise ValueError(f"stride must be in 1..max_events ({max_events}), got {stride}")
    user_ids = events.column("user_id").combine_chunks()
    codes = pc.dictionary_encode(user_ids).indices.to_numpy()
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]]) if codes.size else np.zeros(0, np.int64)
    history_len = np.diff(np.r_[starts, codes.size])
    user, k, start, end = window_bounds(history_len, max_events, stride)
    lens = end - start
    offsets = np.r_[0, np.cumsum(lens)].astype(np.int32)
    # absolute event index of every element of every window
    idx = np.repeat(starts[user] + start - offsets[:-1], lens) + np.arange(offsets[-1])
    ts_us = events.column("ts_us").to_numpy()

    def lists(values: np.ndarray, typ: pa.DataType) -> pa.Array:
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[idx], typ))

    cols = {
        "user_id": user_ids.take(pa.array(starts[user])),
        "window_index": pa.array(k, pa.int32()),
        "window_start": pa.array(start, pa.int32()),
        "history_len": pa.array(history_len[user], pa.int32()),
        "n_events": pa.array(lens, pa.int32()),
        "ts": lists(ts_us, pa.int64()),
    }
    for name, arr in tokens.items():
        cols[name] = lists(arr, pa.float32() if arr.dtype == np.float32 else pa.int32())
    return pa.table(cols)


def zero_accounting() -> dict:
    """One source's accounting before any row (`encode_raw`, summed by plm.export.spark)."""
    return {"input_rows": 0, "kept_rows": 0, "duplicate_rows": 0, "quarantined_rows": {}, "quarantined_total": 0,
            "after_cutoff_rows": 0}


def encode_raw(
    tables: dict[str, pa.Table],
    tokenizer: Tokenizer,
    cutoff: str | None = None,
    ts_min: str = "1990-01-01T00:00:00Z",
    ts_max: str = "2100-01-01T00:00:00Z",
    max_events: int = 512,
    stride: int = 256,
    accounting: dict | None = None,
) -> pa.Table:
    """Raw contract tables of some users (any subset of sources) -> windows of token ids.

    Same validation, merge order, features, ids and windows as `plm-prep` (the Spark job): a
    table whose schema breaks the raw contract raises `ContractError` naming the source, column
    and expected type, as plm-prep does for a file; invalid rows and duplicates are dropped here
    (use `clean_source` to see them). Events at or after `cutoff` are excluded. Rows are ordered
    by (user_id, window_index). `accounting`, a dict, receives per source what plm-prep's
    manifest says: `input_rows = kept_rows + quarantined_total + duplicate_rows`, the count per
    quarantine reason, and the kept rows at or after the cut-off (`after_cutoff_rows`).
    """
    unknown = sorted(set(tables) - set(RAW_SOURCES))
    if unknown:
        raise ContractError(f"unknown raw source(s) {unknown}; expected any of {list(RAW_SOURCES)}")
    kept = {}
    for source, t in tables.items():
        if t is None:
            continue
        for c in RAW_SOURCES[source]:  # an all-null column of a few users' rows has Arrow type null
            i = t.schema.get_field_index(c.name)
            if i >= 0 and pa.types.is_null(t.schema.field(i).type):
                t = t.set_column(i, c.name, pa.nulls(t.num_rows, c.type))
        check_file_schema(source, f"tables['{source}']", t.schema)
        if t.num_rows == 0:
            if accounting is not None:
                accounting[source] = zero_accounting()
            continue
        k, q, n_dup = clean_source(t, source, ts_min, ts_max)
        n_kept = k.num_rows
        if cutoff is not None:
            k = k.filter(pc.less(k.column("ts").cast(pa.int64()), iso_us(cutoff)))
        if accounting is not None:
            reasons = dict(Counter(q.column("reason").to_pylist()))
            accounting[source] = {"input_rows": t.num_rows, "kept_rows": n_kept, "duplicate_rows": n_dup,
                                  "quarantined_rows": reasons, "quarantined_total": q.num_rows,
                                  "after_cutoff_rows": n_kept - k.num_rows}
        if k.num_rows:
            kept[source] = k
    if not kept:
        raise ValueError("encode_raw: no valid events before the cut-off in the given tables")
    events = history_features(unify(kept))
    return build_windows(events, tokenizer.encode_events(events), max_events, stride)
