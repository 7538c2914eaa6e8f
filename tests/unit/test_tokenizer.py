"""Pure-Python tokenizer and pipeline pieces (no Spark)."""

import numpy as np
import pyarrow as pa
import pytest
from conftest import login, order, payment, source_table, ts

from plm.data.schema import HASHED_FIELDS, MISSING, N_SPECIALS, NA, OOV, ContractError, check_file_schema
from plm.data.tokenizer import (
    NumericSpec,
    Tokenizer,
    clean_source,
    encode_raw,
    history_features,
    numeric_spec_from_sample,
    pseudonymise,
    unify,
    vocab_from_counts,
    window_bounds,
)


def test_window_bounds_cover_history_and_keep_most_recent():
    user, k, start, end = window_bounds(np.array([3, 10, 11]), max_events=4, stride=3)
    got = {}
    for u, kk, s, e in zip(user, k, start, end):
        got.setdefault(int(u), []).append((int(kk), int(s), int(e)))
    assert got[0] == [(0, 0, 3)]
    assert got[1] == [(0, 6, 10), (1, 3, 7), (2, 0, 4)]  # window 0 = the last 4 events
    assert got[2] == [(0, 7, 11), (1, 4, 8), (2, 1, 5), (3, 0, 2)]
    for u, n in enumerate([3, 10, 11]):  # every event is in some window
        covered = set()
        for _, s, e in got[u]:
            covered |= set(range(s, e))
        assert covered == set(range(n))


def test_vocab_from_counts_orders_and_caps():
    assert vocab_from_counts({"a": 5, "b": 9, "c": 5, "d": 1}, min_count=2, max_size=2) == ["b", "a"]


def test_numeric_spec_edges_and_standardisation():
    x = np.arange(1, 101, dtype=float)
    spec = numeric_spec_from_sample("amount", x, n_bins=4)
    assert spec.edges == list(np.quantile(x, [0.25, 0.5, 0.75]))
    assert spec.log and spec.mean == pytest.approx(np.log1p(x).mean())
    empty = numeric_spec_from_sample("n_items", np.array([]), 4)
    assert empty.edges == [] and empty.std == 1.0
    # row order does not change the fitted numbers
    rng = np.random.default_rng(0)
    assert numeric_spec_from_sample("amount", rng.permutation(x), 4) == spec


def _tokenizer():
    from plm.data.schema import CATEGORICAL_FIELDS, NUMERIC_FIELDS

    cat = {f.name: [] for f in CATEGORICAL_FIELDS}
    cat.update(merchant=pseudonymise(pa.array(["m1", "m2"]), HASHED_FIELDS["merchant"]).to_pylist(), currency=["EUR"], event_type=["payment", "login", "order"])
    num = {f.name: NumericSpec(edges=[], mean=0.0, std=1.0, log=False) for f in NUMERIC_FIELDS}
    num["amount"] = NumericSpec(edges=[10.0, 100.0], mean=1.0, std=2.0, log=True)
    return Tokenizer(categorical=cat, numeric=num)


def test_tokenizer_json_roundtrip(tmp_path):
    tok = _tokenizer()
    tok.save(tmp_path / "t.json")
    back = Tokenizer.load(tmp_path / "t.json")
    assert back.categorical == tok.categorical and back.numeric == tok.numeric
    assert back.vocab_sizes()["merchant"] == N_SPECIALS + 2
    assert back.vocab_sizes()["amount"] == N_SPECIALS + 3


def test_pseudonymise_is_sha256_hex_prefix_and_keeps_nulls():
    import hashlib

    vals = pa.chunked_array([["m1", None, "m1"], ["é-merchant"]])
    got = pseudonymise(vals, 16).to_pylist()
    assert got == [hashlib.sha256(b"m1").hexdigest()[:16], None, hashlib.sha256(b"m1").hexdigest()[:16],
                   hashlib.sha256("é-merchant".encode()).hexdigest()[:16]]
    assert pseudonymise(pa.array([], pa.string()), 16).to_pylist() == []


def test_old_tokenizer_format_is_refused_with_the_reason(tmp_path):
    import json

    d = _tokenizer().to_dict()
    d["format_version"] = "1.1"
    (tmp_path / "t.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"'1.1' is not supported .*raw merchant ids.*prepare the data again"):
        Tokenizer.load(tmp_path / "t.json")


def test_special_tokens_na_missing_oov():
    tables = {
        "payments": source_table(
            "payments",
            [
                payment("p1", "u1", ts(1), amount=10.0, merchant_id="m2"),
                payment("p2", "u1", ts(2), amount=5.0, merchant_id="unseen", currency=None),
            ],
        ),
        "orders": source_table("orders", [order("o1", "u1", ts(3), amount=1000.0, merchant_id="m1")]),
    }
    out = encode_raw(tables, _tokenizer())
    row = out.to_pylist()[0]
    assert row["n_events"] == 3
    assert row["merchant"] == [N_SPECIALS + 1, OOV, N_SPECIALS + 0]
    assert row["currency"] == [N_SPECIALS + 0, MISSING, NA]  # orders have no currency
    assert row["amount"] == [N_SPECIALS + 1, N_SPECIALS + 0, N_SPECIALS + 2]  # 10 >= edge 10
    assert row["log_dt"][0] == MISSING
    assert row["amount_value"][0] == pytest.approx((np.log1p(10.0) - 1.0) / 2.0)
    assert row["n_items_value"][:2] == [0.0, 0.0]


def test_clean_source_reasons_and_duplicates():
    rows = [
        payment("p1", "u1", ts(1)),
        payment("p1", "u1", ts(1)),  # exact duplicate
        payment(None, "u1", ts(1)),
        payment("p3", None, ts(1)),
        payment("p4", "u1", None),
        payment("p5", "u1", ts(1).replace(year=1980)),
        payment("p6", "u1", ts(1), amount=0.0),
        payment("p7", "u1", ts(1), amount=float("inf")),
        payment("p8", "u1", ts(1), mcc=12345),
        payment("p9", "u1", ts(1), currency="EUR"),
        payment("p9", "u1", ts(1), currency="USD"),  # same id, other content
        payment("p10", "u1", ts(2), amount=None),  # missing amount is not invalid
        payment("p11", "u2", ts(3)),
        payment("p11", None, ts(3)),  # an invalid copy of p11 does not make p11 a conflict
        payment("p11", "u2", ts(3).replace(year=1970)),
    ]
    kept, q, n_dup = clean_source(source_table("payments", rows), "payments", "1990-01-01T00:00:00Z", "2030-01-01T00:00:00Z")
    assert n_dup == 1
    assert sorted(kept.column("event_id").to_pylist()) == ["p1", "p10", "p11"]
    reasons = sorted(zip(q.column("event_id").to_pylist(), q.column("reason").to_pylist()), key=str)
    assert reasons == sorted(
        [
            (None, "null_event_id"),
            ("p3", "null_user_id"),
            ("p4", "null_ts"),
            ("p5", "ts_out_of_range"),
            ("p6", "amount_invalid"),
            ("p7", "amount_invalid"),
            ("p8", "mcc_invalid"),
            ("p9", "conflicting_event_id"),
            ("p9", "conflicting_event_id"),
            ("p11", "null_user_id"),
            ("p11", "ts_out_of_range"),
        ],
        key=str,
    )
    assert kept.num_rows + q.num_rows + n_dup == len(rows)


def test_history_features_device_and_country():
    kept = {
        "payments": source_table(
            "payments",
            [
                payment("p1", "u1", ts(1, 12), device_id="d1", country="DE"),
                payment("p2", "u1", ts(2, 12), device_id="d1", country="FR"),
                payment("p3", "u1", ts(3, 12), device_id=None, country=None),
            ],
        ),
        "logins": source_table("logins", [login("l1", "u1", ts(2, 11), device_id="d2", ip_country="DE")]),
    }
    ev = history_features(unify(kept)).to_pylist()
    assert [e["event_id"] for e in ev] == ["p1", "l1", "p2", "p3"]
    assert [e["device_new"] for e in ev] == ["true", "true", "false", None]
    assert [e["device_age"] for e in ev] == [0.0, 0.0, 24 * 3600.0, None]  # seconds since the device's first event
    assert [e["country_foreign"] for e in ev] == ["false", "false", "true", None]
    assert ev[0]["dt_seconds"] is None and ev[1]["dt_seconds"] == 23 * 3600.0
    assert [e["dow"] for e in ev[:1]] == ["0"]  # 2024-01-01 was a Monday
    assert "device_id" not in ev[0]


def test_contract_check_names_file_column_type():
    good = source_table("orders", [order("o1", "u1", ts(1))])
    check_file_schema("orders", "x.parquet", good.schema)
    check_file_schema("orders", "x.parquet", good.append_column("extra", pa.array([1])).schema)
    bad = good.set_column(good.schema.get_field_index("n_items"), "n_items", pa.array(["1"]))
    with pytest.raises(ContractError, match=r"x.parquet: column 'n_items' \(orders\) has type string; expected int32"):
        check_file_schema("orders", "x.parquet", bad.schema)
    with pytest.raises(ContractError, match="required column 'category'"):
        check_file_schema("orders", "x.parquet", good.drop(["category"]).schema)
    # float16 passed the check and then failed inside Spark ("PARQUET_TYPE_ILLEGAL"), naming nothing
    half = good.set_column(good.schema.get_field_index("amount"), "amount", pa.array([20.0], pa.float16()))
    with pytest.raises(ContractError, match=r"column 'amount' \(orders\) has type halffloat; expected double"):
        check_file_schema("orders", "x.parquet", half.schema)
    for ok in (pa.float32(), pa.int64()):
        check_file_schema("orders", "x.parquet", good.set_column(good.schema.get_field_index("amount"), "amount",
                                                                   pa.array([20], ok)).schema)


def test_encode_raw_checks_the_contract_like_plm_prep():
    """A misspelt source, a missing column or a column of the wrong type fails with the message
    plm-prep gives for a file, not a KeyError or a silent cast."""
    good = source_table("payments", [payment("p1", "u1", ts(1))])
    with pytest.raises(ContractError, match=r"unknown raw source\(s\) \['paymnts'\]"):
        encode_raw({"paymnts": good}, _tokenizer())
    with pytest.raises(ContractError, match=r"tables\['payments'\]: required column 'amount' \(payments\) is missing"):
        encode_raw({"payments": good.drop_columns(["amount"])}, _tokenizer())
    text = good.set_column(good.schema.get_field_index("amount"), "amount", pa.array(["10.0"]))
    with pytest.raises(ContractError, match=r"column 'amount' \(payments\) has type string; expected double"):
        encode_raw({"payments": text}, _tokenizer())
    assert encode_raw({"payments": good, "logins": None}, _tokenizer()).num_rows == 1
    # a few users' rows from pa.Table.from_pylist: an all-null optional column has type null
    rows = [{**r, "mcc": None, "device_id": None} for r in good.to_pylist()]
    loose = pa.Table.from_pylist(rows)
    assert pa.types.is_null(loose.schema.field("mcc").type)
    assert encode_raw({"payments": loose}, _tokenizer()).column("mcc").to_pylist() == [[MISSING]]


def test_encode_raw_accounts_for_every_row_as_the_manifest_does():
    """Rows the Spark-free path drops are counted, per source and reason, as plm-prep's manifest
    counts them: input = kept + quarantined + duplicates; kept rows after the cut-off apart."""
    good = payment("p1", "u1", ts(1), amount=10.0, merchant_id="m2")
    tables = {
        "payments": source_table("payments", [
            good, good,  # an exact duplicate
            payment("p2", "u1", ts(2), amount=-3.0, merchant_id="m2"),  # amount_invalid
            payment("p3", "u2", ts(9), amount=4.0, merchant_id="m1"),  # at/after the cut-off
        ]),
        "logins": source_table("logins", []),
    }
    acc: dict = {}
    encode_raw(tables, _tokenizer(), cutoff="2024-01-05T00:00:00Z", accounting=acc)
    p = acc["payments"]
    assert (p["input_rows"], p["kept_rows"], p["duplicate_rows"], p["quarantined_total"]) == (4, 2, 1, 1)
    assert p["quarantined_rows"] == {"amount_invalid": 1} and p["after_cutoff_rows"] == 1
    assert p["input_rows"] == p["kept_rows"] + p["quarantined_total"] + p["duplicate_rows"]
    assert acc["logins"]["input_rows"] == 0 and "orders" not in acc
