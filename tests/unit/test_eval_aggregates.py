"""plm.eval.aggregates on a tiny inline raw world: counts, sums, recency, and exclusion of
invalid, duplicate and after-cut-off rows."""

import math

import numpy as np
import pyarrow as pa
import pytest
from conftest import login, order, payment, ts, write_raw

from plm.data.schema import ContractError
from plm.eval.aggregates import compute_aggregates, mcc_group

CUTOFF_US = int(ts(20).timestamp() * 1_000_000)  # 2024-01-20 12:00 UTC


@pytest.fixture(scope="module")
def agg(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    p3 = payment("p3", "u1", ts(10), amount=20.0, mcc=5812, device_id="d1", channel="ecommerce")
    write_raw(
        root,
        payments=[
            payment("p1", "u1", ts(1), amount=10.0, mcc=5411),
            payment("p2", "u1", ts(5), amount=30.0, status="declined", mcc=6011),
            p3,
            dict(p3),  # exact replay: dropped
            payment("p_bad", "u1", ts(6), amount=-5.0),  # invalid amount: quarantined
            payment("p_nan", "u1", ts(6), amount=float("nan")),  # quarantined
            payment("p_late", "u1", ts(25), amount=1000.0),  # after the cut-off
            payment(None, "u1", ts(7), amount=99.0),  # null event_id: quarantined
            payment("p_other", "u9", ts(3), amount=5.0),  # not an evaluated user
        ],
        logins=[
            login("l1", "u1", ts(1, 8), device_id="d1"),
            login("l2", "u1", ts(10, 11, 59), device_id="d2", ip_country="FR", success=False),
        ],
        orders=[
            order("o1", "u2", ts(15), amount=50.0, n_items=2),
            order("o2", "u2", ts(19), n_items=0),  # invalid n_items
        ],
    )
    users = np.array(["u1", "u2", "u3"], dtype=object)  # u3: labels but no events
    return compute_aggregates(str(root), users, np.full(3, CUTOFF_US))


def col(agg, name):
    return agg.X[:, agg.names.index(name)]


def test_counts_and_sums_exclude_dirty_duplicate_and_late_rows(agg):
    assert col(agg, "n_payment").tolist() == [3, 0, 0]
    assert col(agg, "payment_amount_sum")[0] == pytest.approx(60.0)
    assert col(agg, "payment_amount_max")[0] == pytest.approx(30.0)
    assert col(agg, "payment_amount_mean")[0] == pytest.approx(20.0)
    assert col(agg, "payment_amount_std")[0] == pytest.approx(np.std([10, 30, 20]))
    assert col(agg, "payment_success_amount_sum")[0] == pytest.approx(30.0)
    assert col(agg, "n_login").tolist() == [2, 0, 0]
    assert col(agg, "n_order").tolist() == [0, 1, 0]
    assert col(agg, "order_items_sum")[1] == 2
    assert col(agg, "n_events").tolist() == [5, 1, 0]
    acc = agg.accounting["payments"]
    assert acc["duplicate_rows"] == 1
    assert acc["quarantined_rows"] == 3
    assert acc["after_cutoff_rows"] == 1
    assert acc["other_users_rows"] == 1
    assert acc["used_rows"] == 3
    assert agg.accounting["orders"]["quarantined_rows"] == 1


def test_recency_tenure_and_windows(agg):
    assert col(agg, "days_since_last_payment")[0] == pytest.approx(10.0)
    assert col(agg, "days_since_last_event")[0] == pytest.approx(10.0)  # p3 at day 10 noon
    assert col(agg, "tenure_days")[0] == pytest.approx(19.0 + 4 / 24)  # first login day 1, 08:00
    assert col(agg, "days_since_last_order")[1] == pytest.approx(5.0)
    assert col(agg, "n_events_last7d").tolist() == [0, 1, 0]
    assert col(agg, "n_events_last30d").tolist() == [5, 1, 0]
    assert col(agg, "active_days")[0] == 3  # days 1, 5, 10


def test_failures_shares_and_distincts(agg):
    assert col(agg, "declined_n")[0] == 1
    assert col(agg, "payment_status_declined_share")[0] == pytest.approx(1 / 3)
    assert col(agg, "failed_logins_n")[0] == 1
    assert col(agg, "failed_logins_share")[0] == pytest.approx(0.5)
    assert col(agg, "mcc_group_grocery_n")[0] == 1
    assert col(agg, "mcc_group_cash_share")[0] == pytest.approx(1 / 3)
    assert col(agg, "cash_out_share")[0] == pytest.approx(1 / 3)
    assert col(agg, "payment_channel_ecommerce_share")[0] == pytest.approx(1 / 3)
    assert col(agg, "distinct_devices")[0] == 2  # d1, d2 (card-present payments have none)
    assert col(agg, "login_foreign_n")[0] == 1  # FR after a DE home
    assert col(agg, "login_new_device_foreign_n")[0] == 1  # first use of d2, abroad
    assert col(agg, "login_new_device_n")[0] == 2
    assert col(agg, "payment_young_device_n")[0] == 0  # d1 first seen on day 1, used on day 10


def test_user_without_events_gets_zero_counts_and_nan_stats(agg):
    assert col(agg, "n_events")[2] == 0
    assert col(agg, "n_payment")[2] == 0
    for name in ("payment_amount_mean", "days_since_last_event", "declined_share", "gap_log10_mean"):
        assert math.isnan(col(agg, name)[2]), name
    assert agg.X.shape == (3, len(agg.names)) and len(set(agg.names)) == len(agg.names)


def test_per_user_cutoff(tmp_path):
    root = write_raw(tmp_path / "raw", payments=[payment("a", "u1", ts(2)), payment("b", "u1", ts(8)),
                                                 payment("c", "u2", ts(2)), payment("d", "u2", ts(8))])
    cut = np.array([int(ts(5).timestamp() * 1e6), int(ts(9).timestamp() * 1e6)])
    a = compute_aggregates(str(root), np.array(["u1", "u2"], dtype=object), cut)
    assert col(a, "n_payment").tolist() == [1, 2]
    assert col(a, "days_since_last_payment").tolist() == pytest.approx([3.0, 1.0])


def test_values_that_differ_only_in_spelling_are_separate_features(tmp_path):
    """"E-Commerce" and "e commerce" are two tokens for the model; their feature names used to
    collide, the later overwriting the earlier's counts."""
    root = write_raw(tmp_path / "raw", payments=[payment("a", "u1", ts(2), channel="E-Commerce"),
                                                 payment("b", "u2", ts(2), channel="e commerce"),
                                                 payment("c", "u2", ts(3), channel="e commerce")])
    a = compute_aggregates(str(root), np.array(["u1", "u2"], dtype=object), np.array([CUTOFF_US, CUTOFF_US]))
    names = [n for n in a.names if n.startswith("payment_channel_e_commerce") and n.endswith("_n")]
    assert len(names) == 2 and len(set(a.names)) == len(a.names)
    assert sorted(tuple(col(a, n).tolist()) for n in names) == [(0, 2), (1, 0)]


def test_contract_violation_names_file_and_column(tmp_path):
    bad = pa.table({"event_id": ["x"], "user_id": ["u1"], "ts": pa.array([ts(1)], pa.timestamp("us", tz="UTC"))})
    write_raw(tmp_path / "raw", payments=bad)
    with pytest.raises(ContractError, match=r"payments/part-0.parquet.*'amount'"):
        compute_aggregates(str(tmp_path / "raw"), np.array(["u1"], dtype=object), np.array([CUTOFF_US]))


def test_mcc_groups():
    g = mcc_group(np.array([5411, 6011, 4829, 4511, 5812, 1234, -1]))
    names = ["grocery", "cash", "money_transfer", "travel", "restaurants"]
    from plm.eval.aggregates import MCC_GROUPS

    assert [MCC_GROUPS[i][0] for i in g[:5]] == names
    assert g[5] == g[6] == len(MCC_GROUPS)  # other
