"""Typed model configuration: one dataclass per component, values in `conf/model/*.yaml`.

Every field is a primitive, a string or a dict so that hydra/OmegaConf can validate the YAML
(`conf/model/{tiny,small,base,large}.yaml` hold plain keys matching `ModelConfig`). Lists are
written as '+'-joined or ','-joined strings (e.g. `position.bias: "alibi+time_bucket"`).

Vocabulary sizes are *not* part of the config: they come from the fitted tokenizer
(`tokenizer.json`) and are passed to the model constructors as `field_vocab_sizes`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any


@dataclass
class EmbeddingConfig:
    """How one event (a set of fields) becomes one token vector (`plm.model.embedding`)."""

    # Numeric fields: "bin" (embedding of the quantile-bin id), "linear" (projection of the
    # standardised value), "periodic" (learned-frequency sin/cos of the value, then a linear
    # layer), "both" (bin embedding + linear projection of the value, summed).
    numeric: str = "both"
    n_frequencies: int = 16  # frequencies of the "periodic" numeric encoding
    frequency_scale: float = 1.0  # std of the initial periodic frequencies (value is standardised)
    # How field vectors are combined into the event vector: "sum" (each field embedded at
    # d_model and summed) or "concat" (each field embedded at `field_dim`, concatenated and
    # projected to d_model; keeps large vocabularies cheap).
    combine: str = "sum"
    field_dim: int = 32  # per-field width for combine=concat (then also the field mixer's); sum: d_model
    # Field mixing inside each event (hierarchical tabular transformer): number of small
    # bidirectional transformer layers over the fields of one event; 0 switches it off.
    field_mixer_layers: int = 0
    field_mixer_heads: int = 2  # heads of the field mixer (must divide its width)
    norm: bool = True  # normalise the combined event vector (model's norm type)
    dropout: float = 0.0  # dropout on the event vector
    exclude_fields: str = ""  # comma-separated fields to leave out (ablation), e.g. "merchant,mcc"
    # Time gap as an input (encoders): "none" or "periodic" = learned-frequency sin/cos of
    # log1p(seconds since the previous event of the sequence, from `ts`), added to the event
    # vector. Unlike time RoPE (which only shapes attention weights) it writes the gap into the
    # representation, also for masked events and for the as-of query of plm-export.
    time_gap: str = "none"


@dataclass
class AttentionConfig:
    """Self-attention (`plm.model.attention.Attention`)."""

    n_heads: int = 4  # query heads; d_model must be divisible by it
    # Key/value heads: 0 or n_heads = multi-head; a divisor of n_heads = grouped-query;
    # 1 = multi-query. The KV cache stores n_kv_heads heads.
    n_kv_heads: int = 0
    # "sdpa" (torch scaled_dot_product_attention, default), "eager" (reference einsum/softmax),
    # "flex" (torch FlexAttention; GPU, or CPU forward-only without gradients),
    # "xformers" (CUDA only, optional extra). An unusable backend raises; never a fallback.
    backend: str = "sdpa"
    dropout: float = 0.0  # dropout on attention probabilities (training only)
    bias: bool = False  # biases in the q/k/v and output projections


@dataclass
class PositionConfig:
    """Position and time information (`plm.model.positions`); schemes combine freely."""

    # Added to the event vector: "none", "learned" (table of max_len rows), "sinusoidal".
    absolute: str = "none"
    # Rotary embedding of queries/keys: "none", "index" (event index in its sequence),
    # "time" (angles = elapsed seconds x log-spaced frequencies: attention depends on the time
    # difference), "both" (half of the rotary pairs index, half time).
    rope: str = "index"
    rope_theta: float = 10000.0  # base of the index-RoPE frequencies
    time_min_period: float = 60.0  # shortest period of time-RoPE, seconds (1 minute)
    time_max_period: float = 31_536_000.0  # longest period of time-RoPE, seconds (1 year)
    # Additive attention biases, '+'-joined subset of: "alibi" (linear in index distance),
    # "t5" (learned bias per bucket of index distance), "time_alibi" (per-head decay in
    # log elapsed time), "time_bucket" (learned bias per bucket of log time gap); or "none".
    bias: str = "none"
    max_len: int = 2048  # rows of the learned absolute table (longest sequence)
    t5_buckets: int = 32  # T5 relative-position buckets
    t5_max_distance: int = 128  # distance beyond which T5 buckets saturate
    time_unit: float = 3600.0  # seconds; time_alibi bias = -slope_h * log1p(|dt| / time_unit)
    time_buckets: int = 32  # buckets of the learned time-gap bias (split by direction if bidirectional)
    time_max_gap: float = 31_536_000.0  # seconds; gaps at or above share the last bucket


@dataclass
class FFNConfig:
    """Feed-forward sublayer (`plm.model.layers`)."""

    kind: str = "swiglu"  # "swiglu" or "gelu"
    hidden: int = 0  # hidden width; 0 = 4*d_model (gelu) or 8/3*d_model rounded up to multiple_of (swiglu)
    multiple_of: int = 64  # rounding of the automatic swiglu width
    bias: bool = False  # biases in the feed-forward linears
    # Mixture of experts: 0 = dense feed-forward; E > 1 = E experts with a top-k router and a
    # Switch-style load-balancing loss (returned as `aux_loss` by the model).
    n_experts: int = 0
    top_k: int = 2  # experts per event
    moe_every: int = 1  # use the MoE feed-forward in every n-th block (1 = every block)


@dataclass
class HeadsConfig:
    """Prediction heads (`plm.model.heads`); the losses come with the training code."""

    # Tie each field's output classes to its input embedding table: logits = table . g(h) + bias,
    # with one shared projection g of width = the field width (weight tying as in BERT/GPT-2);
    # keeps big vocabularies (merchant) from doubling the parameter count. False: one Linear per field.
    tie: bool = True
    numeric_regression: bool = True  # numeric fields: bin logits plus a regression of the standardised value
    time: str = "lognormal"  # time-to-next-event head: "lognormal" (mixture), "binned" or "none"
    time_components: int = 8  # mixture components of the log-normal head
    time_bins: int = 64  # bins of the binned head (uniform in log1p(seconds))
    time_max_gap: float = 31_536_000.0  # seconds; largest gap of the binned head
    projection_dim: int = 0  # encoder projection head for contrastive learning; 0 = none
    exclude_fields: str = ""  # comma-separated fields without a prediction head
    # Per-event "was this event swapped in from another sequence?" logit (ELECTRA-style
    # replaced-event detection, trained by objective.masked.replace_prob > 0).
    replaced: bool = False
    # Event membership (encoder, trained by objective.masked.membership_weight > 0): the width of
    # a query projection of the pooled user vector and of a key MLP over an event's input
    # embedding; each masked event must be matched to its own user among the batch's. 0 = none.
    membership_dim: int = 0
    # Detectors of the membership head's event counts (needs membership_dim > 0): a linear map of
    # each event's final state, ReLU, summed over the user's events, log1p; the query reads them
    # beside the pooled vector, and plm-export's `bank` pooling part exports them. 0 = none.
    membership_bank: int = 0


@dataclass
class ModelConfig:
    """A transformer over event tokens; the same config builds an encoder or a decoder."""

    name: str = "custom"  # size name, informative only
    d_model: int = 64  # width of the event vectors and residual stream
    n_layers: int = 2  # transformer blocks
    norm: str = "rmsnorm"  # "rmsnorm" or "layernorm" (pre-norm blocks and final norm)
    norm_eps: float = 1e-5
    dropout: float = 0.0  # dropout on the residual branches
    pooling: str = "mean"  # encoder user embedding: "cls", "mean", "last", "attention"
    init_std: float = 0.02  # std of the normal init (residual projections scaled by 1/sqrt(2*n_layers))
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    position: PositionConfig = field(default_factory=PositionConfig)
    ffn: FFNConfig = field(default_factory=FFNConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.attention.n_heads

    @property
    def kv_heads(self) -> int:
        return self.attention.n_kv_heads or self.attention.n_heads

    @property
    def ffn_hidden(self) -> int:
        if self.ffn.hidden:
            return self.ffn.hidden
        if self.ffn.kind == "gelu":
            return 4 * self.d_model
        h = int(8 * self.d_model / 3)
        m = self.ffn.multiple_of
        return m * ((h + m - 1) // m)

    def validate(self) -> ModelConfig:
        """Raise ValueError naming the offending key; returns self."""
        a, p = self.attention, self.position

        def check(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"model config: {msg}")

        check(self.d_model % a.n_heads == 0, f"d_model={self.d_model} not divisible by attention.n_heads={a.n_heads}")
        check(self.kv_heads >= 1 and a.n_heads % self.kv_heads == 0,
              f"attention.n_kv_heads={a.n_kv_heads} must divide n_heads={a.n_heads}")
        check(a.backend in ("sdpa", "eager", "flex", "xformers"), f"unknown attention.backend '{a.backend}'")
        check(self.norm in ("rmsnorm", "layernorm"), f"unknown norm '{self.norm}'")
        check(self.pooling in ("cls", "mean", "last", "attention"), f"unknown pooling '{self.pooling}'")
        check(p.absolute in ("none", "learned", "sinusoidal"), f"unknown position.absolute '{p.absolute}'")
        check(p.rope in ("none", "index", "time", "both"), f"unknown position.rope '{p.rope}'")
        check(p.rope == "none" or self.head_dim % (4 if p.rope == "both" else 2) == 0,
              f"head_dim={self.head_dim} too odd for position.rope={p.rope}")
        for b in bias_schemes(p.bias):
            check(b in ("alibi", "t5", "time_alibi", "time_bucket"), f"unknown position.bias '{b}'")
        # (for an encoder's two directions as for a decoder's one: the buckets split by direction)
        check(p.t5_buckets >= 4 and p.t5_max_distance > p.t5_buckets // 2,
              f"position.t5_buckets={p.t5_buckets} needs >= 4 and t5_max_distance={p.t5_max_distance} "
              f"> t5_buckets / 2 (the exact buckets; the rest are log-spaced up to it)")
        check(p.time_buckets >= 4, f"position.time_buckets={p.time_buckets} needs >= 4 (2 per direction at least)")
        e = self.embedding
        check(e.numeric in ("bin", "linear", "periodic", "both"), f"unknown embedding.numeric '{e.numeric}'")
        check(e.combine in ("sum", "concat"), f"unknown embedding.combine '{e.combine}'")
        check(e.time_gap in ("none", "periodic"), f"unknown embedding.time_gap '{e.time_gap}'")
        if e.field_mixer_layers:
            w = self.d_model if e.combine == "sum" else e.field_dim
            check(w % e.field_mixer_heads == 0, f"field mixer width {w} not divisible by field_mixer_heads")
        check(self.ffn.kind in ("swiglu", "gelu"), f"unknown ffn.kind '{self.ffn.kind}'")
        check(self.ffn.n_experts == 0 or 1 <= self.ffn.top_k <= self.ffn.n_experts,
              "ffn.top_k must be in [1, n_experts]")
        check(self.heads.time in ("lognormal", "binned", "none"), f"unknown heads.time '{self.heads.time}'")
        check(self.heads.membership_dim >= 0 and self.heads.membership_bank >= 0,
              "heads.membership_dim and heads.membership_bank must be >= 0")
        check(self.heads.membership_bank == 0 or self.heads.membership_dim > 0,
              f"heads.membership_bank={self.heads.membership_bank} needs heads.membership_dim > 0 "
              "(the bank is read by the membership head's query)")
        return self


def bias_schemes(spec: str) -> list[str]:
    """'alibi+time_bucket' -> ['alibi', 'time_bucket']; 'none' or '' -> []."""
    return [s.strip() for s in spec.replace(",", "+").split("+") if s.strip() and s.strip() != "none"]


def split_names(spec: str) -> list[str]:
    """'a,b' -> ['a', 'b']; '' -> []."""
    return [s.strip() for s in spec.replace("+", ",").split(",") if s.strip()]


def _from_dict(cls: type, d: dict[str, Any]) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = set(d) - set(known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
    kwargs = {}
    for k, v in d.items():
        default = known[k].default_factory() if callable(known[k].default_factory) else None  # type: ignore[misc]
        kwargs[k] = _from_dict(type(default), v) if is_dataclass(default) and isinstance(v, dict) else v
    return cls(**kwargs)


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Build a ModelConfig from a plain (nested) dict, e.g. a loaded YAML or OmegaConf container."""
    return _from_dict(ModelConfig, dict(d)).validate()


def load_model_config(path_or_name: str) -> ModelConfig:
    """Load `conf/model/<name>.yaml` (a size name) or any YAML path into a ModelConfig."""
    import os

    import yaml

    path = path_or_name
    if not path.endswith((".yaml", ".yml")):
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path = os.path.join(root, "conf", "model", f"{path_or_name}.yaml")
    with open(path) as f:
        d = yaml.safe_load(f) or {}
    d.pop("defaults", None)
    return model_config_from_dict(d)


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    return asdict(cfg)
