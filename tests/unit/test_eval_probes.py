"""plm.eval.probes: task types, metrics on hand-computed cases, bootstrap intervals, planted signal."""

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import average_precision_score, log_loss, r2_score, roc_auc_score

from plm.eval.config import EvalConfig, LGBMConfig
from plm.eval.probes import (
    BINARY,
    MULTICLASS,
    REGRESSION,
    binary_metrics,
    bootstrap_weights,
    evaluate,
    fold_ids,
    infer_kind,
    make_task,
    multiclass_metrics,
    oof_predict,
    regression_metrics,
    w_auc,
    w_average_precision,
    w_ece,
)


@pytest.mark.parametrize(
    "values, kind",
    [
        ([0, 1, 1, 0], BINARY),
        ([0.0, 1.0, np.nan, 1.0], BINARY),
        ([1, 1, 1], BINARY),  # a subset of {0, 1}
        ([0, 1, 2, 3, 4, 2], MULTICLASS),
        ([3.0, 7.0, 5.0, np.nan], MULTICLASS),
        ([1, 2], BINARY),  # two integer values that are not 0/1: the higher one positive
        ([-1, 1, 1], BINARY),
        (list(range(60)), REGRESSION),  # too many classes
        ([0.5, 1.2, 3.3], REGRESSION),
    ],
)
def test_infer_kind(values, kind):
    assert infer_kind(np.asarray(values, dtype=float)) == kind


def test_task_types_override_the_inferred_type():
    """Two whole values are a binary task (the higher one positive); `kind` (EvalConfig.task_types)
    makes whole-number amounts a regression, or refuses a type the values cannot have."""
    t = make_task("sign", np.array([-1.0, 1.0, 1.0, np.nan]))
    assert t.kind == BINARY and t.classes == [-1, 1] and t.y.tolist() == [0, 1, 1]
    spend = np.array([3.0, 7.0, 5.0, 12.0, np.nan])
    assert make_task("spend", spend).kind == MULTICLASS
    r = make_task("spend", spend, kind=REGRESSION)
    assert r.kind == REGRESSION and r.y.tolist() == [3.0, 7.0, 5.0, 12.0]
    with pytest.raises(ValueError, match="task_types: spend=binary, but the column holds 4 distinct values"):
        make_task("spend", spend, kind=BINARY)
    with pytest.raises(ValueError, match="task_types: x=multiclass needs at most 50 whole values"):
        make_task("x", np.array([0.5, 1.5, 2.5]), kind=MULTICLASS)
    with pytest.raises(ValueError, match="task_types: tier=regression, but the column holds 3 class name"):
        make_task("tier", np.array([0.0, 1.0, 2.0]), ["a", "b", "c"], kind=REGRESSION)


def test_make_task_skips_nulls_and_recodes_classes():
    t = make_task("seg", np.array([3.0, np.nan, 7.0, 5.0, 3.0]))
    assert t.kind == MULTICLASS and t.n_null == 1
    assert t.classes == [3, 5, 7]
    assert t.y.tolist() == [0, 2, 1, 0]
    assert t.mask.tolist() == [True, False, True, True, True]
    r = make_task("spend", np.array([0.5, np.inf, 1.7, -np.inf, 2.25, np.nan, 3.1]))  # infinities count as nulls
    assert r.kind == REGRESSION and r.n_null == 3 and r.y.tolist() == [0.5, 1.7, 2.25, 3.1]


def test_make_task_with_class_names_keeps_the_present_ones():
    names = ["bronze", "gold", "silver", "zinc"]
    t = make_task("tier", np.array([2.0, np.nan, 0.0, 2.0, 1.0]), names)  # "zinc" absent here
    assert t.kind == MULTICLASS and t.classes == ["bronze", "gold", "silver"] and t.n_null == 1
    assert t.y.tolist() == [2, 0, 2, 1]
    two = make_task("churned", np.array([1.0, 1.0, 3.0]), names)  # as numbers, 1 and 3 would be a regression
    assert two.kind == BINARY and two.classes == ["gold", "zinc"] and two.y.tolist() == [0, 0, 1]
    one = make_task("flag", np.array([3.0, 3.0]), names)
    assert one.kind == BINARY and one.classes == ["zinc"] and one.y.tolist() == [0, 0]


def test_weighted_metrics_equal_sklearn_on_a_resample():
    rng = np.random.default_rng(0)
    n = 300
    y = (rng.random(n) < 0.3).astype(int)
    s = np.round(rng.random(n) + 0.4 * y, 1)  # many ties
    idx = rng.integers(0, n, n)
    W = np.bincount(idx, minlength=n)[None].astype(float)
    assert w_auc(y, s, W)[0] == pytest.approx(roc_auc_score(y[idx], s[idx]))
    assert w_average_precision(y, s, W)[0] == pytest.approx(average_precision_score(y[idx], s[idx]))
    s2 = rng.random(n)  # no ties
    assert w_auc(y, s2, W)[0] == pytest.approx(roc_auc_score(y[idx], s2[idx]))
    yr = rng.normal(size=n)
    pr = yr + rng.normal(size=n)
    m = regression_metrics(yr, pr, W, 10)
    assert m["r2"][0] == pytest.approx(r2_score(yr[idx], pr[idx]))
    assert m["spearman"][0] == pytest.approx(spearmanr(yr[idx], pr[idx]).statistic)
    yc = rng.integers(0, 3, n)
    P = rng.dirichlet(np.ones(3), n)
    mc = multiclass_metrics(yc, P, W, 10)
    assert mc["log_loss"][0] == pytest.approx(log_loss(yc[idx], P[idx], labels=[0, 1, 2]))
    assert mc["roc_auc_macro_ovr"][0] == pytest.approx(roc_auc_score(yc[idx], P[idx], multi_class="ovr", average="macro"))
    # quantised scores with ties (quarters): ranked as given, not after clipping and renormalising
    Q = rng.multinomial(4, np.ones(3) / 3, n) / 4.0
    want = np.mean([roc_auc_score(yc[idx] == k, Q[idx, k]) for k in range(3)])
    assert multiclass_metrics(yc, Q, W, 10)["roc_auc_macro_ovr"][0] == pytest.approx(want)


def test_ece_calibrated_is_zero_and_overconfident_is_the_gap():
    ones = np.ones((1, 20))
    # 10 users at 0.3 with 3 positives, 10 at 0.8 with 8: perfectly calibrated
    p = np.r_[np.full(10, 0.3), np.full(10, 0.8)]
    y = np.r_[np.ones(3), np.zeros(7), np.ones(8), np.zeros(2)]
    assert w_ece(y == 1, p, ones, 10)[0] == pytest.approx(0.0, abs=1e-12)
    assert binary_metrics(y, p, ones, 10)["ece"][0] == pytest.approx(0.0, abs=1e-12)
    # overconfident: 0.9 everywhere but 60% positives -> ECE 0.3
    p = np.full(20, 0.9)
    y = np.r_[np.ones(12), np.zeros(8)]
    assert binary_metrics(y, p, ones, 10)["ece"][0] == pytest.approx(0.3)
    # top-label ECE: confidence 0.9, accuracy 0.5 -> 0.4
    P = np.tile([0.9, 0.05, 0.05], (20, 1))
    yc = np.r_[np.zeros(10), np.ones(10)].astype(int)
    assert multiclass_metrics(yc, P, ones, 10)["ece_top_label"][0] == pytest.approx(0.4)


def test_bootstrap_weights_sum_to_n_and_are_seeded():
    W = bootstrap_weights(50, 7, np.random.default_rng(3))
    assert W.shape == (7, 50) and (W.sum(1) == 50).all()
    assert np.array_equal(W, bootstrap_weights(50, 7, np.random.default_rng(3)))


def _scores(n, rng):
    y = (rng.random(n) < 0.4).astype(int)
    return y, y * 0.8 + rng.normal(size=n)


def test_bootstrap_ci_contains_point_and_narrows_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (200, 3000):
        y, s = _scores(n, rng)
        res, _ = evaluate(BINARY, y, {"m": s}, n_boot=300, seed=1)
        auc = res["m"]["roc_auc"]
        assert auc["ci_low"] <= auc["value"] <= auc["ci_high"]
        widths.append(auc["ci_high"] - auc["ci_low"])
    assert widths[1] < widths[0] / 2  # ~ 1/sqrt(n): 3.9x narrower expected


def test_paired_delta_against_baseline():
    rng = np.random.default_rng(0)
    y, s = _scores(1000, rng)
    res, deltas = evaluate(BINARY, y, {"good": s, "noise": rng.random(1000)}, n_boot=200, seed=0, baseline="noise")
    d = deltas["good"]
    assert d["value"] == pytest.approx(res["good"]["roc_auc"]["value"] - res["noise"]["roc_auc"]["value"])
    assert d["ci_low"] > 0.1  # clearly better than noise
    assert "noise" not in deltas


def _cfg():
    return EvalConfig(embeddings="-", out="-", lgbm=LGBMConfig(n_estimators=40))


@pytest.mark.parametrize("model", ["linear", "lgbm", "lgbm_small_leaves"])
def test_planted_signal_high_auc_random_near_half(model):
    rng = np.random.default_rng(0)
    n, d = 600, 8
    y = (rng.random(n) < 0.3).astype(float)
    task = make_task("t", y)
    folds = fold_ids(task, 5, seed=0)
    signal = rng.normal(size=(n, d))
    signal[:, 0] += 2.0 * y
    noise = rng.normal(size=(n, d))
    aucs = {}
    cfg = _cfg()
    if model == "lgbm_small_leaves":  # below LightGBM's default 20: the shared Dataset must agree
        model, cfg.lgbm.min_child_samples = "lgbm", 5
    for name, X in (("signal", signal), ("noise", noise)):
        p = oof_predict(task, X, folds, model, cfg)
        aucs[name] = roc_auc_score(task.y, p)
    assert aucs["signal"] > 0.85
    assert abs(aucs["noise"] - 0.5) < 0.1


def test_folds_are_stratified_and_seeded():
    y = np.r_[np.zeros(90), np.ones(10)]
    task = make_task("t", y)
    f = fold_ids(task, 5, seed=1)
    assert [int(((f == k) & (task.y == 1)).sum()) for k in range(5)] == [2] * 5
    assert np.array_equal(f, fold_ids(task, 5, seed=1))
    assert not np.array_equal(f, fold_ids(task, 5, seed=2))
    reg = make_task("r", np.linspace(0, 1, 100))
    fr = fold_ids(reg, 5, seed=0)
    assert np.bincount(fr).tolist() == [20] * 5


def test_multiclass_oof_probabilities_cover_every_class():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200).astype(float)
    X = rng.normal(size=(200, 4))
    X[:, 0] += 2.5 * y
    task = make_task("c", y)
    folds = fold_ids(task, 4, seed=0)
    for model in ("linear", "lgbm"):
        P = oof_predict(task, X, folds, model, _cfg())
        assert P.shape == (200, 4)
        assert np.allclose(P.sum(1), 1.0)
        assert (P.argmax(1) == task.y).mean() > 0.4
