"""Position and time schemes.

Each scheme is a small pure function; the model calls them once per forward (in
`PositionEncoding`) and hands the results to every block:

- absolute (added to the event vector): `sinusoidal(pos, dim)`; the learned table lives in
  `PositionEncoding`;
- rotary: `rope_cis(angles)` + `apply_rope(x, cis)`, or `rope(q, k, pos, freqs)` in one
  call (pairs are interleaved, (x[2i], x[2i+1]), rotated by one complex multiplication); angles are `positions x index_frequencies(...)` (index RoPE) or
  `seconds x time_frequencies(...)` (time RoPE: attention depends on the time difference);
- additive biases, one signature `f(q, k, ...) -> (B, H, T, S)` where `q`/`k` are the query and
  key positions (index schemes) or times in seconds (time schemes), each `(B, T)` / `(B, S)`:
  `alibi_bias`, `t5_bias`, `time_alibi_bias`, `time_bucket_bias`.

Times are float64 seconds relative to the start of the event's sequence
(`plm.model.batch.relative_seconds`), so every time scheme is invariant to shifting all
timestamps of a sequence.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from plm.model.config import ModelConfig, bias_schemes

# ----------------------------------------------------------------------------- absolute


def sinusoidal(pos: Tensor, dim: int, base: float = 10000.0) -> Tensor:
    """(B, T) positions -> (B, T, dim) [sin | cos] features (Vaswani et al.)."""
    half = dim // 2
    freqs = base ** (-torch.arange(half, device=pos.device, dtype=torch.float64) / half)
    ang = pos.double()[..., None] * freqs  # (B, T, half)
    out = torch.cat([ang.sin(), ang.cos()], dim=-1)
    if dim % 2:
        out = torch.nn.functional.pad(out, (0, 1))
    return out.float()


# ----------------------------------------------------------------------------- rotary


def index_frequencies(n_pairs: int, theta: float = 10000.0, device=None) -> Tensor:
    """RoPE inverse frequencies theta^(-i/n_pairs), i = 0..n_pairs-1 (float64)."""
    return _constant([theta ** (-i / n_pairs) for i in range(n_pairs)], device)


def time_frequencies(n_pairs: int, min_period: float, max_period: float, device=None) -> Tensor:
    """Angular frequencies 2*pi/period (rad per second), periods log-spaced from min to max."""
    if n_pairs == 1:
        return _constant([2 * math.pi / min_period], device)
    ratio = max_period / min_period
    return _constant([2 * math.pi / (min_period * ratio ** (i / (n_pairs - 1))) for i in range(n_pairs)], device)


def _constant(values: list[float], device=None) -> Tensor:
    """float64 tensor of Python floats. Computed in Python, not in tensor ops: torch.onnx's
    exporter traced `scalar ** tensor` and `scalar / tensor` with float32 scalars, and the time
    frequencies lost their float64 precision (angles of months of seconds were off by a tenth of
    a radian in ONNX Runtime)."""
    return torch.tensor(values, dtype=torch.float64, device=device)


def rope_cis(angles: Tensor) -> Tensor:
    """(B, T, D/2) float64 angles -> complex64 exp(i * angle) (B, T, 1, D/2) (broadcast over heads).
    While exporting to ONNX (no complex tensors there) or compiling (inductor generates no code for
    complex operators and would leave them to eager): the real form (B, T, 1, D/2, 2) = (cos, sin)."""
    if torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
        return torch.stack([angles.cos(), angles.sin()], dim=-1).float()[:, :, None]
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)[:, :, None]


def apply_rope(x: Tensor, cis: Tensor) -> Tensor:
    """Rotate the interleaved pairs (x[2i], x[2i+1]) of x (..., D) by the angles of cis (..., D/2):
    one complex multiplication. x (B, T, heads, D) with cis (B, T, 1, D/2) in the model. A real
    `cis` (..., D/2, 2) of (cos, sin) (the ONNX form of `rope_cis`) gives the same rotation."""
    if not cis.is_complex():
        xr = x.float().unflatten(-1, (-1, 2))  # (..., D/2, 2)
        a, b, c, s = xr[..., 0], xr[..., 1], cis[..., 0], cis[..., 1]
        return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).to(x.dtype)
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (..., D/2) complex
    return torch.view_as_real(xc * cis).flatten(-2).to(x.dtype)


def rope(q: Tensor, k: Tensor, pos: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor]:
    """Rotary embedding of q, k (B, T, H, D) at positions (or seconds) pos (B, T) with the given
    per-pair frequencies (D/2,): q . k then depends on pos only through pos_q - pos_k."""
    cis = rope_cis(pos.double()[..., None] * freqs.to(pos.device))
    return apply_rope(q, cis), apply_rope(k, cis)


def bucket_lookup(table: Tensor, bucket: Tensor) -> Tensor:
    """table (n_buckets, H), bucket (B, T, S) long -> (B, H, T, S) = table[bucket] per head."""
    return _BucketLookup.apply(table, bucket)


class _BucketLookup(torch.autograd.Function):
    """Gather straight into a contiguous (B, H, T, S) tensor, with a scatter-add backward (much
    faster on CPU than the accumulate-index_put backward of advanced indexing)."""

    @staticmethod
    def forward(ctx, table: Tensor, bucket: Tensor) -> Tensor:
        nb, H = table.shape
        index = bucket[:, None] + (torch.arange(H, device=bucket.device) * nb)[None, :, None, None]  # (B, H, T, S)
        ctx.save_for_backward(index)
        ctx.shape = (nb, H)
        return torch.take(table.t().reshape(-1), index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        nb, H = ctx.shape
        flat = torch.zeros(H * nb, dtype=grad.dtype, device=grad.device)
        flat.scatter_add_(0, index.reshape(-1), grad.reshape(-1))
        return flat.view(H, nb).t(), None


# ----------------------------------------------------------------------------- biases


def alibi_slopes(n_heads: int) -> Tensor:
    """Per-head ALiBi slopes (Press et al.): geometric 2^(-8/n), interleaved when n is not a power of 2."""

    def pow2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        s = pow2(n_heads)
    else:
        c = 2 ** math.floor(math.log2(n_heads))
        s = pow2(c) + pow2(2 * c)[0::2][: n_heads - c]
    return torch.tensor(s, dtype=torch.float32)


def alibi_bias(q: Tensor, k: Tensor, slopes: Tensor) -> Tensor:
    """-slope_h * |k - q| for query/key positions q (B, T), k (B, S) -> (B, H, T, S)."""
    dist = (k[:, None, :] - q[:, :, None]).abs().float()  # (B, T, S)
    return -slopes.to(dist.device)[None, :, None, None] * dist[:, None]


def t5_bucket(rel: Tensor, bidirectional: bool, n_buckets: int, max_distance: int) -> Tensor:
    """T5 relative-position bucket of rel = key - query: exact for small distances, log-spaced up
    to max_distance, one bucket per direction half when bidirectional."""
    ret = torch.zeros_like(rel)
    if bidirectional:
        n_buckets //= 2
        ret = ret + (rel > 0).long() * n_buckets
        n = rel.abs()
    else:
        n = (-rel).clamp(min=0)
    max_exact = n_buckets // 2
    large = max_exact + (
        torch.log(n.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact) * (n_buckets - max_exact)
    ).long()
    large = large.clamp(max=n_buckets - 1)
    return ret + torch.where(n < max_exact, n, large)


def t5_bias(q: Tensor, k: Tensor, table: Tensor, bidirectional: bool, max_distance: int) -> Tensor:
    """Learned bias table[bucket(k - q)] with table (n_buckets, H) -> (B, H, T, S)."""
    rel = k[:, None, :].long() - q[:, :, None].long()  # (B, T, S)
    bucket = t5_bucket(rel, bidirectional, table.shape[0], max_distance)
    return bucket_lookup(table, bucket)


def time_alibi_bias(q: Tensor, k: Tensor, slopes: Tensor, unit: float) -> Tensor:
    """-slope_h * log1p(|t_k - t_q| / unit) for times in seconds q (B, T), k (B, S) -> (B, H, T, S)."""
    gap = torch.log1p((k[:, None, :] - q[:, :, None]).float().abs() / unit)  # (B, T, S); difference exact in float64
    return -slopes.to(gap.device)[None, :, None, None] * gap[:, None]


def time_bucket_edges(n_buckets: int, max_gap: float, bidirectional: bool, device=None) -> tuple[Tensor, Tensor]:
    """The constants of `time_bucket`: the sorted signed bucket boundaries (2n - 1,) float64 and the
    lookup table (2n,) long from "number of boundaries below dt" to the bucket id, n = n_buckets
    (or n_buckets / 2 when bidirectional). They depend on the config only: `PositionEncoding`
    computes them once (outside any ONNX trace: `expm1` and `nextafter` have no opset-17 export)."""
    n = n_buckets // 2 if bidirectional else n_buckets
    k = torch.arange(1, n, dtype=torch.float64, device=device)
    e = torch.expm1(k * (math.log1p(max_gap) / (n - 1)))  # |dt| >= e[m-1]  <=>  magnitude >= m
    e[-1] = max_gap
    # sorted signed boundaries; c = number of boundaries < dt
    below = torch.nextafter(e, torch.zeros_like(e))  # "dt >= e" as "dt > below"
    edges = torch.cat([-e.flip(0), torch.zeros(1, dtype=torch.float64, device=device), below])
    idx = torch.arange(2 * n, device=device)
    lut = torch.where(idx < n, n - 1 - idx, idx if bidirectional else idx - n)  # c -> bucket id
    return edges, lut


def time_bucket(dt: Tensor, n_buckets: int, max_gap: float, bidirectional: bool,
                edges: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Bucket of a time gap dt = t_key - t_query (seconds): m = floor(log1p(|dt|) (n-1) / log1p(max_gap))
    clamped to [0, n-1] (so |dt| >= max_gap shares the last bucket), n = n_buckets, or n_buckets/2
    when bidirectional, where future keys (dt > 0) get n + m.

    Computed as one `searchsorted` of the signed gap against the bucket edges (exact in float64
    and several times faster than evaluating log1p on every (query, key) pair). `edges`: the
    `time_bucket_edges` of these arguments on dt's device, if already computed. While exporting
    to ONNX (no `searchsorted` there) the same count of boundaries below dt is a sum of exact
    float64 comparisons, one per boundary."""
    boundaries, lut = edges if edges is not None else time_bucket_edges(n_buckets, max_gap, bidirectional, dt.device)
    dt = dt.double().contiguous()
    if torch.onnx.is_in_onnx_export():
        c = torch.zeros(dt.shape, dtype=torch.long, device=dt.device)
        for j in range(boundaries.shape[0]):
            c = c + (dt > boundaries[j]).long()
    else:
        c = torch.searchsorted(boundaries, dt)  # (…) in [0, 2n - 1]
    return lut[c]


def time_bucket_bias(q: Tensor, k: Tensor, table: Tensor, bidirectional: bool, max_gap: float,
                     edges: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Learned bias table[time_bucket(t_k - t_q)] with table (n_buckets, H) -> (B, H, T, S)."""
    dt = k[:, None, :] - q[:, :, None]  # (B, T, S) seconds
    return bucket_lookup(table, time_bucket(dt, table.shape[0], max_gap, bidirectional, edges))


# ----------------------------------------------------------------------------- module


class PositionEncoding(nn.Module):
    """Holds the learned position parameters and computes, once per forward, what the blocks
    need: an absolute embedding to add, rotary rotations for the current events, and the summed
    additive bias (B|1, H, T, S)."""

    def __init__(self, cfg: ModelConfig, causal: bool):
        super().__init__()
        p = cfg.position
        self.cfg = p
        self.d_model = cfg.d_model
        self.head_dim = cfg.head_dim
        self.n_heads = cfg.attention.n_heads
        self.bidirectional = not causal
        self.biases = bias_schemes(p.bias)
        self.absolute = nn.Embedding(p.max_len, cfg.d_model) if p.absolute == "learned" else None
        self.t5_table = nn.Parameter(torch.zeros(p.t5_buckets, self.n_heads)) if "t5" in self.biases else None
        self.time_table = (
            nn.Parameter(torch.zeros(p.time_buckets, self.n_heads)) if "time_bucket" in self.biases else None
        )
        self.register_buffer("slopes", alibi_slopes(self.n_heads), persistent=False)
        # time_bucket constants per device (float64 whatever the module's dtype, so not buffers);
        # the CPU ones now, so that an ONNX export (CPU) finds them and never traces expm1
        self._time_edges: dict[torch.device, tuple[Tensor, Tensor]] = {}
        if self.time_table is not None:
            self.time_bucket_edges(torch.device("cpu"))

    def time_bucket_edges(self, device) -> tuple[Tensor, Tensor]:
        """`time_bucket_edges` of this config on `device` (memoised)."""
        device = torch.device(device)
        if device not in self._time_edges:
            self._time_edges[device] = time_bucket_edges(self.time_table.shape[0], self.cfg.time_max_gap,
                                                         self.bidirectional, device)
        return self._time_edges[device]

    @property
    def needs_time(self) -> bool:
        return self.cfg.rope in ("time", "both") or any(b.startswith("time_") for b in self.biases)

    def absolute_embedding(self, pos: Tensor) -> Tensor | None:
        """(B, T) positions -> (B, T, d_model) or None."""
        if self.cfg.absolute == "learned":
            # (not while exporting to ONNX: a data-dependent check cannot be traced; ONNX Runtime's
            # Gather refuses an index past the table with its own error)
            if not torch.onnx.is_in_onnx_export() and int(pos.max()) >= self.cfg.max_len:
                raise ValueError(f"position {int(pos.max())} >= position.max_len={self.cfg.max_len}")
            return self.absolute(pos)
        if self.cfg.absolute == "sinusoidal":
            return sinusoidal(pos, self.d_model)
        return None

    def rotary(self, pos: Tensor, seconds: Tensor | None) -> Tensor | None:
        """Complex rotations (B, T, 1, head_dim/2) for events at positions pos / times seconds, or None."""
        kind, n = self.cfg.rope, self.head_dim // 2
        dev = pos.device
        if kind == "none":
            return None
        if kind == "index":
            angles = pos.double()[..., None] * index_frequencies(n, self.cfg.rope_theta, dev)
        elif kind == "time":
            angles = seconds[..., None] * time_frequencies(n, self.cfg.time_min_period, self.cfg.time_max_period, dev)
        else:  # both: first half of the pairs index, second half time
            if pos.shape[0] != seconds.shape[0]:
                pos = pos.expand(seconds.shape[0], -1)
            a = pos.double()[..., None] * index_frequencies(n // 2, self.cfg.rope_theta, dev)
            b = seconds[..., None] * time_frequencies(
                n - n // 2, self.cfg.time_min_period, self.cfg.time_max_period, dev
            )
            angles = torch.cat([a, b], dim=-1)
        return rope_cis(angles)

    def bias(self, q_pos: Tensor, k_pos: Tensor, q_sec: Tensor | None, k_sec: Tensor | None) -> Tensor | None:
        """Sum of the configured additive biases, (B|1, H, T, S) float32, or None."""
        out = None
        p = self.cfg
        for name in self.biases:
            if name == "alibi":
                b = alibi_bias(q_pos, k_pos, self.slopes)
            elif name == "t5":
                b = t5_bias(q_pos, k_pos, self.t5_table, self.bidirectional, p.t5_max_distance)
            elif name == "time_alibi":
                b = time_alibi_bias(q_sec, k_sec, self.slopes, p.time_unit)
            else:
                b = time_bucket_bias(q_sec, k_sec, self.time_table, self.bidirectional, p.time_max_gap,
                                     self.time_bucket_edges(q_sec.device))
            out = b if out is None else out + b
        return out.contiguous() if out is not None else None  # once per forward, not per layer
