"""The event transformer: encoder (bidirectional, pooled user embedding) and decoder (causal,
KV cache, generation in `plm.model.generate`).

Forward pass, top to bottom:
  batch -> EventEmbedding (B, T, d) -> [CLS insertion] -> absolute positions
        -> AttnContext (masks, rotary tables, additive biases: once per forward)
        -> n_layers x Block -> final norm -> hidden (B, T, d) [-> pooling (N, d)]
The prediction heads (`model.heads`, an `EventHeads`) are applied by the caller:
`model.heads(out.hidden)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from plm.model.attention import AttnContext, KVCache
from plm.model.batch import (
    batch_shape,
    event_positions,
    previous_gap_seconds,
    relative_seconds,
    sequence_index,
    valid_mask,
)
from plm.model.config import ModelConfig
from plm.model.embedding import EventEmbedding, PeriodicValue
from plm.model.heads import EventHeads, MembershipHead, ProjectionHead
from plm.model.layers import Block, MoE, make_norm
from plm.model.positions import PositionEncoding

GAP_SCALE = 4.0  # log1p(seconds) / GAP_SCALE: 0..~4.3 for gaps up to a year

# ----------------------------------------------------------------------------- helpers


def default_numeric_fields(field_vocab_sizes: dict[str, int]) -> list[str]:
    """The schema's numeric fields that appear in field_vocab_sizes."""
    from plm.data.schema import NUMERIC_FIELDS

    return [f.name for f in NUMERIC_FIELDS if f.name in field_vocab_sizes]


def build_mask(valid: Tensor | None, seg: Tensor | None, causal: bool, T: int, device) -> Tensor | None:
    """(B, 1, T|1, T) bool attention mask (True = may attend), or None when nothing is masked
    besides plain causality. Every query may attend to itself, so padding rows never see an
    all-masked row (their outputs are finite garbage; real events never attend to padding)."""
    if seg is None and valid is None:
        return None
    if torch.onnx.is_in_onnx_export():  # ONNX Runtime has no bool EyeLike: the same diagonal
        idx = torch.arange(T, device=device)
        eye = idx[:, None] == idx[None, :]
    else:
        eye = torch.eye(T, dtype=torch.bool, device=device)
    if seg is not None:
        m = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)  # (B, T, T) block-diagonal
    elif not causal:
        m = valid[:, None, :]  # (B, 1, T): key padding only
        m = m | ~valid.any(1)[:, None, None]  # an all-padding row attends to everything (finite)
        return m[:, None]  # (B, 1, 1, T)
    else:
        m = valid[:, None, :].expand(-1, T, -1)
    if causal:
        m = m & torch.ones(T, T, dtype=torch.bool, device=device).tril()
    return (m | eye)[:, None]  # (B, 1, T, T)


@dataclass
class ModelOutput:
    """hidden: (B, T, d) final states of the batch's events (CLS tokens removed).
    pooled: (N, d) one user embedding per sequence (encoder), see `plm.model.batch`.
    aux_loss: scalar MoE load-balancing loss (0 without MoE); the trainer weights and adds it.
    valid: (B, T) bool real-event mask used (None = all real)."""

    hidden: Tensor
    pooled: Tensor | None
    aux_loss: Tensor
    valid: Tensor | None
    # (queries (N, dim), keys (n, dim)) of the membership head, when PretrainNet is asked for them
    membership: tuple[Tensor, Tensor] | None = None


# ----------------------------------------------------------------------------- model


class EventTransformer(nn.Module):
    """Shared trunk of `PLMEncoder` and `PLMDecoder`.

    cfg: ModelConfig; field_vocab_sizes: {field: vocab size} from the tokenizer (categorical
    fields and numeric bin ids); numeric_fields: fields with a `<field>_value` column (default:
    the schema's numeric fields present in field_vocab_sizes).
    """

    causal = False

    def __init__(self, cfg: ModelConfig, field_vocab_sizes: dict[str, int],
                 numeric_fields: Sequence[str] | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.field_vocab_sizes = dict(field_vocab_sizes)
        self.numeric_fields = list(default_numeric_fields(field_vocab_sizes) if numeric_fields is None
                                   else numeric_fields)
        self.embed = EventEmbedding(self.field_vocab_sizes, self.numeric_fields, cfg.d_model, cfg.embedding,
                                    cfg.norm, cfg.norm_eps, cfg.attention)
        self.positions = PositionEncoding(cfg, causal=self.causal)
        e = cfg.embedding
        if e.time_gap != "none" and self.causal:
            raise ValueError("embedding.time_gap is an encoder option (the decoder's KV-cached generation "
                             "does not carry the previous event's time); use position.rope=time|both")
        self.time_gap = PeriodicValue(cfg.d_model, e.n_frequencies, e.frequency_scale) if e.time_gap == "periodic" else None
        f = cfg.ffn
        self.blocks = nn.ModuleList(
            Block(cfg, moe=f.n_experts > 0 and i % f.moe_every == f.moe_every - 1) for i in range(cfg.n_layers)
        )
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.heads = EventHeads(self.field_vocab_sizes, self.numeric_fields, cfg.d_model, cfg.heads,
                                embedding=self.embed)
        self._init_weights()

    def _init_weights(self) -> None:
        std = self.cfg.init_std
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                resid = name.endswith(("attn.proj", "ffn.w2")) or ".experts." in name and name.endswith("w2")
                nn.init.normal_(m.weight, 0.0, std / (2 * self.cfg.n_layers) ** 0.5 if resid else std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)
                if m.padding_idx is not None:
                    with torch.no_grad():
                        m.weight[m.padding_idx].zero_()

    # -- inputs -> (x, positions, seconds, valid, segments)

    def _inputs(self, batch: dict[str, Tensor]):
        valid = valid_mask(batch)
        seg = batch.get("segment_ids")
        if seg is not None:
            seg = seg.long()
        elif valid is not None and not torch.compiler.is_compiling() and bool(valid.all()):
            valid = None  # nothing padded: take the unmasked fast path (eager only: a data-dependent
            # branch would split a compiled graph; the masked path gives the same result)
        B, T = batch_shape(batch)
        if valid is None and seg is None and "positions" not in batch:
            pos = torch.arange(T, device=batch["ts"].device if "ts" in batch else None)[None]  # (1, T)
        else:
            pos = event_positions(batch, valid)  # (B, T)
        seconds = relative_seconds(batch["ts"], valid, seg) if self.positions.needs_time else None
        x = self.embed(batch)  # (B, T, d)
        if self.time_gap is not None:
            if "ts" not in batch:
                raise ValueError("embedding.time_gap needs `ts` in the batch")
            gap = previous_gap_seconds(batch["ts"], valid, seg)
            x = x + self.time_gap((torch.log1p(gap) / GAP_SCALE).to(x.dtype))
        if valid is not None:  # padding never contributes (where, not a product: 0 x NaN is NaN)
            x = torch.where(valid[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        return x, pos, seconds, valid, seg

    def _context(self, pos: Tensor, seconds: Tensor | None, valid: Tensor | None, seg: Tensor | None,
                 T: int) -> AttnContext:
        mask = build_mask(valid, seg, self.causal, T, pos.device)
        return AttnContext(
            mask=mask,
            bias=self.positions.bias(pos, pos, seconds, seconds),
            is_causal=self.causal and mask is None,
            rope=self.positions.rotary(pos, seconds),
        )

    def _trunk(self, x: Tensor, ctx: AttnContext, valid: Tensor | None, cache: KVCache | None = None) -> Tensor:
        for i, blk in enumerate(self.blocks):
            x = blk(x, ctx, cache, i, valid)  # (B, T, d)
        return self.norm(x)

    def aux_loss(self) -> Tensor:
        losses = [b.ffn.aux_loss for b in self.blocks if isinstance(b.ffn, MoE)]
        return torch.stack(losses).sum() if losses else torch.zeros(())


class PLMEncoder(EventTransformer):
    """Bidirectional encoder: `forward(batch) -> ModelOutput` with `pooled` (N, d) user embeddings
    (pooling: cls, mean, last, attention). `heads` predict masked events; `projection` (when
    heads.projection_dim > 0) maps pooled embeddings for contrastive losses."""

    causal = False

    def __init__(self, cfg: ModelConfig, field_vocab_sizes: dict[str, int],
                 numeric_fields: Sequence[str] | None = None):
        super().__init__(cfg, field_vocab_sizes, numeric_fields)
        d = cfg.d_model
        self.cls = nn.Parameter(torch.randn(d) * cfg.init_std) if cfg.pooling == "cls" else None
        self.pool_query = nn.Linear(d, 1) if cfg.pooling == "attention" else None
        self.projection = ProjectionHead(d, cfg.heads.projection_dim) if cfg.heads.projection_dim else None
        self.membership = MembershipHead(d, cfg.heads.membership_dim, cfg.heads.membership_bank) if cfg.heads.membership_dim else None
        self._init_weights()  # again, to cover the modules added here

    def _insert_cls(self, x, pos, seconds, valid, seg):
        """Put a learned CLS vector before every sequence (position 0, time of its first event).
        Returns the new tensors plus the indexes of events and CLS tokens in the longer rows."""
        B, T, d = x.shape
        dev = x.device
        idx = torch.arange(T, device=dev).expand(B, T)
        pos = pos.expand(B, T)
        if seg is None:  # one sequence per row: prepend
            ev = idx + 1  # (B, T) new index of each event
            cls_at = torch.zeros(B, 1, dtype=torch.long, device=dev)  # (B, K=1)
            new_seg = None
            new_valid = None if valid is None else torch.cat([valid.new_ones(B, 1), valid], 1)
            n_new = T + 1
        else:  # packed: CLS before each segment; segments contiguous, padding at the end
            k = seg.max(1).values  # (B,)
            K = int(k.max())
            ev = idx + torch.where(seg > 0, seg, k[:, None])
            n_new = T + K
            start = torch.full((B, K + 1), T, dtype=torch.long, device=dev).scatter_reduce(
                1, seg, idx, reduce="amin")[:, 1:]  # (B, K) first index of segment s
            cls_at = start + torch.arange(K, device=dev)  # (B, K)
            has = torch.arange(1, K + 1, device=dev)[None] <= k[:, None]  # (B, K) segment exists
            cls_at = torch.where(has, cls_at, torch.full_like(cls_at, n_new - 1))  # park on trailing pad
            new_seg = torch.zeros(B, n_new, dtype=torch.long, device=dev).scatter(1, ev, seg)
            new_seg = new_seg.scatter(1, cls_at, torch.where(has, torch.arange(1, K + 1, device=dev)[None], 0))
            new_valid = new_seg != 0
        xn = x.new_zeros(B, n_new, d).scatter(1, ev[..., None].expand(B, T, d), x)
        xn = xn.scatter(1, cls_at[..., None].expand(-1, -1, d), self.cls.expand(B, cls_at.shape[1], d).to(x.dtype))
        pn = torch.zeros(B, n_new, dtype=torch.long, device=dev).scatter(1, ev, pos + 1)
        pn = pn.scatter(1, cls_at, torch.zeros_like(cls_at))
        sn = None
        if seconds is not None:
            sn = torch.zeros(B, n_new, dtype=seconds.dtype, device=dev).scatter(1, ev, seconds)
            sn = sn.scatter(1, cls_at, torch.zeros(cls_at.shape, dtype=seconds.dtype, device=dev))
        return xn, pn, sn, new_valid, new_seg, ev, cls_at

    def forward(self, batch: dict[str, Tensor]) -> ModelOutput:
        x, pos, seconds, valid, seg = self._inputs(batch)
        B, T, d = x.shape
        if self.cls is not None:
            x, pos, seconds, valid_n, seg, ev, cls_at = self._insert_cls(x, pos, seconds, valid, seg)
        else:
            valid_n = valid
        ab = self.positions.absolute_embedding(pos)
        if ab is not None:
            x = x + ab.to(x.dtype)
        ctx = self._context(pos, seconds, valid_n, seg, x.shape[1])
        h = self._trunk(x, ctx, valid_n)  # (B, T', d)
        if self.cls is not None:
            cls_h = h.gather(1, cls_at[..., None].expand(-1, -1, d))  # (B, K, d)
            h = h.gather(1, ev[..., None].expand(B, T, d))  # (B, T, d) events only
            if "segment_ids" in batch:
                k = batch["segment_ids"].long().max(1).values
                pooled = cls_h[torch.arange(cls_h.shape[1], device=h.device)[None] < k[:, None]]  # (N, d)
            else:
                pooled = cls_h[:, 0]
        else:
            pooled = self.pool(h, batch, valid)
        return ModelOutput(hidden=h, pooled=pooled, aux_loss=self.aux_loss(), valid=valid)

    def pool(self, h: Tensor, batch: dict[str, Tensor], valid: Tensor | None) -> Tensor:
        """(B, T, d) -> (N, d) per-sequence mean / last / attention pooling over real events."""
        B, T, d = h.shape
        if (torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()) and "segment_ids" not in batch:
            return self._pool_rows(h, valid)  # masks only: no data-dependent shapes to split a compiled graph
        seq, N = sequence_index(batch, valid)
        flat_seq = seq.reshape(-1)
        keep = flat_seq >= 0
        hs, si = h.reshape(B * T, d)[keep], flat_seq[keep]  # (n, d), (n,)
        kind = self.cfg.pooling
        if kind == "mean":
            cnt = torch.zeros(N, device=h.device, dtype=h.dtype).index_add_(0, si, torch.ones_like(si, dtype=h.dtype))
            return h.new_zeros(N, d).index_add_(0, si, hs) / cnt.clamp(min=1)[:, None]
        if kind == "last":
            flat_idx = torch.arange(B * T, device=h.device)[keep]
            last = torch.full((N,), -1, dtype=torch.long, device=h.device).scatter_reduce(0, si, flat_idx, "amax")
            return h.reshape(B * T, d)[last.clamp(min=0)]
        # attention pooling: softmax of a learned score within each sequence
        score = self.pool_query(hs)[:, 0].float()  # (n,)
        mx = torch.full((N,), float("-inf"), device=h.device).scatter_reduce(0, si, score, "amax")
        w = (score - mx[si]).exp()
        z = torch.zeros(N, device=h.device).index_add_(0, si, w)
        w = (w / z[si]).to(h.dtype)
        return h.new_zeros(N, d).index_add_(0, si, hs * w[:, None])

    def _pool_rows(self, h: Tensor, valid: Tensor | None) -> Tensor:
        """`pool` of an unpacked batch (one sequence per row) written with masks only, for ONNX
        export and torch.compile: `pool`'s flat index_add form takes the number of sequences as a Python int, which
        a trace freezes to the export example's batch size. Same pooling, other summation order."""
        B, T, d = h.shape
        m = torch.ones(B, T, dtype=torch.bool, device=h.device) if valid is None else valid
        kind = self.cfg.pooling
        if kind == "mean":
            w = m.to(h.dtype)[..., None]
            return (h * w).sum(1) / w.sum(1).clamp(min=1.0)
        if kind == "last":
            pos = torch.arange(T, device=h.device)[None].expand(B, T)
            last = torch.where(m, pos, torch.zeros_like(pos)).amax(1)  # (B,)
            return h.gather(1, last[:, None, None].expand(B, 1, d))[:, 0]
        score = self.pool_query(h)[..., 0].float().masked_fill(~m, float("-inf"))  # (B, T)
        w = torch.softmax(score, dim=1)
        w = torch.where(m, w, torch.zeros_like(w)).to(h.dtype)  # a row without events: 0, not NaN
        return (h * w[..., None]).sum(1)


class PLMDecoder(EventTransformer):
    """Causal decoder: `forward(batch, cache=None) -> ModelOutput` (pooled is None); hidden state t
    predicts event t+1 via `heads`. With a `KVCache` (from `new_cache`) the batch holds only the
    new events: their keys/values are appended and they attend to everything cached before."""

    causal = True

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype = torch.float32, device=None) -> KVCache:
        return KVCache(self.cfg.n_layers, batch_size, self.cfg.kv_heads, self.cfg.head_dim, max_len, dtype, device)

    def forward(self, batch: dict[str, Tensor], cache: KVCache | None = None) -> ModelOutput:
        if cache is None:
            x, pos, seconds, valid, seg = self._inputs(batch)
            ab = self.positions.absolute_embedding(pos)
            if ab is not None:
                x = x + ab.to(x.dtype)
            ctx = self._context(pos, seconds, valid, seg, x.shape[1])
            h = self._trunk(x, ctx, valid)
            return ModelOutput(hidden=h, pooled=None, aux_loss=self.aux_loss(), valid=valid)
        return self._forward_cached(batch, cache)

    def _forward_cached(self, batch: dict[str, Tensor], cache: KVCache) -> ModelOutput:
        if "segment_ids" in batch:
            raise ValueError("the KV cache does not support packed batches (segment_ids)")
        B, T = batch_shape(batch)
        L, S = cache.length, cache.length + T
        valid = valid_mask(batch)
        v_new = valid if valid is not None else torch.ones(B, T, dtype=torch.bool, device=cache.valid.device)
        x = self.embed(batch)
        if valid is not None:
            x = torch.where(valid[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        # positions continue from the real events already cached
        seen = cache.valid[:, :L].sum(1, keepdim=True)  # (B, 1)
        pos = (seen + v_new.long().cumsum(1) - 1).clamp(min=0)  # (B, T)
        seconds = None
        if self.positions.needs_time:
            ts = batch["ts"].long()
            if cache.ref_ts is None:
                big = torch.iinfo(torch.long).max
                ref = torch.where(v_new, ts, torch.full_like(ts, big)).min(1, keepdim=True).values
                cache.ref_ts = torch.where(ref == big, torch.zeros_like(ref), ref)
            seconds = torch.where(v_new, ts - cache.ref_ts, torch.zeros_like(ts)).double() / 1e6
            cache.seconds[:, L:S] = seconds
        cache.pos[:, L:S] = pos
        cache.valid[:, L:S] = v_new
        ab = self.positions.absolute_embedding(pos)
        if ab is not None:
            x = x + ab.to(x.dtype)
        k_valid = cache.valid[:, :S]
        if bool(k_valid.all()):
            mask = None  # plain causal (T == 1: nothing to mask)
        else:
            causal = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(L)  # query i sees keys <= L+i
            diag = torch.zeros(T, S, dtype=torch.bool, device=x.device)
            diag[torch.arange(T), L + torch.arange(T)] = True
            mask = ((k_valid[:, None, :] & causal) | diag)[:, None]  # (B, 1, T, S)
        k_sec = cache.seconds[:, :S] if seconds is not None else None
        ctx = AttnContext(
            mask=mask,
            bias=self.positions.bias(pos, cache.pos[:, :S], seconds, k_sec),
            is_causal=mask is None and T > 1,
            rope=self.positions.rotary(pos, seconds),
        )
        h = self._trunk(x, ctx, valid, cache)
        cache.length = S
        return ModelOutput(hidden=h, pooled=None, aux_loss=self.aux_loss(), valid=valid)
