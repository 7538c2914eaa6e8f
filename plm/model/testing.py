"""Hand-made batches that follow the batch contract (`plm.model.batch`), for tests, benchmarks
and smoke runs without prepared data."""

from __future__ import annotations

import torch
from torch import Tensor

from plm.model.batch import MISSING, N_SPECIALS, NA, value_key

# A small made-up vocabulary (sizes include the 5 specials).
TOY_VOCAB: dict[str, int] = {"event_type": 8, "hour": 29, "dow": 12, "merchant": 40, "amount": 12, "log_dt": 12}
TOY_NUMERIC: tuple[str, ...] = ("amount", "log_dt")
T0_US = 1_700_000_000_000_000  # 2023-11-14, epoch microseconds


def random_batch(vocab: dict[str, int] = TOY_VOCAB, numeric=TOY_NUMERIC, B: int = 2, T: int = 12,
                 seed: int = 0, specials: bool = True, mean_gap_s: float = 3600.0) -> dict[str, Tensor]:
    """Random (B, T) batch: fitted ids, some MISSING/N-A specials, standardised values, and
    increasing timestamps with exponential gaps (mean `mean_gap_s` seconds)."""
    g = torch.Generator().manual_seed(seed)
    b: dict[str, Tensor] = {}
    for f, v in vocab.items():
        ids = torch.randint(N_SPECIALS, v, (B, T), generator=g)
        if specials and f not in ("event_type",):
            r = torch.rand(B, T, generator=g)
            ids = torch.where(r < 0.1, torch.full_like(ids, MISSING), ids)
            ids = torch.where((r >= 0.1) & (r < 0.2), torch.full_like(ids, NA), ids)
        b[f] = ids
    for f in numeric:
        val = torch.randn(B, T, generator=g)
        b[value_key(f)] = torch.where(b[f] >= N_SPECIALS, val, torch.zeros_like(val))
    gaps = -torch.log(torch.rand(B, T, generator=g).clamp(min=1e-9)) * mean_gap_s * 1e6
    b["ts"] = T0_US + gaps.double().cumsum(1).long()
    return b


def take(batch: dict[str, Tensor], row: int, start: int = 0, end: int | None = None) -> dict[str, Tensor]:
    """One sequence (dict of (L,) tensors) out of a batch row."""
    return {k: v[row, start:end] for k, v in batch.items()}


def stack(seqs: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Equal-length sequences -> a (B, T) batch."""
    return {k: torch.stack([s[k] for s in seqs]) for k in seqs[0]}


def pad_right(seq: dict[str, Tensor], T: int) -> dict[str, Tensor]:
    """One sequence -> a (1, T) batch with right padding and an attention_mask."""
    n = len(seq["ts"])
    out = {k: torch.cat([v, torch.zeros(T - n, dtype=v.dtype)])[None] for k, v in seq.items()}
    out["attention_mask"] = (torch.arange(T) < n)[None]
    return out
