"""The batch contract between the data/training code and the model, plus the small helpers that
turn a batch into masks, positions and times.

A batch is a `dict[str, Tensor]`, all tensors `(B, T)` (B rows, T events per row):

| key                  | dtype        | required | meaning |
| -------------------- | ------------ | -------- | ------- |
| `<field>`            | int64/int32  | yes      | token id of every field in `field_vocab_sizes` (categorical fields and the bin id of numeric fields); layout 0 PAD, 1 MASK, 2 OOV, 3 MISSING, 4 N/A, fitted values from 5 |
| `<numeric>_value`    | float32      | yes*     | standardised continuous value of each numeric field (*only read when `embedding.numeric` uses values); anything (0, NaN) where the bin id is a special (< 5) |
| `ts`                 | int64        | yes**    | event time, epoch microseconds (**only read by time-aware position schemes and by generation) |
| `attention_mask`     | bool         | no       | True = real event, False = padding. Default: `segment_ids != 0` if given, else all real. (`padding`, True = pad, is accepted instead.) |
| `segment_ids`        | int64        | no       | packed rows: 0 = padding, 1..k = which sequence of the row the event belongs to. Sequences are laid left to right in order 1..k, contiguous, padding only at the end of the row. Attention is block-diagonal: an event only sees events of its own sequence. |
| `positions`          | int64        | no       | index of the event inside its own sequence (0 at each sequence start). Default: computed from `segment_ids` / `attention_mask` (left or right padding both work). |

Rules the model relies on:
- every sequence is ordered by time (ties allowed); the decoder predicts event t+1 from events <= t;
- padding events never influence real events (masked keys; their outputs are garbage but finite);
- pooled user embeddings come back as `(N, d)`: one row per sequence, N = B for unpacked
  batches, or one row per (row, segment) in row-major, segment order for packed batches
  (see `sequence_index`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from plm.data.schema import MASK, MISSING, N_SPECIALS, NA, OOV, PAD  # noqa: F401  (re-exported)


def value_key(field: str) -> str:
    """Name of the standardised value column of a numeric field."""
    return f"{field}_value"


def batch_shape(batch: dict[str, Tensor]) -> tuple[int, int]:
    for k in ("ts", "segment_ids", "attention_mask", "padding"):
        if k in batch:
            return tuple(batch[k].shape)  # type: ignore[return-value]
    for v in batch.values():
        if isinstance(v, Tensor) and v.dim() == 2:
            return tuple(v.shape)  # type: ignore[return-value]
    raise ValueError("batch has no (B, T) tensor")


def valid_mask(batch: dict[str, Tensor]) -> Tensor | None:
    """(B, T) bool, True = real event; None when every event is real (the fast path)."""
    if "attention_mask" in batch:
        m = batch["attention_mask"].bool()
    elif "padding" in batch:
        m = ~batch["padding"].bool()
    elif "segment_ids" in batch:
        m = batch["segment_ids"] != 0
    else:
        return None
    return m


def segment_positions(segment_ids: Tensor) -> Tensor:
    """(B, T) index of each event inside its segment (padding gets 0)."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)
    n_seg = int(segment_ids.max()) + 1 if segment_ids.numel() else 1
    start = torch.full((B, n_seg), T, dtype=torch.long, device=segment_ids.device)
    start = start.scatter_reduce(1, segment_ids.long(), idx, reduce="amin")
    pos = idx - start.gather(1, segment_ids.long())
    return torch.where(segment_ids != 0, pos, torch.zeros_like(pos))


def event_positions(batch: dict[str, Tensor], valid: Tensor | None) -> Tensor:
    """(B, T) long: position of each event inside its own sequence."""
    if "positions" in batch:
        return batch["positions"].long()
    B, T = batch_shape(batch)
    device = next(v.device for v in batch.values() if isinstance(v, Tensor))
    if "segment_ids" in batch:
        return segment_positions(batch["segment_ids"])
    if valid is not None:
        return (valid.long().cumsum(1) - 1).clamp(min=0)
    return torch.arange(T, device=device).expand(B, T)


def relative_seconds(ts: Tensor, valid: Tensor | None, segment_ids: Tensor | None) -> Tensor:
    """(B, T) float64 seconds since the first real event of the event's own sequence.

    The reference is subtracted in int64 microseconds, so shifting every timestamp of a
    sequence by a constant gives bit-identical results. Padding gets 0.
    """
    ts = ts.long()
    big = torch.iinfo(torch.long).max
    if segment_ids is None and torch.onnx.is_in_onnx_export():
        rel = ts - onnx_first_time_us(ts, valid)  # the same reference, in ops ONNX Runtime gets right
    elif segment_ids is None:
        masked = ts if valid is None else torch.where(valid, ts, torch.full_like(ts, big))
        ref = masked.min(dim=1, keepdim=True).values
        ref = torch.where(ref == big, torch.zeros_like(ref), ref)
        rel = ts - ref
    else:
        masked = ts if valid is None else torch.where(valid, ts, torch.full_like(ts, big))
        seg = segment_ids.long()
        n_seg = int(seg.max()) + 1 if seg.numel() else 1
        ref = torch.full((ts.shape[0], n_seg), big, dtype=torch.long, device=ts.device)
        ref = ref.scatter_reduce(1, seg, masked, reduce="amin")
        ref = ref.gather(1, seg)
        rel = torch.where(ref == big, torch.zeros_like(ts), ts - ref)
    if valid is not None:
        rel = torch.where(valid, rel, torch.zeros_like(rel))
    return rel.double() / 1e6


def previous_gap_seconds(ts: Tensor, valid: Tensor | None, segment_ids: Tensor | None) -> Tensor:
    """(B, T) float64 seconds since the previous real event of the same sequence (0 for the first
    event of a sequence and for padding); the difference is taken in int64 microseconds."""
    ts = ts.long()
    prev = torch.cat([ts[:, :1], ts[:, :-1]], dim=1)
    same = torch.ones_like(ts, dtype=torch.bool)
    same[:, 0] = False
    if valid is not None:
        shifted = torch.cat([torch.zeros_like(valid[:, :1]), valid[:, :-1]], dim=1)
        same = same & valid & shifted
    if segment_ids is not None:
        seg = segment_ids.long()
        shifted = torch.cat([torch.zeros_like(seg[:, :1]), seg[:, :-1]], dim=1)
        same = same & (seg == shifted) & (seg != 0)
    # max(gap, 0) as a comparison and a select, not a clamp: ONNX exports an int64 clamp as Clip,
    # which ONNX Runtime's CPU kernel gets wrong (see `onnx_first_time_us`; a gap of 2**31 to
    # 2**32 µs, 36 to 72 minutes, came out 0)
    d = ts - prev
    gap = torch.where(same & (d > 0), d, torch.zeros_like(d))
    return gap.double() / 1e6


def onnx_first_time_us(ts: Tensor, valid: Tensor | None) -> Tensor:
    """(B, 1) int64: the earliest `ts` over the real events of each row (0 for a row without
    any), as `relative_seconds` computes it in eager, written for ONNX export: the minimum is
    taken in float64 (exact for |ts| < 2**53 µs, i.e. until the year 2255) with +inf on padding.

    Two export defects make the int64 form wrong in ONNX Runtime (CPU, 1.31): its int64
    Min / Max / ReduceMin / ReduceMax / Clip kernels (Eigen's SSE2 64-bit compare,
    microsoft/onnxruntime#25280) return wrong values for some inputs (e.g. Clip(x, min=0) = 0
    for every x in [2**31, 2**32)), and torch.onnx writes `torch.full_like(ts, INT64_MAX)` as
    INT64_MIN (the fill value goes through a double, 2**63 - 1 -> 2**63, which wraps), so the
    masked minimum of every padded row was INT64_MIN. Comparisons, selects, Sub and float
    reductions are exact."""
    t = ts.double()
    if valid is not None:
        t = torch.where(valid, t, torch.full_like(t, float("inf")))
    ref = t.amin(dim=1, keepdim=True)
    return torch.where(ref == float("inf"), torch.zeros_like(ref), ref).long()


def sequence_index(batch: dict[str, Tensor], valid: Tensor | None) -> tuple[Tensor, int]:
    """(B, T) long index of each event's sequence in the flat list of sequences, and N.

    Unpacked: the row index (N = B). Packed: row-major over (row, segment), N = sum of
    segments per row. Padding events get index -1.
    """
    B, T = batch_shape(batch)
    if "segment_ids" in batch:
        seg = batch["segment_ids"].long()
        n_per_row = seg.max(dim=1).values  # (B,)
        offset = torch.cumsum(n_per_row, 0) - n_per_row  # (B,)
        idx = offset[:, None] + seg - 1
        return torch.where(seg > 0, idx, torch.full_like(idx, -1)), int(n_per_row.sum())
    device = next(v.device for v in batch.values() if isinstance(v, Tensor))
    idx = torch.arange(B, device=device)[:, None].expand(B, T)
    if valid is not None:
        idx = torch.where(valid, idx, torch.full_like(idx, -1))
    return idx, B


def pack_sequences(seqs: list[dict[str, Tensor]], row_len: int) -> dict[str, Tensor]:
    """Greedy first-fit packing of single sequences (each a dict of (L,) tensors) into rows of
    `row_len` events, adding `segment_ids`, `positions` and `attention_mask`. A reference helper
    for tests and benchmarks; the training data pipeline may pack differently but must produce
    the same contract."""
    rows: list[list[dict[str, Tensor]]] = []
    room: list[int] = []
    for s in seqs:
        n = len(next(iter(s.values())))
        if n > row_len:
            raise ValueError(f"sequence of {n} events does not fit a row of {row_len}")
        for i, r in enumerate(room):
            if r >= n:
                rows[i].append(s)
                room[i] -= n
                break
        else:
            rows.append([s])
            room.append(row_len - n)
    keys = list(seqs[0].keys())
    out: dict[str, Tensor] = {}
    for k in keys:
        ref = seqs[0][k]
        out[k] = torch.zeros(len(rows), row_len, dtype=ref.dtype)
    out["segment_ids"] = torch.zeros(len(rows), row_len, dtype=torch.long)
    out["positions"] = torch.zeros(len(rows), row_len, dtype=torch.long)
    for i, row in enumerate(rows):
        j = 0
        for sid, s in enumerate(row, start=1):
            n = len(next(iter(s.values())))
            for k in keys:
                out[k][i, j : j + n] = s[k]
            out["segment_ids"][i, j : j + n] = sid
            out["positions"][i, j : j + n] = torch.arange(n)
            j += n
    out["attention_mask"] = out["segment_ids"] != 0
    return out
