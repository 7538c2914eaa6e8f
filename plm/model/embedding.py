"""Event embedding: one token vector per event from all of its fields.

Every field has its own table over its token ids (0 PAD, 1 MASK, 2 OOV, 3 MISSING, 4 N/A, fitted
values from 5). The special tokens are ordinary learned rows, so "missing", "not applicable to
this event type", "out of vocabulary" and "masked for pre-training" each have their own vector
per field; PAD is `padding_idx` (a zero vector that gets no gradient). All fields' tables live in
one fused matrix (one lookup per forward), each field in its own block of rows. Numeric fields use their
bin id, a projection of their standardised value, or both (`embedding.numeric`); a value is only
read where the bin id is a fitted value (>= 5), otherwise the special token's row is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plm.model.attention import AttnContext
from plm.model.batch import N_SPECIALS, value_key
from plm.model.config import AttentionConfig, EmbeddingConfig, FFNConfig, ModelConfig, split_names
from plm.model.layers import Block, make_norm

# ----------------------------------------------------------------------------- numeric values


class LinearValue(nn.Module):
    """value (B, T) -> value * w + b (B, T, dim)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim) * 0.02)
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, value: Tensor) -> Tensor:
        return value[..., None] * self.weight + self.bias


class PeriodicValue(nn.Module):
    """value -> Linear([sin(2 pi c v), cos(2 pi c v)]) with learned frequencies c
    (the PL embedding of Gorishniy et al., 2022, "On embeddings for numerical features")."""

    def __init__(self, dim: int, n_frequencies: int, scale: float):
        super().__init__()
        self.freq = nn.Parameter(torch.randn(n_frequencies) * scale)
        self.linear = nn.Linear(2 * n_frequencies, dim)

    def forward(self, value: Tensor) -> Tensor:
        ang = 2 * torch.pi * value[..., None] * self.freq  # (B, T, n)
        return self.linear(torch.cat([ang.sin(), ang.cos()], dim=-1))


# ----------------------------------------------------------------------------- embedding


class EventEmbedding(nn.Module):
    """Batch dict -> (B, T, d_model) event vectors.

    field_vocab_sizes: {field: vocab size incl. the 5 specials} for every categorical field and
        every numeric field's bin ids (from tokenizer.json); order fixes the concat order.
    numeric_fields: the fields of field_vocab_sizes that also have a `<field>_value` column.
    """

    def __init__(self, field_vocab_sizes: dict[str, int], numeric_fields: list[str] | tuple[str, ...],
                 d_model: int, cfg: EmbeddingConfig, norm: str = "rmsnorm", norm_eps: float = 1e-5,
                 attention: AttentionConfig | None = None):
        super().__init__()
        excluded = set(split_names(cfg.exclude_fields))
        unknown = sorted(excluded - set(field_vocab_sizes))
        if unknown:
            raise ValueError(f"embedding.exclude_fields names fields {unknown} that are not in the data "
                             f"(fields: {', '.join(field_vocab_sizes)})")
        unknown = sorted(set(numeric_fields) - set(field_vocab_sizes))
        if unknown:
            raise ValueError(f"numeric fields {unknown} are not in field_vocab_sizes")
        self.cfg = cfg
        self.fields = [f for f in field_vocab_sizes if f not in excluded]
        if not self.fields:
            raise ValueError("no field left to embed")
        self.numeric = [f for f in numeric_fields if f in self.fields]
        self.width = d_model if cfg.combine == "sum" else cfg.field_dim
        w = self.width
        uses_value = cfg.numeric != "bin"
        # One fused table for all fields (a single lookup / embedding_bag and one gradient
        # buffer instead of one per field): row 0 is the shared PAD row (padding_idx, zero, no
        # gradient); field f owns rows [offset_f, offset_f + size_f), row offset_f + id for id >= 1.
        self.sizes: dict[str, int] = {}
        self.offsets: dict[str, int] = {}
        self.values = nn.ModuleDict()
        off = 1
        for f in self.fields:
            V = field_vocab_sizes[f]
            # V == N_SPECIALS: nothing was fitted (e.g. `category` when the orders source is
            # absent); the field still tells not-applicable from missing, so it keeps its rows.
            if V < N_SPECIALS:
                raise ValueError(f"field '{f}': vocab size {V} is smaller than the {N_SPECIALS} special tokens")
            only_specials = f in self.numeric and cfg.numeric in ("linear", "periodic")
            self.sizes[f] = N_SPECIALS if only_specials else V
            self.offsets[f] = off
            off += self.sizes[f]
            if f in self.numeric and uses_value:
                if cfg.numeric == "periodic":
                    self.values[f] = PeriodicValue(w, cfg.n_frequencies, cfg.frequency_scale)
                else:
                    self.values[f] = LinearValue(w)
        self.table = nn.Embedding(off, w, padding_idx=0)
        self.register_buffer("offset_vec", torch.tensor([self.offsets[f] for f in self.fields]), persistent=False)
        self.register_buffer("limit_vec", torch.tensor(
            [N_SPECIALS if self.sizes[f] == N_SPECIALS and f in self.numeric else 2**62 for f in self.fields]),
            persistent=False)
        self.mixer = None
        if cfg.field_mixer_layers:
            # the model's attention backend and dropout, the mixer's own heads, projections without
            # bias (as in every mixer so far: checkpoints keep loading)
            att = attention or AttentionConfig()
            mcfg = ModelConfig(d_model=w, n_layers=cfg.field_mixer_layers, norm=norm, norm_eps=norm_eps,
                               attention=AttentionConfig(n_heads=cfg.field_mixer_heads, backend=att.backend,
                                                         dropout=att.dropout, bias=False),
                               ffn=FFNConfig(kind="gelu", hidden=2 * w))
            self.field_id = nn.Parameter(torch.randn(len(self.fields), w) * 0.02)
            self.mixer = nn.ModuleList(Block(mcfg) for _ in range(cfg.field_mixer_layers))
            self.mixer_norm = make_norm(norm, w, norm_eps)
        self.proj = nn.Linear(len(self.fields) * w, d_model) if cfg.combine == "concat" else None
        self.norm = make_norm(norm, d_model, norm_eps) if cfg.norm else None
        self.drop = nn.Dropout(cfg.dropout)

    def field_table(self, f: str) -> Tensor:
        """(size_f, width) rows of field f in the fused table (a view; used by tied heads)."""
        return self.table.weight[self.offsets[f] : self.offsets[f] + self.sizes[f]]

    def _rows(self, batch: dict[str, Tensor]) -> Tensor:
        """(B, T, F) rows of the fused table; PAD -> 0, and fitted numeric values whose table has
        only the specials (numeric = linear / periodic) -> 0 as well (the value encodes them)."""
        ids = torch.stack([batch[f] for f in self.fields], dim=-1).long()  # (B, T, F)
        rows = ids + self.offset_vec
        return torch.where((ids == 0) | (ids >= self.limit_vec), 0, rows)

    def _value_terms(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """{numeric field: (B, T, width) value encoding, zero where the bin id is a special}."""
        out = {}
        for f, enc in self.values.items():
            real = batch[f] >= N_SPECIALS  # a fitted bin: the value is meaningful
            val = torch.where(real, batch[value_key(f)].to(self.table.weight.dtype), torch.zeros((), device=real.device))
            out[f] = enc(val) * real[..., None]
        return out

    def field_vectors(self, batch: dict[str, Tensor]) -> list[Tensor]:
        """One (B, T, width) vector per field."""
        e = self.table(self._rows(batch))  # (B, T, F, w)
        vals = self._value_terms(batch)
        return [e[:, :, j] + vals[f] if f in vals else e[:, :, j] for j, f in enumerate(self.fields)]

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        if self.mixer is None and self.proj is None:  # sum: one embedding_bag, no (B, T, F, d) tensor
            rows = self._rows(batch)
            B, T, Fn = rows.shape
            if torch.onnx.is_in_onnx_export():  # no ONNX symbolic for embedding_bag with padding_idx;
                x = self.table(rows).sum(2)  # the same sum (row 0 is zero and never trained)
            else:
                x = F.embedding_bag(rows.view(B * T, Fn), self.table.weight, mode="sum", padding_idx=0)
                x = x.view(B, T, -1)
            for v in self._value_terms(batch).values():
                x = x + v
        else:
            vecs = self.field_vectors(batch)
            if self.mixer is not None:
                x = torch.stack(vecs, dim=2)  # (B, T, F, w)
                B, T, Fn, w = x.shape
                x = x.reshape(B * T, Fn, w) + self.field_id
                ctx = AttnContext()  # every field sees every field of its event
                for blk in self.mixer:
                    x = blk(x, ctx)
                x = self.mixer_norm(x).view(B, T, Fn, w)
                x = x.reshape(B, T, Fn * w) if self.proj is not None else x.sum(2)
            else:
                x = torch.cat(vecs, dim=-1)  # (B, T, F * w)
            if self.proj is not None:
                x = self.proj(x)  # (B, T, d)
        if self.norm is not None:
            x = self.norm(x)
        return self.drop(x)
