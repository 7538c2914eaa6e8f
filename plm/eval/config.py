"""`EvalConfig`: the typed schema of `plm-eval` (registered in hydra's ConfigStore as `eval_schema`).

Values live in `conf/eval.yaml`; hydra validates keys and types when it composes the config.
`plm.eval.run.run_eval(EvalConfig(...))` takes the same dataclass without hydra.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# The probe/feature-set names, in report order. `<features>_<model>`.
FEATURE_SETS = ("embedding_linear", "embedding_lgbm", "aggregates_lgbm", "combined_lgbm")


@dataclass
class LGBMConfig:
    """LightGBM settings shared by every gradient-boosting probe (modest: 3,000 users x 4 tasks
    x 3 feature sets x 5 folds run in well under a minute). Deterministic: the run's
    `seed`, `deterministic=True` and a fixed thread count are always passed."""

    n_estimators: int = 100  # boosting rounds (no early stopping: every fold trains the same)
    learning_rate: float = 0.1
    num_leaves: int = 15  # leaves per tree
    min_child_samples: int = 20  # users per leaf, at least
    subsample: float = 0.8  # row bagging fraction (every iteration)
    colsample_bytree: float = 0.3  # feature fraction per tree
    reg_lambda: float = 1.0  # L2 on leaf values
    max_bin: int = 31  # histogram bins per feature (fitted once per feature set, label-free)
    # Fixed thread count (results do not depend on it with deterministic=True). 1 by default:
    # on a busy machine LightGBM's OpenMP threads spin and 2 threads were 40x slower than 1.
    num_threads: int = 1


@dataclass
class EvalConfig:
    """`plm-eval embeddings=PATH labels=PATH raw=DIR out=DIR`: frozen-probe evaluation of user
    embeddings against a hand-built aggregate baseline (see docs/evaluation.md)."""

    embeddings: str = MISSING  # Parquet file or folder of parts: user_id, embedding (+ metadata, as_of)
    labels: str | None = None  # labels.parquet (user_id + one column per task: 0/1, ints, numbers or class-name strings); None: <raw>/labels.parquet
    raw: str | None = None  # raw folder (payments/ logins/ orders/) for the baseline; None: no baseline
    out: str = MISSING  # report folder (must be absent or empty unless overwrite=true)
    overwrite: bool = False  # replace the report files of an earlier run in `out`
    # ISO time; only raw events strictly before it feed the baseline. None: the embeddings'
    # `as_of` column (per user when it varies), else their schema metadata's `as_of`.
    cutoff: str | None = None
    ts_min: str = "1990-01-01T00:00:00Z"  # plausible window for raw `ts` (as plm-prep)
    ts_max: str | None = None  # None: one day after the run (as plm-prep)
    tasks: list[str] | None = None  # label columns to evaluate; None: every label column
    # task type per label column instead of the inferred one (binary | multiclass | regression),
    # e.g. +task_types.future_spend=regression for a float column of whole amounts
    task_types: dict[str, str] = field(default_factory=dict)
    feature_sets: list[str] = field(default_factory=lambda: list(FEATURE_SETS))  # subset of FEATURE_SETS
    folds: int = 5  # stratified k-fold (regression: stratified on quantile bins of the label)
    seed: int = 0  # folds, LightGBM, bootstrap and the 2-D map all derive from it
    bootstrap: int = 500  # bootstrap resamples (over users) for the confidence intervals; 0: none
    ci: float = 0.95  # confidence level of the intervals (percentile bootstrap)
    ece_bins: int = 15  # equal-width bins of the expected calibration error
    linear_c: float = 1.0  # inverse L2 strength of the logistic-regression probe (standardised inputs)
    ridge_alphas: list[float] = field(default_factory=lambda: [0.1, 1.0, 10.0, 100.0, 1000.0])  # RidgeCV grid
    lgbm: LGBMConfig = field(default_factory=LGBMConfig)
    workers: int = 2  # LightGBM folds trained concurrently (threads, each lgbm.num_threads); same results for any value
    map_method: str = "pca"  # 2-D map of the embeddings: pca | tsne
    map_max_points: int = 3000  # seeded subsample for the map
    # Decoders: a decoder checkpoint (final.pt) and its prepared folder add next-event metrics on
    # `next_split` (per-field accuracy / perplexity, time MAE) and generated-vs-real futures.
    ckpt: str | None = None
    data: str | None = None  # the prepared folder the decoder was trained on
    next_split: str = "test"
    next_max_batches: int = 0  # 0 = every batch of the split
    generate_users: int = 128  # users whose last `generate_horizon` events are generated
    generate_horizon: int = 8
    plots: bool = True  # write the PNG figures
    progress: bool = True  # tqdm bar over tasks x feature sets (stderr)


cs = ConfigStore.instance()
cs.store(name="eval_schema", node=EvalConfig)
