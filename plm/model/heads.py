"""Prediction heads over the model's hidden states, and the samplers generation uses.

- `EventHeads`: one softmax head per field (categorical ids and numeric bin ids), an optional
  regression of each numeric field's standardised value, and a time-to-next-event head
  (`LogNormalMixtureTime` or `BinnedTime`). Used for next-event prediction (decoder) and
  masked-event prediction (encoder).
- `ProjectionHead`: MLP projection of pooled user embeddings for contrastive objectives.
- `MembershipHead`: query of a pooled user vector and key of an event, for event membership.

The heads return raw parameters (`EventPredictions`); the training losses live with the
training code. The time heads also expose `nll` and `sample` because generation needs them.
Time gaps are in seconds; both time heads model y = log1p(dt) (the `log_dt` convention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plm.model.batch import MASK, PAD
from plm.model.config import HeadsConfig, split_names

# ----------------------------------------------------------------------------- sampling helpers


def sample_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None, forbid: tuple[int, ...] = (PAD, MASK)) -> Tensor:
    """Sample ids from logits (..., V). temperature 0 = argmax; top_k 0 and top_p 1 = no truncation.
    Ids in `forbid` (PAD and MASK by default) are never produced."""
    logits = logits.float().clone()
    if forbid:
        logits[..., list(forbid)] = float("-inf")
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


# ----------------------------------------------------------------------------- time heads


class LogNormalMixtureTime(nn.Module):
    """Time to the next event as a log-normal mixture over (dt + 1 s): y = log1p(dt) ~
    sum_k w_k N(mu_k, sigma_k) (intensity-free TPP, Shchur et al. 2020). The mixture's mass at
    y < 0 stands for simultaneous events: sampling maps it to dt = 0."""

    def __init__(self, d_model: int, n_components: int):
        super().__init__()
        self.k = n_components
        self.proj = nn.Linear(d_model, 3 * n_components)

    def forward(self, h: Tensor) -> dict[str, Tensor]:
        logits, mu, log_sigma = self.proj(h).chunk(3, dim=-1)  # each (..., K)
        return {"logits": logits, "mu": mu, "log_sigma": log_sigma.clamp(-5.0, 3.0)}

    @staticmethod
    def nll(params: dict[str, Tensor], dt: Tensor) -> Tensor:
        """-log density of y = log1p(dt) under the mixture, elementwise (...); dt in seconds >= 0.
        (The density over seconds is this minus log1p(dt); the difference does not depend on
        the model.)"""
        y = torch.log1p(dt.clamp(min=0).float())[..., None]
        sigma = params["log_sigma"].exp()
        logp = -0.5 * ((y - params["mu"]) / sigma) ** 2 - params["log_sigma"] - 0.5 * math.log(2 * math.pi)
        logw = F.log_softmax(params["logits"], dim=-1)
        return -torch.logsumexp(logw + logp, dim=-1)

    @staticmethod
    def sample(params: dict[str, Tensor], temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """dt in seconds (...), float64."""
        comp = sample_logits(params["logits"], max(temperature, 1e-6), generator=generator, forbid=())
        mu = params["mu"].gather(-1, comp[..., None])[..., 0]
        sigma = params["log_sigma"].exp().gather(-1, comp[..., None])[..., 0]
        eps = torch.randn(mu.shape, generator=generator, device=mu.device) if temperature > 0 else torch.zeros_like(mu)
        y = mu + sigma * eps * (temperature if temperature > 0 else 0.0)
        return torch.expm1(y.double().clamp(min=0, max=40))


class BinnedTime(nn.Module):
    """Time to the next event as a softmax over bins uniform in y = log1p(dt), 0..log1p(max_gap)."""

    def __init__(self, d_model: int, n_bins: int, max_gap: float):
        super().__init__()
        self.n_bins, self.y_max = n_bins, math.log1p(max_gap)
        self.proj = nn.Linear(d_model, n_bins)

    def forward(self, h: Tensor) -> dict[str, Tensor]:
        return {"logits": self.proj(h)}

    def bin_of(self, dt: Tensor) -> Tensor:
        y = torch.log1p(dt.clamp(min=0).double())
        return (y / self.y_max * self.n_bins).long().clamp(0, self.n_bins - 1)

    def nll(self, params: dict[str, Tensor], dt: Tensor) -> Tensor:
        """Cross-entropy of the bin holding dt, elementwise (...)."""
        logits = params["logits"]
        return F.cross_entropy(logits.reshape(-1, self.n_bins), self.bin_of(dt).reshape(-1),
                               reduction="none").view(dt.shape)

    def sample(self, params: dict[str, Tensor], temperature: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        b = sample_logits(params["logits"], temperature, generator=generator, forbid=())
        u = torch.rand(b.shape, generator=generator, device=b.device, dtype=torch.float64)
        u = u if temperature > 0 else torch.full_like(u, 0.5)
        return torch.expm1((b.double() + u) * (self.y_max / self.n_bins))


# ----------------------------------------------------------------------------- event heads


@dataclass
class EventPredictions:
    """Raw head outputs at every position, (B, T, ...).

    logits: {field: (B, T, V_field)} over the field's token ids (bin ids for numeric fields).
    values: {numeric field: (B, T)} regression of the standardised value (numeric_regression).
    time: parameters of the time head: lognormal {"logits", "mu", "log_sigma"} each (B, T, K);
        binned {"logits"} (B, T, n_bins); empty when heads.time = "none".
    replaced: (B, T) logit that the event was swapped in from another sequence (heads.replaced).
    """

    logits: dict[str, Tensor] = field(default_factory=dict)
    values: dict[str, Tensor] = field(default_factory=dict)
    time: dict[str, Tensor] = field(default_factory=dict)
    replaced: Tensor | None = None


class TiedLogits(nn.Module):
    """logits = g(h) @ table_f^T + bias, sharing field f's rows of the input embedding table.
    The embedding is referenced, not registered, so its table is counted and saved once."""

    def __init__(self, embedding: nn.Module, field: str):
        super().__init__()
        self._embedding = [embedding]  # a list hides it from module registration
        self.field = field
        self.bias = nn.Parameter(torch.zeros(embedding.sizes[field]))

    def forward(self, g: Tensor) -> Tensor:
        return F.linear(g, self._embedding[0].field_table(self.field), self.bias)


class EventHeads(nn.Module):
    """Hidden states (B, T, d) -> EventPredictions for the event at the next (decoder) or the
    masked (encoder) position.

    embedding: the model's EventEmbedding, whose table rows serve as output weights when cfg.tie
    (for fields whose rows cover the whole vocabulary); other fields get their own Linear(d_model, V)."""

    def __init__(self, field_vocab_sizes: dict[str, int], numeric_fields: list[str] | tuple[str, ...],
                 d_model: int, cfg: HeadsConfig, embedding: nn.Module | None = None):
        super().__init__()
        excluded = set(split_names(cfg.exclude_fields))
        self.fields = [f for f in field_vocab_sizes if f not in excluded]
        tied = []
        if cfg.tie and embedding is not None:
            tied = [f for f in self.fields if embedding.sizes.get(f) == field_vocab_sizes[f]]
        self.tie_proj = nn.Sequential(nn.Linear(d_model, embedding.width), nn.GELU()) if tied else None
        self.tied = set(tied)
        self.logits = nn.ModuleDict(
            {f: TiedLogits(embedding, f) if f in self.tied else nn.Linear(d_model, field_vocab_sizes[f])
             for f in self.fields}
        )
        self.values = nn.ModuleDict(
            {f: nn.Linear(d_model, 1) for f in numeric_fields if f in self.fields and cfg.numeric_regression}
        )
        if cfg.time == "lognormal":
            self.time: nn.Module | None = LogNormalMixtureTime(d_model, cfg.time_components)
        elif cfg.time == "binned":
            self.time = BinnedTime(d_model, cfg.time_bins, cfg.time_max_gap)
        else:
            self.time = None
        self.replaced = nn.Linear(d_model, 1) if cfg.replaced else None

    def forward(self, h: Tensor) -> EventPredictions:
        g = self.tie_proj(h) if self.tie_proj is not None else None
        return EventPredictions(
            logits={f: head(g if f in self.tied else h) for f, head in self.logits.items()},
            values={f: head(h)[..., 0] for f, head in self.values.items()},
            time=self.time(h) if self.time is not None else {},
            replaced=self.replaced(h)[..., 0] if self.replaced is not None else None,
        )


class MembershipHead(nn.Module):
    """Event membership scores: `query(pooled) (N, dim)` and `key(event input embeddings) (n, dim)`,
    both L2-normalised; their dot product says how well an event fits a user's pooled vector.

    With `bank > 0` the query also reads the user's *event counts*: `bank` learned detectors
    (a linear map of each event's final state, ReLU), summed over the user's events and
    log1p-scaled (`counts`, (N, bank)).
    A sum, not a mean: a burst of 2 rare events among 300 still counts 2. Membership rewards
    detectors of what is particular to a user; plm-export reads them as the `bank` pooling part."""

    def __init__(self, d_model: int, dim: int, bank: int = 0):
        super().__init__()
        self.bank = nn.Linear(d_model, bank) if bank > 0 else None
        self.query = nn.Linear(d_model + max(bank, 0), dim)
        self.key = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, dim))

    def counts(self, h: Tensor, seq: Tensor, n: int) -> Tensor:
        """(B, T, d) final states, (B, T) sequence index of each event (-1: padding; see
        `plm.model.batch.sequence_index`), n sequences -> (n, bank) log1p of the summed detectors."""
        flat = seq.reshape(-1)
        keep = flat >= 0
        f = torch.relu(self.bank(h.reshape(-1, h.shape[-1])[keep])).float()
        return torch.log1p(f.new_zeros(n, f.shape[-1]).index_add_(0, flat[keep], f))

    def counts_rows(self, h: Tensor, mask: Tensor) -> Tensor:
        """`counts` of an unpacked batch (one sequence per row, `mask` (B, T) bool of real events),
        written with masks only (ONNX export, torch.compile)."""
        f = torch.relu(self.bank(h)).float() * mask[..., None].float()
        return torch.log1p(f.sum(1))

    def forward(self, pooled: Tensor, events: Tensor, counts: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if (counts is None) != (self.bank is None):
            raise ValueError("MembershipHead: pass counts exactly when the head has a bank")
        q_in = pooled if counts is None else torch.cat([pooled, counts.to(pooled.dtype)], dim=-1)
        return F.normalize(self.query(q_in), dim=-1), F.normalize(self.key(events), dim=-1)


class ProjectionHead(nn.Module):
    """Pooled embedding (N, d) -> (N, dim) projection for contrastive objectives (SimCLR-style MLP)."""

    def __init__(self, d_model: int, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, dim))

    def forward(self, pooled: Tensor) -> Tensor:
        return self.net(pooled)
