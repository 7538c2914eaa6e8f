"""Typed config schemas (dataclasses) registered with hydra's ConfigStore.

Values live in YAML under `conf/`; each YAML's defaults list starts with the schema named here,
so hydra validates keys and types when it composes the config. Fields are primitives or strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from data_prep.synth import SynthConfig  # noqa: F401  (schema lives beside the generator)


@dataclass
class SparkConfig:
    """How the Spark session is built. Point `master` at a cluster (yarn, k8s://..., spark://...)
    and put any Spark setting in `conf`; no code change is needed to leave local mode."""

    master: str = "local[*]"  # local[*], local[2], yarn, spark://host:7077, k8s://...
    app_name: str = "plm-prep"
    conf: dict[str, str] = field(default_factory=dict)  # any spark.* setting
    log_level: str = "WARN"


@dataclass
class VocabConfig:
    """Vocabulary fitting for categorical fields (on training users only)."""

    min_count: int = 5  # values seen fewer times become OOV
    max_size: int = 50_000  # frequency cap per field (most frequent kept; tail -> OOV)
    # Per-field overrides of max_size, e.g. {merchant: 100000}.
    max_size_by_field: dict[str, int] = field(default_factory=lambda: {"merchant": 20_000})


@dataclass
class BinsConfig:
    """Quantile bins for numeric fields (fitted on training users only)."""

    n_bins: int = 32  # quantile bins per numeric field (duplicate edges are merged)
    max_sample: int = 200_000  # values sampled (deterministically, by event hash) to fit edges


@dataclass
class PrepConfig:
    """`plm-prep raw=DIR out=DIR`: raw events -> tokenised per-user sequences (see README)."""

    raw: str = MISSING  # folder with payments/ logins/ orders/ (each optional) and labels.parquet
    out: str = MISSING  # output folder (must not exist unless overwrite=true)
    overwrite: bool = False
    cutoff: str | None = None  # ISO time; events at/after it are excluded. None: after the last event
    ts_min: str = "1990-01-01T00:00:00Z"  # plausible window for ts (inclusive)
    ts_max: str | None = None  # None: one day after the job runs
    split_salt: str = "plm-split-v1"  # user split = stable hash(salt, user_id)
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    max_events: int = 512  # window length (events)
    stride: int = 256  # step between window ends for histories longer than max_events
    rows_per_shard: int = 20_000  # windows per output Parquet shard (approximate)
    # A tokenizer.json (or a plm-prep output folder holding one) to apply instead of fitting one:
    # new data or a new cut-off tokenised for an existing model (vocab.* and bins.* then unused).
    tokenizer: str | None = None
    vocab: VocabConfig = field(default_factory=VocabConfig)
    bins: BinsConfig = field(default_factory=BinsConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)


cs = ConfigStore.instance()
cs.store(name="synth_schema", node=SynthConfig)
cs.store(name="prep_schema", node=PrepConfig)
import plm.eval.config  # noqa: F401,E402
import plm.export.config  # noqa: F401,E402
import plm.train.config  # noqa: F401,E402
