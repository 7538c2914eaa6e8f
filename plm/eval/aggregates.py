"""The hand-built baseline: per-user aggregates of the raw events (pyarrow/numpy, no Spark).

What a data scientist would build before reaching for a sequence model, computed from exactly
the rows `plm-prep` keeps: each source is validated with the tokenizer twin
(`plm.data.tokenizer.clean_source`: invalid rows and exact duplicates dropped, conflicting
event ids quarantined), merged with `unify` and given the same history features
(`history_features`: time gaps, hour, weekday, first use of a device, foreign country), and
only events strictly before the user's cut-off are used.

Feature families (names in `Aggregates.names`; the full list is in docs/evaluation.md):
counts per source and in the last 1/7/30/90 days, recency per source, tenure, active days,
activity trend (last 30 days vs the 60 before), payment amounts raw and currency-normalised
(sum/mean/std/max, recent sums and trend), order amounts and items, counts and shares per
status / channel / MCC group / frequent MCC / order category / auth method, declined payments,
failed logins, distinct merchants/devices/countries/currencies/MCCs, foreign-country shares,
new-device counts (and new device + foreign IP logins, payments on a device first seen within
the hour), hour-of-day and weekday shares, and inter-event gap statistics.

Users without any event get zero counts and NaN for every statistic (LightGBM handles NaN).

Example::

    agg = compute_aggregates("runs/w/raw", users=np.array(["u1", "u2"]), cutoff_us=np.full(2, t_us))
    agg.X.shape  # (2, len(agg.names))
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_prep.storage import Location
from plm.data.schema import RAW_SOURCES, check_file_schema
from plm.data.tokenizer import canonicalize, clean_source, history_features, unify

DAY_US = 86_400_000_000
HOUR_US = 3_600_000_000

# MCC groups (ranges of the ISO 18245 / card-network category codes), checked in order.
MCC_GROUPS: tuple[tuple[str, tuple[tuple[int, int], ...]], ...] = (
    ("travel", ((3000, 3999), (4411, 4411), (4511, 4511), (4722, 4722), (7011, 7011), (7512, 7512))),
    ("transport", ((4000, 4299), (4784, 4789), (5541, 5542))),
    ("telecom_utilities", ((4800, 4828), (4830, 4999))),
    ("money_transfer", ((4829, 4829), (6536, 6540))),
    ("cash", ((6010, 6011),)),
    ("financial", ((6000, 6009), (6012, 6099), (6200, 6399))),
    ("grocery", ((5411, 5499),)),
    ("restaurants", ((5811, 5814),)),
    ("digital", ((5815, 5818),)),
    ("electronics_home", ((5700, 5799), (5200, 5299))),
    ("clothing", ((5600, 5699),)),
    ("retail", ((5000, 5199), (5300, 5399), (5900, 5999))),
    ("gambling", ((7995, 7995), (7800, 7802))),
    ("entertainment", ((7800, 7999),)),
    ("services", ((7000, 7799), (8000, 8999))),
    ("government", ((9000, 9999),)),
)
CASH_OUT_MCCS = (4829, 6010, 6011)  # money leaving the account (a churn tell)
TOP_MCCS = 30  # individual MCCs with their own share feature (most frequent first)
TOP_VALUES = {"status": 6, "channel": 8, "category": 12, "auth_method": 6}
WINDOWS_DAYS = (1, 7, 30, 90)


@dataclass
class Aggregates:
    users: np.ndarray  # user_id (object array), the row order of X
    names: list[str]  # feature names, the column order of X
    X: np.ndarray  # float64 (users, features); NaN = undefined (no events of that kind)
    accounting: dict = field(default_factory=dict)  # per source: input/kept/... rows used


# ------------------------------------------------------------------------------------ reading


def read_raw(raw: str) -> dict[str, pa.Table]:
    """Each present source of a raw folder -> one table in canonical contract columns.

    Every file's schema is checked against the contract first (`ContractError` names the file,
    the column and the expected type); absent or empty sources are left out.
    """
    root = Location.of(raw)
    if not root.is_dir():
        raise FileNotFoundError(f"raw={raw}: folder not found")
    tables: dict[str, pa.Table] = {}
    for source, cols in RAW_SOURCES.items():
        loc = root.child(source)
        parts = []
        for path in loc.list_files(".parquet"):
            with loc.fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                check_file_schema(source, loc.uri_of(path), pf.schema_arrow)
                t = pf.read(columns=[c.name for c in cols])
            if t.num_rows:
                parts.append(canonicalize(t, source))
        if parts:
            tables[source] = pa.concat_tables(parts)
    return tables


def clean_events(
    tables: dict[str, pa.Table],
    users: np.ndarray,
    cutoff_us: np.ndarray,
    ts_min: str,
    ts_max: str,
) -> tuple[pa.Table | None, dict]:
    """Raw tables -> unified events (with history features) of `users` strictly before each
    user's cut-off, plus per-source accounting of what was dropped and why."""
    value_set = pa.array(list(users), pa.string())
    kept, accounting = {}, {}
    for source, t in tables.items():
        k, quarantine, n_dup = clean_source(t, source, ts_min, ts_max)
        code = pc.index_in(k.column("user_id"), value_set=value_set)
        in_set = pc.is_valid(code).to_numpy(zero_copy_only=False)
        c = pc.fill_null(code, 0).to_numpy(zero_copy_only=False)
        ts = k.column("ts").cast(pa.int64()).to_numpy(zero_copy_only=False)
        before = in_set & (ts < cutoff_us[c])
        accounting[source] = {
            "input_rows": t.num_rows,
            "duplicate_rows": n_dup,
            "quarantined_rows": quarantine.num_rows,
            "other_users_rows": int((~in_set).sum()),
            "after_cutoff_rows": int((in_set & ~before).sum()),
            "used_rows": int(before.sum()),
        }
        k = k.filter(pa.array(before))
        if k.num_rows:
            kept[source] = k
    if not kept:
        return None, accounting
    events = unify(kept)
    # history_features drops device_id (private); keep a copy for per-device features
    events = events.append_column("device_key", events.column("device_id"))
    return history_features(events), accounting


# ---------------------------------------------------------------------------------- helpers


class _Per:
    """Per-user reductions over events (codes = row of the user in the output)."""

    def __init__(self, code: np.ndarray, n_users: int):
        self.code, self.U = code, n_users

    def count(self, mask: np.ndarray) -> np.ndarray:
        return np.bincount(self.code[mask], minlength=self.U).astype(np.float64)

    def sum(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.bincount(self.code[mask], weights=x[mask], minlength=self.U)

    def mean(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return _div(self.sum(x, mask), self.count(mask))

    def std(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        n = self.count(mask)
        m = _div(self.sum(x, mask), n)
        m2 = _div(self.sum(x * x, mask), n)
        return np.sqrt(np.maximum(m2 - m * m, 0.0))

    def max(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        out = np.full(self.U, -np.inf)
        np.maximum.at(out, self.code[mask], x[mask])
        return np.where(np.isneginf(out), np.nan, out)

    def min(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return -self.max(-x, mask)

    def distinct(self, values: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Distinct non-negative integer `values` per user among `mask` rows."""
        m = mask & (values >= 0)
        k = int(values.max(initial=0)) + 1
        keys = np.unique(self.code[m].astype(np.int64) * k + values[m])
        return np.bincount(keys // k, minlength=self.U).astype(np.float64)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def _strings(events: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(values as object array with None, null mask)."""
    col = events.column(name)
    return np.asarray(col.to_pylist(), dtype=object), pc.is_null(col).to_numpy(zero_copy_only=False)


def _codes(col: pa.ChunkedArray) -> np.ndarray:
    """Dictionary codes of a string column, -1 for null."""
    enc = pc.dictionary_encode(col).combine_chunks()
    idx = enc.indices
    return pc.fill_null(idx, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def _top_values(values: np.ndarray, mask: np.ndarray, n: int) -> list[str]:
    v = values[mask & (values != None)]  # noqa: E711  (object array)
    if v.size == 0:
        return []
    uniq, counts = np.unique(v.astype(str), return_counts=True)
    order = sorted(range(uniq.size), key=lambda i: (-counts[i], uniq[i]))
    return [str(uniq[i]) for i in order[:n]]


def _slug(value: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(value).lower()).strip("_") or "empty"


def mcc_group(mcc: np.ndarray) -> np.ndarray:
    """MCC (int, -1 for missing) -> index into MCC_GROUPS, len(MCC_GROUPS) for 'other'."""
    out = np.full(mcc.shape, len(MCC_GROUPS), dtype=np.int64)
    assigned = np.zeros(mcc.shape, dtype=bool)
    for g, (_, ranges) in enumerate(MCC_GROUPS):
        hit = np.zeros(mcc.shape, dtype=bool)
        for lo, hi in ranges:
            hit |= (mcc >= lo) & (mcc <= hi)
        hit &= ~assigned
        out[hit] = g
        assigned |= hit
    return out


# ------------------------------------------------------------------------------- the features


def aggregate_features(events: pa.Table | None, users: np.ndarray, cutoff_us: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Unified events with history features (of `users`, before their cut-offs) -> (names, X)."""
    U = len(users)
    F: dict[str, np.ndarray] = {}
    if events is None or events.num_rows == 0:
        events = _empty_events()
    code = pc.index_in(events.column("user_id"), value_set=pa.array(list(users), pa.string()))
    code = pc.fill_null(code, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    P = _Per(code, U)
    n = events.num_rows
    allm = np.ones(n, dtype=bool)
    etype = np.asarray(events.column("event_type").to_pylist(), dtype=object)
    is_pay, is_login, is_order = etype == "payment", etype == "login", etype == "order"
    src = {"payment": is_pay, "login": is_login, "order": is_order}
    ts = events.column("ts_us").to_numpy().astype(np.int64)
    age = (cutoff_us[code] - ts) / DAY_US  # days before the user's cut-off (> 0)

    # --- volume, windows, recency, tenure
    F["n_events"] = P.count(allm)
    for s, m in src.items():
        F[f"n_{s}"] = P.count(m)
    for w in WINDOWS_DAYS:
        recent = age <= w
        F[f"n_events_last{w}d"] = P.count(recent)
        for s, m in src.items():
            if w in (7, 30):
                F[f"n_{s}_last{w}d"] = P.count(m & recent)
    mid = (age > 30) & (age <= 90)
    for s, m in src.items():
        F[f"n_{s}_30_90d"] = P.count(m & mid)
        F[f"{s}_trend_30d_vs_prev60d"] = (F[f"n_{s}_last30d"] + 1) / (F[f"n_{s}_30_90d"] / 2 + 1)
    F["tenure_days"] = P.max(age, allm)
    F["days_since_last_event"] = P.min(age, allm)
    for s, m in src.items():
        F[f"days_since_last_{s}"] = P.min(age, m)
        F[f"days_since_first_{s}"] = P.max(age, m)
    day = ts // DAY_US
    F["active_days"] = P.distinct(day - day.min(initial=0), allm)
    F["events_per_active_day"] = _div(F["n_events"], F["active_days"])
    F["active_day_share"] = _div(F["active_days"], np.ceil(F["tenure_days"]))

    # --- amounts: payments raw and normalised by the currency's median payment, orders
    amount = pc.fill_null(events.column("amount"), np.nan).to_numpy(zero_copy_only=False).astype(np.float64)
    has_amt = np.isfinite(amount) & (amount > 0)
    currency, cur_null = _strings(events, "currency")
    cur_code = _codes(events.column("currency"))
    norm = np.full(n, np.nan)
    pm = is_pay & has_amt
    for c in np.unique(cur_code[pm & (cur_code >= 0)]):
        sel = pm & (cur_code == c)
        norm[sel] = amount[sel] / np.median(amount[sel])
    sel = pm & (cur_code < 0)
    if sel.any():
        norm[sel] = amount[sel] / np.median(amount[pm])
    lognorm = np.log(np.where(np.isfinite(norm), norm, 1.0))
    status, _ = _strings(events, "status")
    ok = is_pay & (status == "success")
    for tag, m in (("payment", pm), ("order", is_order & has_amt)):
        F[f"{tag}_amount_sum"] = P.sum(amount, m)
        F[f"{tag}_amount_mean"] = P.mean(amount, m)
        F[f"{tag}_amount_std"] = P.std(amount, m)
        F[f"{tag}_amount_max"] = P.max(amount, m)
        F[f"{tag}_log_amount_mean"] = P.mean(np.log1p(np.where(m, amount, 0)), m)
    F["payment_success_amount_sum"] = P.sum(amount, pm & ok)
    F["payment_norm_amount_sum"] = P.sum(norm, pm)
    F["payment_norm_success_sum"] = P.sum(norm, pm & ok)
    F["payment_lognorm_mean"] = P.mean(lognorm, pm)
    F["payment_lognorm_std"] = P.std(lognorm, pm)
    F["payment_lognorm_max"] = P.max(lognorm, pm)
    F["payment_lognorm_min"] = P.min(lognorm, pm)
    for w in (7, 30):
        F[f"payment_norm_sum_last{w}d"] = P.sum(norm, pm & ok & (age <= w))
    F["payment_norm_sum_30_90d"] = P.sum(norm, pm & ok & mid)
    F["payment_spend_trend_30d_vs_prev60d"] = (F["payment_norm_sum_last30d"] + 1) / (F["payment_norm_sum_30_90d"] / 2 + 1)
    n_items = pc.fill_null(events.column("n_items"), np.nan).to_numpy(zero_copy_only=False).astype(np.float64)
    im = is_order & np.isfinite(n_items)
    F["order_items_sum"] = P.sum(n_items, im)
    F["order_items_mean"] = P.mean(n_items, im)

    # --- categorical counts and shares
    def shares(prefix: str, values: np.ndarray, mask: np.ndarray, top: int, denom: np.ndarray) -> None:
        top_values = _top_values(values, mask, top)
        slugs = [_slug(v) for v in top_values]
        for v, slug in zip(top_values, slugs):
            if slugs.count(slug) > 1:  # values that differ only in case or punctuation ("E-Commerce",
                # "e commerce") are separate tokens for the model: separate features here too
                slug = f"{slug}_{hashlib.sha256(str(v).encode()).hexdigest()[:6]}"
            c = P.count(mask & (values == v))
            F[f"{prefix}_{slug}_n"] = c
            F[f"{prefix}_{slug}_share"] = _div(c, denom)

    shares("payment_status", status, is_pay, TOP_VALUES["status"], F["n_payment"])
    channel, _ = _strings(events, "channel")
    shares("payment_channel", channel, is_pay, TOP_VALUES["channel"], F["n_payment"])
    category, _ = _strings(events, "category")
    shares("order_category", category, is_order, TOP_VALUES["category"], F["n_order"])
    auth, _ = _strings(events, "auth_method")
    shares("login_auth", auth, is_login, TOP_VALUES["auth_method"], F["n_login"])
    mcc_str, mcc_null = _strings(events, "mcc")
    mcc = np.where(mcc_null, -1, np.array([int(x) if x is not None else -1 for x in mcc_str], dtype=np.int64))
    group = mcc_group(mcc)
    recent30 = age <= 30
    n_pay30 = F["n_payment_last30d"]
    for g, name in enumerate([g for g, _ in MCC_GROUPS] + ["other"]):
        m = is_pay & (mcc >= 0) & (group == g)
        if not m.any():
            continue
        F[f"mcc_group_{name}_n"] = P.count(m)
        F[f"mcc_group_{name}_share"] = _div(F[f"mcc_group_{name}_n"], F["n_payment"])
        F[f"mcc_group_{name}_amount_share"] = _div(P.sum(norm, m), F["payment_norm_amount_sum"])
        F[f"mcc_group_{name}_share_last30d"] = _div(P.count(m & recent30), n_pay30)
    for v in _top_values(mcc_str, is_pay, TOP_MCCS):
        F[f"mcc_{v}_share"] = _div(P.count(is_pay & (mcc_str == v)), F["n_payment"])
    cash = is_pay & np.isin(mcc, CASH_OUT_MCCS)
    F["cash_out_share"] = _div(P.count(cash), F["n_payment"])
    F["cash_out_share_last30d"] = _div(P.count(cash & recent30), n_pay30)
    F["cash_out_norm_sum_last30d"] = P.sum(norm, cash & recent30)

    # --- failures
    declined = is_pay & (status == "declined")
    F["declined_n"] = P.count(declined)
    F["declined_share"] = _div(F["declined_n"], F["n_payment"])
    F["declined_last7d"] = P.count(declined & (age <= 7))
    F["declined_norm_amount_max"] = P.max(norm, declined & np.isfinite(norm))
    success, _ = _strings(events, "login_success")
    failed = is_login & (success == "false")
    F["failed_logins_n"] = P.count(failed)
    F["failed_logins_share"] = _div(F["failed_logins_n"], F["n_login"])
    F["failed_logins_last7d"] = P.count(failed & (age <= 7))

    # --- distinct entities
    F["distinct_merchants"] = P.distinct(_codes(events.column("merchant")), allm)
    F["distinct_payment_merchants"] = P.distinct(_codes(events.column("merchant")), is_pay)
    dev_code = _codes(events.column("device_key"))
    F["distinct_devices"] = P.distinct(dev_code, allm)
    F["distinct_countries"] = P.distinct(_codes(events.column("country")), allm)
    F["distinct_currencies"] = P.distinct(cur_code, allm)
    F["distinct_mccs"] = P.distinct(mcc, is_pay)
    F["merchants_per_payment"] = _div(F["distinct_payment_merchants"], F["n_payment"])

    # --- foreign activity (country differs from the user's first seen country)
    foreign_s, foreign_null = _strings(events, "country_foreign")
    foreign = foreign_s == "true"
    for s in ("payment", "login"):
        m = src[s] & ~foreign_null
        F[f"{s}_foreign_n"] = P.count(m & foreign)
        F[f"{s}_foreign_share"] = _div(F[f"{s}_foreign_n"], P.count(m))
    F["foreign_events_last30d"] = P.count(foreign & recent30)
    F["foreign_norm_amount_sum"] = P.sum(norm, pm & foreign & np.isfinite(norm))

    # --- new devices (first event of a (user, device) pair in the history)
    new_s, _ = _strings(events, "device_new")
    new = (new_s == "true") & (dev_code >= 0)
    for s in ("payment", "login", "order"):
        F[f"{s}_new_device_n"] = P.count(src[s] & new)
    F["new_device_last30d"] = P.count(new & recent30)
    F["new_device_last7d"] = P.count(new & (age <= 7))
    F["login_new_device_foreign_n"] = P.count(is_login & new & foreign)
    F["login_new_device_failed_n"] = P.count(failed & new)
    # payments on a device first seen less than an hour earlier
    first_seen = np.full(n, np.iinfo(np.int64).max)
    if n:
        key = code * (int(dev_code.max(initial=0)) + 2) + (dev_code + 1)
        k_uniq, inv = np.unique(key, return_inverse=True)
        first = np.full(k_uniq.size, np.iinfo(np.int64).max)
        np.minimum.at(first, inv, ts)
        first_seen = first[inv]
    young = is_pay & (dev_code >= 0) & (ts - first_seen < HOUR_US)
    F["payment_young_device_n"] = P.count(young)
    F["payment_young_device_norm_max"] = P.max(norm, young & np.isfinite(norm))
    F["payment_young_device_foreign_n"] = P.count(young & foreign)

    # --- time of day / week (UTC)
    hour = (ts // HOUR_US) % 24
    dow = (ts // DAY_US + 3) % 7  # Monday = 0
    for b in range(8):
        F[f"hour_{3 * b:02d}_{3 * b + 3:02d}_share"] = _div(P.count((hour // 3) == b), F["n_events"])
    F["hour_sin_mean"] = P.mean(np.sin(2 * np.pi * hour / 24), allm)
    F["hour_cos_mean"] = P.mean(np.cos(2 * np.pi * hour / 24), allm)
    for d, name in enumerate(("mon", "tue", "wed", "thu", "fri", "sat", "sun")):
        F[f"dow_{name}_share"] = _div(P.count(dow == d), F["n_events"])
    F["weekend_share"] = _div(P.count(dow >= 5), F["n_events"])
    F["payment_weekend_share"] = _div(P.count(is_pay & (dow >= 5)), F["n_payment"])
    F["payment_night_share"] = _div(P.count(is_pay & ((hour < 6) | (hour >= 22))), F["n_payment"])

    # --- inter-event gaps (seconds since the user's previous event of any source)
    dt = pc.fill_null(events.column("dt_seconds"), np.nan).to_numpy(zero_copy_only=False).astype(np.float64)
    gm = np.isfinite(dt)
    lg = np.log10(np.where(gm, dt, 0.0) + 1.0)
    F["gap_log10_mean"] = P.mean(lg, gm)
    F["gap_log10_std"] = P.std(lg, gm)
    F["gap_max_days"] = P.max(dt / 86400.0, gm)
    F["gap_min_seconds"] = P.min(dt, gm)
    ngaps = P.count(gm)
    F["gap_under_1min_share"] = _div(P.count(gm & (dt < 60)), ngaps)
    F["gap_under_10min_share"] = _div(P.count(gm & (dt < 600)), ngaps)
    F["gap_over_7d_n"] = P.count(gm & (dt > 7 * 86400))
    F["last_gap_days_vs_mean"] = _div(F["days_since_last_event"], _div(F["tenure_days"], F["n_events"]))

    names = list(F)
    X = np.column_stack([F[k] for k in names]) if names else np.zeros((U, 0))
    return names, X.astype(np.float64)


def _empty_events() -> pa.Table:
    s = pa.string()
    return pa.table(
        {
            "user_id": pa.array([], s), "event_type": pa.array([], s), "ts_us": pa.array([], pa.int64()),
            "amount": pa.array([], pa.float64()), "n_items": pa.array([], pa.float64()),
            "currency": pa.array([], s), "status": pa.array([], s), "channel": pa.array([], s),
            "category": pa.array([], s), "auth_method": pa.array([], s), "mcc": pa.array([], s),
            "login_success": pa.array([], s), "merchant": pa.array([], s), "device_key": pa.array([], s),
            "country": pa.array([], s), "country_foreign": pa.array([], s), "device_new": pa.array([], s),
            "dt_seconds": pa.array([], pa.float64()),
        }
    )


def compute_aggregates(
    raw: str,
    users: np.ndarray,
    cutoff_us: np.ndarray,
    ts_min: str = "1990-01-01T00:00:00Z",
    ts_max: str = "2100-01-01T00:00:00Z",
) -> Aggregates:
    """The baseline features of `users` (rows in that order) from the raw folder `raw`.

    `cutoff_us`: per-user cut-off (int64 microseconds since the epoch, UTC), same length as
    `users`; only valid, de-duplicated events strictly before it are used.
    """
    users = np.asarray(users, dtype=object)
    cutoff_us = np.broadcast_to(np.asarray(cutoff_us, dtype=np.int64), (len(users),))
    events, accounting = clean_events(read_raw(raw), users, cutoff_us, ts_min, ts_max)
    names, X = aggregate_features(events, users, cutoff_us)
    return Aggregates(users=users, names=names, X=X, accounting=accounting)
