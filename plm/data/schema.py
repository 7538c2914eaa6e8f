"""The data contracts, in one place, shared by the Spark job (`data_prep/`), the pure-Python
tokenizer (`plm.data.tokenizer`) and the synthetic world (`data_prep.synth`).

Raw side (`shared/spec/raw-events.md`): three sources of events (payments, logins, orders),
each a folder of Parquet files. `RAW_SOURCES` lists, per source, every contract column with its
canonical Arrow type and whether it is required (a null there makes the row invalid).

Prepared side (`shared/spec/outputs.md`, documented in `docs/data-contracts.md`): one row per
window of one user's time-ordered events, each event one token made of the fields in
`CATEGORICAL_FIELDS` and `NUMERIC_FIELDS`. Token ids of every field share one layout: the ids
0..4 are the specials in `SPECIALS`, fitted values start at `N_SPECIALS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

# ----------------------------------------------------------------------------- raw contract

TS_TYPE = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True)
class RawColumn:
    name: str
    type: pa.DataType
    required: bool = False  # null => row quarantined (reason null_<name>)


_ID_COLS = (
    RawColumn("event_id", pa.string(), required=True),
    RawColumn("user_id", pa.string(), required=True),
    RawColumn("ts", TS_TYPE, required=True),
)

RAW_SOURCES: dict[str, tuple[RawColumn, ...]] = {
    "payments": _ID_COLS
    + (
        RawColumn("amount", pa.float64()),
        RawColumn("currency", pa.string()),
        RawColumn("merchant_id", pa.string()),
        RawColumn("mcc", pa.int32()),
        RawColumn("channel", pa.string()),
        RawColumn("status", pa.string()),
        RawColumn("device_id", pa.string()),
        RawColumn("country", pa.string()),
    ),
    "logins": _ID_COLS
    + (
        RawColumn("device_id", pa.string()),
        RawColumn("ip_country", pa.string()),
        RawColumn("auth_method", pa.string()),
        RawColumn("success", pa.bool_()),
    ),
    "orders": _ID_COLS
    + (
        RawColumn("merchant_id", pa.string()),
        RawColumn("amount", pa.float64()),
        RawColumn("n_items", pa.int32()),
        RawColumn("category", pa.string()),
    ),
}

# Order of sources in the merged stream when two events of a user share a timestamp
# (the stable tie-break is (ts, EVENT_TYPE_ORDER, event_id)).
EVENT_TYPE_ORDER = {"logins": 0, "orders": 1, "payments": 2}
EVENT_TYPE_NAME = {"payments": "payment", "logins": "login", "orders": "order"}

# Range checks on numeric columns: (column, lowest valid, lowest is exclusive?, highest valid).
# NaN and +-inf are always invalid; null is "missing", not invalid.
NUMERIC_RANGES: dict[str, tuple[float, bool, float]] = {
    "amount": (0.0, True, float("inf")),  # amount > 0
    "n_items": (1.0, False, float("inf")),  # n_items >= 1
    "mcc": (0.0, False, 9999.0),  # a 4-digit code
}

# An integer the contract's int32 cannot hold (a file may type an int32 column int64) becomes
# this value, which every int32 field's range check above refuses: quarantined, not a crash.
INT32_OUT_OF_RANGE = -(2**31)

# Quarantine reasons (the `reason` column), in the order they are checked: a row gets the first.
REASONS = (
    "null_event_id",
    "null_user_id",
    "null_ts",
    "ts_out_of_range",
    "amount_invalid",
    "n_items_invalid",
    "mcc_invalid",
    "conflicting_event_id",
)

# Columns never written to any output (raw identifiers other than user_id).
PRIVATE_COLUMNS = ("device_id",)


class ContractError(ValueError):
    """An input file does not follow the raw contract (names the file, column and expected type)."""


def _is_string(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_string(t.value_type)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def type_accepts(expected: pa.DataType, actual: pa.DataType) -> bool:
    """Whether a file's column type is acceptable for a contract column.

    Accepted: the exact type; timestamps in s/ms/us/ns, UTC or naive (read as UTC); integer
    widths for int32 columns; float32/float64 (and integers) for float64 columns; large and
    dictionary-encoded strings for strings. Anything else is a contract violation.
    """
    if pa.types.is_timestamp(expected):
        return pa.types.is_timestamp(actual) and actual.tz in (None, "UTC", "utc", "+00:00", "Etc/UTC")
    if _is_string(expected):
        return _is_string(actual)
    if pa.types.is_integer(expected):
        return pa.types.is_integer(actual)
    if pa.types.is_floating(expected):  # float32/float64 (float16: Spark cannot read it)
        return pa.types.is_float32(actual) or pa.types.is_float64(actual) or pa.types.is_integer(actual)
    if pa.types.is_boolean(expected):
        return pa.types.is_boolean(actual)
    return actual.equals(expected)


def check_file_schema(source: str, path: str, schema: pa.Schema) -> None:
    """Raise ContractError naming file, column and expected type if `schema` breaks the contract."""
    for col in RAW_SOURCES[source]:
        idx = schema.get_field_index(col.name)
        if idx < 0:
            raise ContractError(
                f"{path}: required column '{col.name}' ({source}) is missing; expected type {col.type}"
            )
        actual = schema.field(idx).type
        if not type_accepts(col.type, actual):
            raise ContractError(
                f"{path}: column '{col.name}' ({source}) has type {actual}; expected {col.type}"
            )


def canonical_schema(source: str) -> pa.Schema:
    return pa.schema([pa.field(c.name, c.type) for c in RAW_SOURCES[source]])


# ----------------------------------------------------------------------------- token layout

PAD, MASK, OOV, MISSING, NA = 0, 1, 2, 3, 4
SPECIALS = ("[PAD]", "[MASK]", "[OOV]", "[MISSING]", "[NA]")
N_SPECIALS = len(SPECIALS)


@dataclass(frozen=True)
class Field:
    """One field of an event token.

    `sources` maps each event source where the field applies to the raw column (or derived
    feature) it comes from; for the other sources the field is the N/A token.
    """

    name: str
    sources: dict[str, str]
    kind: str  # "categorical" | "numeric"
    doc: str = ""


# Identifier fields tokenised by a pseudonym, so that no raw identifier other than `user_id` reaches
# `tokenizer.json` or any other output: field -> hex digits kept of SHA-256 of the UTF-8 value.
# Spark (`data_prep.transforms.to_events`: `substring(sha2(x, 256), 1, n)`) and the pure-Python
# tokenizer (`plm.data.tokenizer.pseudonymise`) compute the same strings.
HASHED_FIELDS: dict[str, int] = {"merchant": 16}

CATEGORICAL_FIELDS: tuple[Field, ...] = (
    Field("event_type", {s: "event_type" for s in RAW_SOURCES}, "categorical", "payment / login / order"),
    Field("hour", {s: "hour" for s in RAW_SOURCES}, "categorical", "hour of day, UTC (0-23)"),
    Field("dow", {s: "dow" for s in RAW_SOURCES}, "categorical", "day of week, Monday=0, UTC"),
    Field("currency", {"payments": "currency"}, "categorical", "ISO 4217"),
    Field("mcc", {"payments": "mcc"}, "categorical", "merchant category code as a string"),
    Field("channel", {"payments": "channel"}, "categorical", "card_present, ecommerce, ..."),
    Field("status", {"payments": "status"}, "categorical", "success, declined, reversed, ..."),
    Field(
        "merchant",
        {"payments": "merchant_id", "orders": "merchant_id"},
        "categorical",
        "first 16 hex digits of SHA-256(merchant_id) (the raw id never leaves prep), frequency-capped (tail -> OOV)",
    ),
    Field("country", {"payments": "country", "logins": "ip_country"}, "categorical", "payment country / login IP country"),
    Field(
        "country_foreign",
        {"payments": "country_foreign", "logins": "country_foreign"},
        "categorical",
        "country differs from the user's home country (first non-null country seen)",
    ),
    Field(
        "device_new",
        {"payments": "device_new", "logins": "device_new"},
        "categorical",
        "first event of the user with this device (device_id itself never leaves the job)",
    ),
    Field("auth_method", {"logins": "auth_method"}, "categorical", "password, otp, biometric, ..."),
    Field("login_success", {"logins": "success"}, "categorical", "login succeeded"),
    Field("category", {"orders": "category"}, "categorical", "order category"),
)

NUMERIC_FIELDS: tuple[Field, ...] = (
    Field("amount", {"payments": "amount", "orders": "amount"}, "numeric", "amount in currency units; value = log1p"),
    Field("n_items", {"orders": "n_items"}, "numeric", "items in the order; value = log1p"),
    Field(
        "log_dt",
        {s: "log_dt" for s in RAW_SOURCES},
        "numeric",
        "log1p(seconds since the user's previous event); MISSING on the first event",
    ),
    Field(
        "device_age",
        {"payments": "device_age", "logins": "device_age"},
        "numeric",
        "seconds since the user's first event on this device (0 on that event); value = log1p; MISSING without a device",
    ),
)

ALL_FIELDS = CATEGORICAL_FIELDS + NUMERIC_FIELDS
FIELD_BY_NAME = {f.name: f for f in ALL_FIELDS}

# Numeric fields whose continuous value is log1p(x) before standardisation (bins are quantiles of
# x itself). log_dt joined on 2026-11-24: its source column is seconds, and until then its value
# was standardised raw seconds (heavy-tailed: up to ~28 standard deviations), not the log1p the
# field promised. A tokenizer.json records each field's `log`, so one fitted before still applies
# exactly as it was fitted (same format).
LOG_VALUE_FIELDS = ("amount", "n_items", "log_dt", "device_age")

# --------------------------------------------------------------------------- prepared shards

SHARD_FORMAT_VERSION = "1.1"  # 1.1: device_age
SPLITS = ("train", "val", "test")


def value_column(field: str) -> str:
    """Name of the standardised continuous value column beside a numeric field's bin ids."""
    return f"{field}_value"


def shard_schema() -> pa.Schema:
    """Schema of every prepared sequence shard (one row per window of one user)."""
    fields = [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("window_index", pa.int32(), nullable=False),  # 0 = most recent window
        pa.field("window_start", pa.int32(), nullable=False),  # offset in the user's history
        pa.field("history_len", pa.int32(), nullable=False),  # events of the user before cut-off
        pa.field("n_events", pa.int32(), nullable=False),  # events in this window
        pa.field("ts", pa.list_(pa.int64()), nullable=False),  # epoch microseconds, UTC
    ]
    for f in CATEGORICAL_FIELDS:
        fields.append(pa.field(f.name, pa.list_(pa.int32()), nullable=False))
    for f in NUMERIC_FIELDS:
        fields.append(pa.field(f.name, pa.list_(pa.int32()), nullable=False))
        fields.append(pa.field(value_column(f.name), pa.list_(pa.float32()), nullable=False))
    return pa.schema(fields)
