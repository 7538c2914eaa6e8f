"""Frozen probes: task types, out-of-fold predictions, metrics and bootstrap intervals.

* `infer_task`: a label column -> binary (values in {0, 1}), multi-class (integers with 3..50
  distinct values, re-coded 0..K-1) or regression (anything else numeric).
* `oof_predict`: stratified k-fold (seeded; regression stratifies on quantile bins of the
  label) out-of-fold predictions of one model on one feature matrix: `linear` (standardised
  LogisticRegression, or RidgeCV for regression) or `lgbm` (LightGBM, deterministic).
* metrics (`METRICS[kind]`): every metric is a function `(y, p, W) -> (B,)` of bootstrap weight
  rows `W` (B, n) (how many times each user is drawn), so the point estimate (`W` = ones) and
  all B resamples come from the same vectorised code, and the feature sets of a task share the
  same resamples (paired comparisons).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import lightgbm as lgb

BINARY, MULTICLASS, REGRESSION = "binary", "multiclass", "regression"
MAX_CLASSES = 50
_EPS = 1e-15


# ------------------------------------------------------------------------------- task types


@dataclass
class Task:
    name: str
    kind: str  # binary | multiclass | regression
    y: np.ndarray  # float64 (regression) or int64 class index, only labelled rows
    mask: np.ndarray  # bool over the input rows: label present
    classes: list  # original label values of the classes (classification), else []
    n_null: int  # rows whose label is null, NaN or infinite (skipped)


def infer_kind(values: np.ndarray) -> str:
    """Task type of the non-null label values: within {0, 1}, or two whole values (`1`/`2`,
    `-1`/`+1`: the higher one positive) -> binary; 3 to MAX_CLASSES whole values -> multi-class;
    anything else -> regression. `EvalConfig.task_types` overrides it per task."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    uniq = np.unique(v)
    if uniq.size and np.isin(uniq, (0.0, 1.0)).all():
        return BINARY
    if not uniq.size or not np.all(uniq == np.round(uniq)):
        return REGRESSION
    if uniq.size == 2:
        return BINARY
    return MULTICLASS if uniq.size <= MAX_CLASSES else REGRESSION


def make_task(name: str, values: np.ndarray, names: list[str] | None = None, kind: str | None = None) -> Task:
    """Label values (float64 with NaN for null) -> a Task over the labelled rows. `kind`: the
    task type to use instead of `infer_kind`'s (a ValueError if the values cannot be one).

    `names`: the column held strings and `values` are indices into `names` (sorted class
    names): a classification whatever the values, over the classes present: two or one ->
    binary (the later name is the positive class, like 1 of 0/1), more -> multi-class."""
    values = np.asarray(values, dtype=np.float64)
    mask = np.isfinite(values)
    v = values[mask]
    if names is not None:
        present, y = np.unique(v.astype(np.int64), return_inverse=True)
        inferred = MULTICLASS if present.size >= 3 else BINARY
        if kind not in (None, inferred):
            raise ValueError(f"task_types: {name}={kind}, but the column holds {present.size} class name(s)")
        return Task(name, inferred, y.astype(np.int64), mask, [names[i] for i in present], int((~mask).sum()))
    uniq = np.unique(v)
    if kind is None:
        kind = infer_kind(v)
    elif kind == BINARY and uniq.size > 2:
        raise ValueError(f"task_types: {name}=binary, but the column holds {uniq.size} distinct values")
    elif kind == MULTICLASS and not (np.all(uniq == np.round(uniq)) and uniq.size <= MAX_CLASSES):
        raise ValueError(f"task_types: {name}=multiclass needs at most {MAX_CLASSES} whole values "
                         f"({uniq.size} distinct values here)")
    if kind == REGRESSION:
        return Task(name, kind, v, mask, [], int((~mask).sum()))
    classes, y = np.unique(v, return_inverse=True)
    if kind == BINARY and np.isin(classes, (0.0, 1.0)).all():  # keep 0/1 as is even if one class is absent
        y, classes = v.astype(np.int64), np.array([0.0, 1.0])
    cls = [int(c) if c == round(c) else float(c) for c in classes]
    return Task(name, kind, y.astype(np.int64), mask, cls, int((~mask).sum()))


# ---------------------------------------------------------------------------- folds and fits


def fold_ids(task: Task, folds: int, seed: int) -> np.ndarray:
    """Fold index (0..folds-1) of every labelled row: stratified by class, or by quantile bin
    of the label for regression; seeded shuffling."""
    from sklearn.model_selection import StratifiedKFold

    y = task.y
    if task.kind == REGRESSION:
        n_bins = int(max(2, min(10, y.size // (2 * folds))))
        edges = np.quantile(y, np.linspace(0, 1, n_bins + 1)[1:-1])
        strata = np.searchsorted(edges, y, side="right")
    else:
        strata = y
    out = np.empty(y.size, dtype=np.int64)
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class" (reported by the caller)
        for k, (_, test) in enumerate(skf.split(np.zeros(y.size), strata)):
            out[test] = k
    return out


def lgbm_dataset(X: np.ndarray, params) -> lgb.Dataset:
    """One LightGBM Dataset (feature bins) per feature matrix, shared by every task and fold
    through `subset`: the bin edges are label-free quantiles of all evaluated users' features,
    like a scaler fitted on them; only labels and rows differ per fold. It carries every
    Dataset-level parameter the boosters use (`min_data_in_leaf` pre-filters features): a
    mismatch makes LightGBM rebuild it from the dummy labels, with constant predictions."""
    import lightgbm as lgb

    ds = lgb.Dataset(
        np.asarray(X, dtype=np.float64), label=np.zeros(X.shape[0]), free_raw_data=False,
        params={"max_bin": params.max_bin, "min_data_in_leaf": params.min_child_samples, "verbose": -1,
                "num_threads": params.num_threads},
    )
    return ds.construct()


def _lgbm_params(kind: str, n_classes: int, params, seed: int) -> dict:
    p = {
        "objective": {BINARY: "binary", MULTICLASS: "multiclass", REGRESSION: "regression"}[kind],
        "learning_rate": params.learning_rate,
        "num_leaves": params.num_leaves,
        "min_data_in_leaf": params.min_child_samples,
        "bagging_fraction": params.subsample,
        "bagging_freq": 1 if params.subsample < 1 else 0,
        "feature_fraction": params.colsample_bytree,
        "lambda_l2": params.reg_lambda,
        "num_threads": params.num_threads,
        "seed": seed,
        "deterministic": True,
        "force_col_wise": True,
        "verbose": -1,
    }
    if kind == MULTICLASS:
        p["num_class"] = n_classes
    return p


def _linear(kind: str, c: float, ridge_alphas):
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == REGRESSION:
        return make_pipeline(StandardScaler(), RidgeCV(alphas=list(ridge_alphas)))
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))


def oof_predict(task: Task, X: np.ndarray, folds: np.ndarray, model: str, cfg, dataset=None) -> np.ndarray:
    """Out-of-fold predictions: (n,) scores for regression / P(class 1) for binary, (n, K)
    class probabilities for multi-class, n = labelled rows of `task`.

    `X`: features of every row the task was made from (`task.mask` selects the labelled ones);
    `model`: linear | lgbm; `cfg`: an EvalConfig; `dataset`: `lgbm_dataset(X, cfg.lgbm)` to
    reuse across tasks (built here if None)."""
    y, kind = task.y, task.kind
    K = len(task.classes)
    rows = np.flatnonzero(task.mask)
    out = np.zeros((y.size, K)) if kind == MULTICLASS else np.zeros(y.size)
    if model == "lgbm":
        import lightgbm as lgb

        dataset = dataset if dataset is not None else lgbm_dataset(X, cfg.lgbm)
        jobs = []  # (test mask, training subset, params): trained concurrently below
    for k in range(int(folds.max()) + 1):
        tr, te = folds != k, folds == k
        if not te.any():
            continue
        ytr = y[tr]
        if kind != REGRESSION and np.unique(ytr).size < 2:  # degenerate fold: predict the prior
            prior = np.bincount(ytr, minlength=K) / ytr.size
            out[te] = prior if kind == MULTICLASS else prior[1]
            continue
        if model == "lgbm":
            sub = dataset.subset(rows[tr]).construct()
            sub.set_label(ytr.astype(np.float64))
            jobs.append((te, sub, _lgbm_params(kind, K, cfg.lgbm, cfg.seed + k)))
            continue
        est = _linear(kind, cfg.linear_c, cfg.ridge_alphas)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter
            est.fit(X[rows[tr]], ytr)
            if kind == REGRESSION:
                out[te] = est.predict(X[rows[te]])
                continue
            proba = est.predict_proba(X[rows[te]])
        classes = np.asarray(est.classes_, dtype=np.int64)
        if kind == BINARY:
            out[te] = proba[:, classes == 1][:, 0]
        else:
            full = np.zeros((te.sum(), K))
            full[:, classes] = proba
            out[te] = full
    if model == "lgbm" and jobs:

        def fit_predict(job):
            te, sub, params = job
            booster = lgb.train(params, sub, num_boost_round=cfg.lgbm.n_estimators)
            return booster.predict(np.asarray(X[rows[te]], dtype=np.float64))

        # Folds are independent single-threaded fits: threads (LightGBM releases the GIL) use
        # several cores without OpenMP spinning; every fold's result is the same in any order.
        workers = max(1, min(int(getattr(cfg, "workers", 1)), len(jobs)))
        if workers == 1:
            results = [fit_predict(j) for j in jobs]
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=workers) as pool:
                results = list(pool.map(fit_predict, jobs))
        for (te, _, _), pred in zip(jobs, results):
            out[te] = pred
    return out


# -------------------------------------------------------------------------- weighted metrics


def bootstrap_weights(n: int, b: int, rng: np.random.Generator) -> np.ndarray:
    """(b, n) float64: how many times each of n users is drawn in each of b resamples of size n."""
    idx = rng.integers(0, n, size=(b, n))
    flat = (idx + (np.arange(b)[:, None] * n)).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def _tie_groups(s: np.ndarray, descending: bool = False):
    order = np.argsort(-s if descending else s, kind="mergesort")
    ss = s[order]
    starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]]) if ss.size else np.zeros(0, np.int64)
    return order, starts


def _pos_neg(Wo: np.ndarray, yo: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weight of positives / negatives per tie group (columns = groups in score order)."""
    pos = Wo * yo
    neg = Wo - pos
    if starts.size == yo.size:  # no ties: groups are single rows
        return pos, neg
    return np.add.reduceat(pos, starts, axis=1), np.add.reduceat(neg, starts, axis=1)


def w_auc(y: np.ndarray, s: np.ndarray, W: np.ndarray) -> np.ndarray:
    """ROC-AUC (ties count one half) under weights W (B, n); NaN if a class has no weight."""
    y = np.asarray(y).astype(bool)
    order, starts = _tie_groups(np.asarray(s, dtype=np.float64))
    pos, neg = _pos_neg(W[:, order], y[order], starts)
    below = np.cumsum(neg, axis=1) - neg
    den = pos.sum(1) * neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (pos * (below + 0.5 * neg)).sum(1) / np.where(den > 0, den, 1), np.nan)


def w_average_precision(y: np.ndarray, s: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Average precision (PR-AUC, step-wise as sklearn) under weights."""
    y = np.asarray(y).astype(bool)
    order, starts = _tie_groups(np.asarray(s, dtype=np.float64), descending=True)
    pos, neg = _pos_neg(W[:, order], y[order], starts)
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = np.where(tp + fp > 0, tp / np.where(tp + fp > 0, tp + fp, 1), 0.0)
        total = pos.sum(1)
        return np.where(total > 0, (pos * prec).sum(1) / np.where(total > 0, total, 1), np.nan)


def _wmean(x: np.ndarray, W: np.ndarray) -> np.ndarray:
    return (W @ x) / W.sum(1)


def w_ece(correct: np.ndarray, conf: np.ndarray, W: np.ndarray, n_bins: int) -> np.ndarray:
    """Expected calibration error: sum over equal-width confidence bins of
    |sum(correct - conf)| / total weight (= sum_b n_b/N |acc_b - conf_b|)."""
    b = np.clip((np.asarray(conf) * n_bins).astype(np.int64), 0, n_bins - 1)
    onehot = np.zeros((b.size, n_bins))
    onehot[np.arange(b.size), b] = 1.0
    gap = W @ (onehot * (np.asarray(correct, dtype=np.float64) - conf)[:, None])
    return np.abs(gap).sum(1) / W.sum(1)


def _wranks(x: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Mid-ranks of every element within each weighted resample (ties share the mean rank)."""
    order, starts = _tie_groups(np.asarray(x, dtype=np.float64))
    gw = W[:, order] if starts.size == x.size else np.add.reduceat(W[:, order], starts, axis=1)
    grank = np.cumsum(gw, axis=1) - gw + (gw + 1) / 2
    group_of = np.empty(x.size, dtype=np.int64)
    sizes = np.diff(np.r_[starts, x.size])
    group_of[order] = np.repeat(np.arange(starts.size), sizes)
    return grank[:, group_of]


def w_spearman(y: np.ndarray, p: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Spearman correlation (Pearson of mid-ranks) of each weighted resample."""
    ry, rp = _wranks(y, W), _wranks(p, W)
    tot = W.sum(1, keepdims=True)
    my, mp = (W * ry).sum(1, keepdims=True) / tot, (W * rp).sum(1, keepdims=True) / tot
    cov = (W * (ry - my) * (rp - mp)).sum(1)
    vy, vp = (W * (ry - my) ** 2).sum(1), (W * (rp - mp) ** 2).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return cov / np.sqrt(vy * vp)


def binary_metrics(y, p, W, n_bins: int) -> dict[str, np.ndarray]:
    p = np.clip(p, 0.0, 1.0)
    return {
        "roc_auc": w_auc(y, p, W),
        "pr_auc": w_average_precision(y, p, W),
        "accuracy": _wmean(((p >= 0.5) == (y == 1)).astype(np.float64), W),
        "ece": w_ece(y == 1, p, W, n_bins),
        "brier": _wmean((p - y) ** 2, W),
    }


def multiclass_metrics(y, P, W, n_bins: int) -> dict[str, np.ndarray]:
    # one-vs-rest AUCs rank the given scores: clipping and renormalising rows (for the log loss)
    # would break ties between rows of different sums (sklearn's roc_auc_score ranks them as given)
    present = [k for k in range(P.shape[1]) if (y == k).any()]
    aucs = np.stack([w_auc(y == k, P[:, k], W) for k in present], axis=0) if len(present) > 1 else np.full((1, W.shape[0]), np.nan)
    P = np.clip(P, _EPS, 1.0)
    P = P / P.sum(1, keepdims=True)
    pred = P.argmax(1)
    conf = P.max(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample missing a class: nanmean of the rest
        macro = np.nanmean(aucs, axis=0)
    return {
        "accuracy": _wmean((pred == y).astype(np.float64), W),
        "roc_auc_macro_ovr": macro,
        "log_loss": _wmean(-np.log(P[np.arange(y.size), y]), W),
        "ece_top_label": w_ece(pred == y, conf, W, n_bins),
    }


def regression_metrics(y, p, W, n_bins: int) -> dict[str, np.ndarray]:
    tot = W.sum(1)
    my = (W @ y) / tot
    ss_res = W @ ((y - p) ** 2)
    ss_tot = (W * (y[None, :] - my[:, None]) ** 2).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = 1.0 - ss_res / ss_tot
    return {"r2": r2, "mae": _wmean(np.abs(y - p), W), "spearman": w_spearman(y, p, W)}


METRICS = {BINARY: binary_metrics, MULTICLASS: multiclass_metrics, REGRESSION: regression_metrics}
# The headline metric of each task type and whether higher is better.
PRIMARY = {BINARY: "roc_auc", MULTICLASS: "roc_auc_macro_ovr", REGRESSION: "r2"}
HIGHER_IS_BETTER = {
    "roc_auc": True, "pr_auc": True, "accuracy": True, "ece": False, "brier": False,
    "roc_auc_macro_ovr": True, "log_loss": False, "ece_top_label": False,
    "r2": True, "mae": False, "spearman": True,
}


def evaluate(
    kind: str,
    y: np.ndarray,
    preds: dict[str, np.ndarray],
    n_boot: int,
    seed: int,
    n_bins: int = 15,
    ci: float = 0.95,
    chunk_elems: int = 2_000_000,
    baseline: str | None = None,
) -> tuple[dict[str, dict[str, dict]], dict[str, dict]]:
    """Point estimates and percentile-bootstrap intervals of every metric of every prediction
    set in `preds` (name -> OOF predictions), over the same resamples of users.

    Returns ({name: {metric: {"value", "ci_low", "ci_high"}}}, deltas) where `deltas` holds,
    for every name other than `baseline`, the paired difference of the primary metric against
    `baseline` ({name: {"metric", "value", "ci_low", "ci_high"}}); empty without a baseline.
    """
    fn = METRICS[kind]
    n = y.size
    ones = np.ones((1, n))
    point = {k: {m: float(v[0]) for m, v in fn(y, p, ones, n_bins).items()} for k, p in preds.items()}
    boots: dict[str, dict[str, list[np.ndarray]]] = {k: {} for k in preds}
    rng = np.random.default_rng(seed)
    done = 0
    step = max(1, chunk_elems // max(n, 1))
    while done < n_boot:
        b = min(step, n_boot - done)
        W = bootstrap_weights(n, b, rng)
        for k, p in preds.items():
            for m, v in fn(y, p, W, n_bins).items():
                boots[k].setdefault(m, []).append(v)
        done += b
    alpha = (1.0 - ci) / 2
    results: dict[str, dict[str, dict]] = {}
    for k in preds:
        results[k] = {}
        for m, value in point[k].items():
            lo = hi = float("nan")
            if n_boot > 0:
                draws = np.concatenate(boots[k][m])
                if np.isfinite(draws).any():
                    lo, hi = (float(x) for x in np.nanquantile(draws, [alpha, 1 - alpha]))
            results[k][m] = {"value": value, "ci_low": lo, "ci_high": hi}
    deltas: dict[str, dict] = {}
    primary = PRIMARY[kind]
    if baseline in preds:
        for k in preds:
            if k == baseline:
                continue
            d = point[k][primary] - point[baseline][primary]
            lo = hi = float("nan")
            if n_boot > 0:
                draws = np.concatenate(boots[k][primary]) - np.concatenate(boots[baseline][primary])
                if np.isfinite(draws).any():
                    lo, hi = (float(x) for x in np.nanquantile(draws, [alpha, 1 - alpha]))
            deltas[k] = {"metric": primary, "value": float(d), "ci_low": lo, "ci_high": hi}
    return results, deltas
