"""Multi-head / grouped-query / multi-query self-attention with interchangeable backends.

Reads top to bottom: the per-forward attention context (masks, bias, rotary tables computed
once at model level), the KV cache, the backends (eager reference, SDPA, FlexAttention,
xformers), and the `Attention` module.

Shapes: B batch, T query events, S key events (S = T without cache), H query heads,
Hkv key/value heads (H % Hkv == 0), D head dim. Query head h reads key/value head
h // (H // Hkv) (the `repeat_interleave` convention of torch's `enable_gqa`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plm.model.config import AttentionConfig
from plm.model.positions import apply_rope

BACKENDS = ("sdpa", "eager", "flex", "xformers")

# ----------------------------------------------------------------------------- context


@dataclass
class AttnContext:
    """Everything position/mask related, computed once per forward and shared by all blocks.

    mask: (B, 1, T|1, S) bool, True = may attend; None = no masking beyond `is_causal`.
    bias: (B|1, H, T, S) float additive bias (positions/time), or None.
    is_causal: causal masking of a square T == S problem without an explicit mask.
    rope: complex rotations (B|1, T, 1, D/2) for the current events (see positions.apply_rope), or None.
    """

    mask: Tensor | None = None
    bias: Tensor | None = None
    is_causal: bool = False
    rope: Tensor | None = None
    _memo: dict = field(default_factory=dict, repr=False)

    def dense_mask(self, T: int, S: int, device) -> Tensor | None:
        """The bool mask including causality, (B|1, 1, T|1, S), or None if nothing is masked."""
        if self.mask is not None or not self.is_causal:
            return self.mask
        if "causal" not in self._memo:
            self._memo["causal"] = torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)[None, None]
        return self._memo["causal"]

    def sdpa_mask(self) -> Tensor | None:
        """Mask for torch SDPA: bool mask alone, or float bias with -inf where masked (memoised)."""
        if "sdpa" not in self._memo:
            if self.bias is None:
                m = self.mask
            else:
                m = self.bias
                dm = self.mask
                if dm is None and self.is_causal:
                    T, S = m.shape[-2:]
                    dm = self.dense_mask(T, S, m.device)
                if dm is not None:
                    m = torch.where(dm, m, float("-inf"))  # broadcasts (1, H, ..) bias over a (B, ..) mask
            self._memo["sdpa"] = m
        return self._memo["sdpa"]


# ----------------------------------------------------------------------------- KV cache


class KVCache:
    """Pre-allocated keys/values of every layer, (n_layers, B, Hkv, max_len, D) each, plus the
    per-event state the position schemes need (positions, relative seconds, validity).
    Memory: 2 * n_layers * B * n_kv_heads * max_len * D elements (scales with n_kv_heads)."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device=None):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.seconds = torch.zeros(batch, max_len, dtype=torch.float64, device=device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.ref_ts: Tensor | None = None  # (B, 1) int64 µs, first real event of each row
        self.max_len = max_len
        self.length = 0  # events stored (same for every row; padding is marked invalid)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, Hkv, T, D) after the stored events; return all keys/values (B, Hkv, S, D)."""
        T = k.shape[2]
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} events > max_len={self.max_len}")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


# ----------------------------------------------------------------------------- backends


def eager_attention(q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext, dropout_p: float = 0.0,
                    training: bool = False) -> Tensor:
    """Reference: softmax(q k^T / sqrt(D) + bias, masked) v. q (B,H,T,D), k/v (B,Hkv,S,D) -> (B,H,T,D)."""
    H, Hkv = q.shape[1], k.shape[1]
    if H != Hkv:
        k = k.repeat_interleave(H // Hkv, dim=1)  # (B, H, S, D)
        v = v.repeat_interleave(H // Hkv, dim=1)
    T, S = q.shape[2], k.shape[2]
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, T, S)
    if ctx.bias is not None:
        att = att + ctx.bias
    mask = ctx.dense_mask(T, S, q.device)
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    att = torch.softmax(att.float(), dim=-1).to(q.dtype)
    if dropout_p > 0 and training:
        att = F.dropout(att, p=dropout_p)
    return att @ v  # (B, H, T, D)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext, dropout_p: float = 0.0,
                   training: bool = False) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient / math kernels)."""
    H, Hkv = int(q.shape[1]), int(k.shape[1])  # python ints also under ONNX tracing (head counts are fixed)
    mask = ctx.sdpa_mask()
    is_causal = ctx.is_causal and mask is None
    if is_causal and q.shape[2] != k.shape[2]:
        mask = ctx.dense_mask(q.shape[2], k.shape[2], q.device)
        is_causal = False
    if H != Hkv and q.shape[2] == 1:
        # decode step: fold the query group into the query axis so each key/value head is read once
        B, _, _, D = q.shape
        g = H // Hkv
        qg = q.view(B, Hkv, g, D)  # (B, Hkv, g, D): g "queries" per kv head
        if mask is not None:
            mask = mask.view(mask.shape[0], Hkv, g, -1) if mask.shape[1] == H else mask
        y = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, dropout_p=dropout_p if training else 0.0)
        return y.view(B, H, 1, D)
    if H != Hkv and torch.onnx.is_in_onnx_export():
        # the exporter has no SDPA with enable_gqa: give every query head its key/value head
        # (h // (H // Hkv), as enable_gqa reads them); the same attention, on repeated k/v
        B, _, S, D = k.shape
        k = k[:, :, None].expand(B, Hkv, H // Hkv, S, D).reshape(B, H, S, D)
        v = v[:, :, None].expand(B, Hkv, H // Hkv, S, D).reshape(B, H, S, D)
        Hkv = H
    if mask is not None and torch.onnx.is_in_onnx_export():
        # ONNX Runtime's fused Attention (opset 23) wants the mask's query axis at full length; it
        # does not broadcast a (B, 1, 1, S) padding mask over the queries as SDPA does
        mask = mask.expand(*mask.shape[:-2], q.shape[2], mask.shape[-1])
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p if training else 0.0, is_causal=is_causal,
        enable_gqa=H != Hkv,
    )


def flex_attention(q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext, dropout_p: float = 0.0,
                   training: bool = False) -> Tensor:
    """torch FlexAttention with the bias as a score_mod and the mask as a block mask."""
    if dropout_p > 0 and training:
        raise ValueError("attention.backend=flex does not support attention dropout; set attention.dropout=0")
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError(
            "attention.backend=flex runs forward-only on CPU (FlexAttention has no CPU backward): "
            "use it under torch.no_grad() / inference, on a GPU, or choose attention.backend=sdpa"
        )
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as _flex

    B, H, T, D = q.shape
    S = k.shape[2]
    if "flex" not in ctx._memo:
        dm = ctx.dense_mask(T, S, q.device)
        block_mask = None
        if dm is not None:
            dmx = dm.expand(B, 1, T, S)

            def mask_mod(b, h, qi, ki):
                return dmx[b, 0, qi, ki]

            block_mask = create_block_mask(mask_mod, B, None, T, S, device=q.device.type)
        score_mod = None
        if ctx.bias is not None:
            bias = ctx.bias.expand(B, H, T, S)

            def score_mod(score, b, h, qi, ki):
                return score + bias[b, h, qi, ki]

        ctx._memo["flex"] = (score_mod, block_mask)
    score_mod, block_mask = ctx._memo["flex"]
    return _flex(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=H != k.shape[1])


def _import_xformers():
    try:
        import xformers.ops as xops  # noqa: PLC0415
    except ImportError as e:
        raise ImportError(
            "attention.backend=xformers needs the optional xformers package (pip install 'plm[gpu]') "
            "and a CUDA GPU; use attention.backend=sdpa on CPU"
        ) from e
    return xops


def xformers_attention(q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext, dropout_p: float = 0.0,
                       training: bool = False) -> Tensor:
    """xformers memory_efficient_attention (CUDA only; no CPU kernels)."""
    if q.device.type != "cuda":
        raise RuntimeError("attention.backend=xformers has no CPU kernels: it needs CUDA tensors; use sdpa")
    xops = _import_xformers()
    H, Hkv = q.shape[1], k.shape[1]
    if H != Hkv:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    T, S = q.shape[2], k.shape[2]
    bias = ctx.sdpa_mask()
    if bias is None and ctx.is_causal:
        bias = xops.LowerTriangularMask()
    elif bias is not None:
        if bias.dtype == torch.bool:
            bias = torch.zeros(bias.shape, dtype=q.dtype, device=q.device).masked_fill(~bias, float("-inf"))
        bias = bias.to(q.dtype).expand(q.shape[0], H, T, S)
    y = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias,
        p=dropout_p if training else 0.0,
    )  # (B, T, H, D)
    return y.transpose(1, 2)


ATTENTION_FUNCTIONS = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
    "flex": flex_attention,
    "xformers": xformers_attention,
}


# ----------------------------------------------------------------------------- module


class Attention(nn.Module):
    """Self-attention with n_kv_heads in {n_heads (MHA), divisors (GQA), 1 (MQA)} and one fused
    q/k/v projection of width (H + 2*Hkv) * D."""

    def __init__(self, d_model: int, cfg: AttentionConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        if d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"bad heads: d_model={d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}")
        if cfg.backend not in BACKENDS:
            raise ValueError(f"unknown attention backend '{cfg.backend}'; choose one of {BACKENDS}")
        if cfg.backend == "xformers":
            _import_xformers()
        self.head_dim = d_model // self.n_heads
        self.backend = cfg.backend
        self.dropout = cfg.dropout
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        self.qkv = nn.Linear(d_model, (H + 2 * Hkv) * D, bias=cfg.bias)
        self.proj = nn.Linear(H * D, d_model, bias=cfg.bias)

    def forward(self, x: Tensor, ctx: AttnContext, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        # split (not slicing): its backward is one concatenation instead of zero-fills and copies
        qk, v = self.qkv(x).split([(H + Hkv) * D, Hkv * D], dim=-1)
        qk, v = qk.view(B, T, H + Hkv, D), v.view(B, T, Hkv, D)
        if ctx.rope is not None:
            qk = apply_rope(qk, ctx.rope)  # queries and keys rotated in one operation
        q, k = qk.split([H, Hkv], dim=2)
        q = q.transpose(1, 2)  # (B, H, T, D)
        k = k.transpose(1, 2)  # (B, Hkv, T, D)
        v = v.transpose(1, 2)  # (B, Hkv, T, D)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, S, D)
        # flex / xformers do not export to ONNX; SDPA computes the same attention
        backend = "sdpa" if torch.onnx.is_in_onnx_export() else self.backend
        y = ATTENTION_FUNCTIONS[backend](q, k, v, ctx, self.dropout, self.training)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return self.proj(y)
