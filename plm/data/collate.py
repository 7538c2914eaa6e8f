"""Token-budget batching of event sequences, and the fast collate into the model's batch contract.

Two steps, kept apart so that batch boundaries can be computed from sequence *lengths alone*
(which the streaming dataset uses to count batches, fast-forward on resume and equalise batch
counts across DDP ranks without reading any event):

1. **plan** (`plan_packed`, `plan_bucketed`): lengths -> a list of `BatchPlan`, each saying which
   sequences go into the batch and where (row, column) each one starts.
2. **gather** (`gather_batch`): a `ColumnBlock` (the Arrow list columns of a block of windows as
   flat numpy values + offsets) and a plan -> a dict of tensors. Every column is filled with one
   vectorised fancy-index assignment per batch; there is no Python loop over events.

Batch modes (the token budget `max_tokens` counts *padded* slots, B x T, so it bounds memory):

- **packed**: rows of `row_len` (= `max_len`) events; each row holds several sequences laid left
  to right (greedy first-fit in arrival order), padding only at the row end; at most
  `max_tokens // row_len` rows per batch, so B x T <= max_tokens. Adds `segment_ids` (0 = padding,
  1..k) and `positions` (restart at 0 at each sequence); attention must be block-diagonal.
- **bucketed**: one sequence per row; the sequences are sorted by length and cut greedily so that
  B x max(length) <= max_tokens (and B <= max_batch_size if set); T = the longest in the batch,
  right padding. `positions` is included as well (0..len-1, 0 on padding).

Output of `gather_batch` (the contract of `plm/model/batch.py` plus per-sequence metadata):

| key | shape | dtype | meaning |
|---|---|---|---|
| every categorical field, every numeric field's bin id | (B, T) | int32 | token ids, PAD (0) on padding |
| `<numeric>_value` | (B, T) | float32 | standardised value, 0 on padding |
| `ts` | (B, T) | int64 | epoch microseconds, 0 on padding |
| `attention_mask` | (B, T) | bool | True = real event |
| `positions` | (B, T) | int64 | index of the event inside its sequence |
| `segment_ids` | (B, T) | int64 | packed only: 0 = padding, 1..k within the row |
| `lengths` | (N,) | int64 | events of each sequence |
| `window_index`, `event_offset` | (N,) | int64 | source window and index of the sequence's first event in it |
| `user_id` | list of N str | | the user of each sequence |

N sequences are ordered like `plm.model.batch.sequence_index`: row-major, then segment order
(for bucketed batches N = B and sequence i is row i).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from plm.data.config import BATCH_MODES  # noqa: E402,F401
from plm.data.schema import CATEGORICAL_FIELDS, NUMERIC_FIELDS, value_column

# List columns of a shard, in output order, with the numpy dtype of their values.
ID_COLUMNS: tuple[str, ...] = tuple(f.name for f in CATEGORICAL_FIELDS) + tuple(f.name for f in NUMERIC_FIELDS)
VALUE_COLUMNS: tuple[str, ...] = tuple(value_column(f.name) for f in NUMERIC_FIELDS)
LIST_COLUMNS: tuple[str, ...] = ("ts",) + ID_COLUMNS + VALUE_COLUMNS
SCALAR_COLUMNS: tuple[str, ...] = ("user_id", "window_index", "n_events")
COLUMN_DTYPES: dict[str, np.dtype] = {
    "ts": np.dtype(np.int64),
    **{c: np.dtype(np.int32) for c in ID_COLUMNS},
    **{c: np.dtype(np.float32) for c in VALUE_COLUMNS},
}
PER_SEQUENCE_KEYS = ("lengths", "window_index", "event_offset", "user_id")


# ------------------------------------------------------------------------------------ planning


@dataclass
class BatchPlan:
    """Where each sequence of one batch goes.

    `samples[j]` is the index (into the caller's sample arrays) of the j-th sequence of the batch,
    in output order (row-major, then left to right); it starts at `row[j]`, column `col[j]` and
    is segment `seg[j]` (1..k) of its row. The batch is `n_rows` x `width` slots.
    """

    samples: np.ndarray  # int64 (N,)
    row: np.ndarray  # int64 (N,)
    col: np.ndarray  # int64 (N,)
    seg: np.ndarray  # int64 (N,)
    n_rows: int
    width: int
    packed: bool

    @property
    def n_sequences(self) -> int:
        return int(len(self.samples))


def _finish_packed(idx: list[int], rows: list[int], cols: list[int], n_rows: int, row_len: int) -> BatchPlan:
    samples = np.asarray(idx, dtype=np.int64)
    row = np.asarray(rows, dtype=np.int64)
    col = np.asarray(cols, dtype=np.int64)
    order = np.lexsort((col, row))  # row-major, then left to right = segment order
    samples, row, col = samples[order], row[order], col[order]
    # segment number inside the row: 1 + rank of the sequence among its row's sequences
    first_of_row = np.r_[True, row[1:] != row[:-1]] if len(row) else np.zeros(0, bool)
    starts = np.flatnonzero(first_of_row)
    seg = np.arange(len(row), dtype=np.int64) - np.repeat(starts, np.diff(np.r_[starts, len(row)])) + 1
    return BatchPlan(samples, row, col, seg, n_rows, row_len, True)


def plan_packed(lengths: np.ndarray, row_len: int, max_tokens: int) -> list[BatchPlan]:
    """Greedy first-fit packing of sequences (in the given order) into rows of `row_len` events,
    at most `max_tokens // row_len` rows per batch. A sequence that fits no open row opens a new
    row; when the batch has no room for a new row it is closed and the sequence starts the next
    batch. Every sequence must satisfy 1 <= length <= row_len."""
    max_rows = max_tokens // row_len
    if max_rows < 1:
        raise ValueError(f"max_tokens={max_tokens} is smaller than one packed row of max_len={row_len} events")
    lens = np.asarray(lengths, dtype=np.int64)
    if len(lens) and (lens.min() < 1 or lens.max() > row_len):
        raise ValueError(f"packed sequences need 1 <= length <= {row_len}; got {lens.min()}..{lens.max()}")
    plans: list[BatchPlan] = []
    room: list[int] = []  # free slots per open row of the current batch
    idx: list[int] = []
    rows: list[int] = []
    cols: list[int] = []
    best = 0  # max(room), to skip the scan when nothing fits
    for i, n in enumerate(lens.tolist()):
        r = -1
        if n <= best:
            for j, free in enumerate(room):
                if free >= n:
                    r = j
                    break
        if r < 0:
            if len(room) == max_rows:
                plans.append(_finish_packed(idx, rows, cols, len(room), row_len))
                room, idx, rows, cols = [], [], [], []
            r = len(room)
            room.append(row_len)
        free = room[r]
        idx.append(i)
        rows.append(r)
        cols.append(row_len - free)
        room[r] = free - n
        best = max(room)
    if idx:
        plans.append(_finish_packed(idx, rows, cols, len(room), row_len))
    return plans


def plan_bucketed(
    lengths: np.ndarray,
    max_tokens: int,
    max_batch_size: int = 0,
    rng: np.random.Generator | None = None,
) -> list[BatchPlan]:
    """Sort sequences by length (stable: ties keep the given order) and cut greedily into batches
    of B rows padded to the batch's longest sequence T with B x T <= max_tokens (and B <=
    max_batch_size when > 0). With `rng`, the batch order is shuffled (the batches themselves
    do not change); without, batches come shortest first."""
    lens = np.asarray(lengths, dtype=np.int64)
    if len(lens) and lens.min() < 1:
        raise ValueError("bucketed sequences need length >= 1")
    if len(lens) and lens.max() > max_tokens:
        raise ValueError(f"a sequence of {lens.max()} events exceeds max_tokens={max_tokens}")
    order = np.argsort(lens, kind="stable")
    sorted_lens = lens[order].tolist()
    cap = max_batch_size if max_batch_size > 0 else len(lens) + 1
    bounds = []
    i = 0
    n = len(sorted_lens)
    while i < n:
        j = i + 1
        # sorted ascending: the batch's width is its last (longest) sequence
        while j < n and j - i < cap and (j - i + 1) * sorted_lens[j] <= max_tokens:
            j += 1
        bounds.append((i, j))
        i = j
    plans = []
    for i, j in bounds:
        k = j - i
        plans.append(
            BatchPlan(
                samples=order[i:j].astype(np.int64),
                row=np.arange(k, dtype=np.int64),
                col=np.zeros(k, dtype=np.int64),
                seg=np.ones(k, dtype=np.int64),
                n_rows=k,
                width=int(sorted_lens[j - 1]),
                packed=False,
            )
        )
    if rng is not None and len(plans) > 1:
        plans = [plans[p] for p in rng.permutation(len(plans))]
    return plans


def plan_batches(
    lengths: np.ndarray,
    mode: str,
    max_len: int,
    max_tokens: int,
    max_batch_size: int = 0,
    rng: np.random.Generator | None = None,
) -> list[BatchPlan]:
    """`plan_packed` (rows of `max_len`) or `plan_bucketed`, by `mode`."""
    if mode == "packed":
        return plan_packed(lengths, max_len, max_tokens)
    if mode == "bucketed":
        return plan_bucketed(lengths, max_tokens, max_batch_size, rng)
    raise ValueError(f"batch mode {mode!r} is not one of {BATCH_MODES}")


# ------------------------------------------------------------------------------------- columns


@dataclass
class ColumnBlock:
    """A block of windows as flat numpy arrays: `values[col]` holds every event of every window
    of the block back to back, window i is `values[col][offsets[i]:offsets[i + 1]]` (the same
    offsets for every list column, checked). Scalars per window: `user_id` (Arrow array),
    `window_index`, `n_events`."""

    offsets: np.ndarray  # int64 (R + 1,)
    values: dict[str, np.ndarray]
    user_id: pa.Array
    window_index: np.ndarray  # int32 (R,)
    n_events: np.ndarray  # int32 (R,)

    @property
    def n_rows(self) -> int:
        return len(self.n_events)

    @classmethod
    def from_table(cls, table: pa.Table | pa.RecordBatch, source: str = "") -> ColumnBlock:
        """Convert the list columns with Arrow's offsets/values (zero-copy where possible)."""
        where = f" in {source}" if source else ""
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        missing = [c for c in LIST_COLUMNS + SCALAR_COLUMNS if c not in table.column_names]
        if missing:
            raise ValueError(f"shard columns missing{where}: {missing}")
        n_events = table.column("n_events").to_numpy().astype(np.int32, copy=False)
        offsets = None
        values: dict[str, np.ndarray] = {}
        for c in LIST_COLUMNS:
            arr = table.column(c).combine_chunks()
            if isinstance(arr, pa.ChunkedArray):  # empty table
                arr = pa.array([], type=arr.type)
            if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
                raise ValueError(f"column {c!r}{where} has type {arr.type}; expected a list")
            off = arr.offsets.to_numpy().astype(np.int64)
            off = off - off[0]
            flat = arr.flatten()
            if flat.null_count:
                flat = flat.fill_null(0)
            v = flat.to_numpy(zero_copy_only=False)
            want = COLUMN_DTYPES[c]
            if v.dtype != want:
                v = v.astype(want)
            if offsets is None:
                offsets = off
                if not np.array_equal(np.diff(off), n_events):
                    raise ValueError(f"column 'ts'{where}: list lengths differ from n_events")
            elif not np.array_equal(off, offsets):
                raise ValueError(f"column {c!r}{where}: list lengths differ from 'ts' (every list must have n_events items)")
            values[c] = v
        assert offsets is not None
        return cls(
            offsets=offsets,
            values=values,
            user_id=table.column("user_id").combine_chunks(),
            window_index=table.column("window_index").to_numpy().astype(np.int32, copy=False),
            n_events=n_events,
        )

    @classmethod
    def concat(cls, blocks: list[ColumnBlock]) -> ColumnBlock:
        if len(blocks) == 1:
            return blocks[0]
        sizes = [b.offsets[-1] for b in blocks]
        shift = np.cumsum([0] + sizes[:-1])
        offsets = np.concatenate([blocks[0].offsets[:1]] + [b.offsets[1:] + s for b, s in zip(blocks, shift)])
        return cls(
            offsets=offsets,
            values={c: np.concatenate([b.values[c] for b in blocks]) for c in blocks[0].values},
            user_id=pa.concat_arrays([b.user_id for b in blocks]),
            window_index=np.concatenate([b.window_index for b in blocks]),
            n_events=np.concatenate([b.n_events for b in blocks]),
        )


# -------------------------------------------------------------------------------------- gather


def gather_batch(
    block: ColumnBlock,
    plan: BatchPlan,
    sample_row: np.ndarray | None,
    sample_start: np.ndarray,
    sample_len: np.ndarray,
) -> dict:
    """Build one batch: sequence `s = plan.samples[j]` is events `sample_start[s] ..
    sample_start[s] + sample_len[s]` of window `sample_row[s]` of `block` (window `s` when
    `sample_row` is None), written at (`plan.row[j]`, `plan.col[j]`)."""
    s = plan.samples
    rows = s.astype(np.int64) if sample_row is None else np.asarray(sample_row)[s].astype(np.int64)
    starts = np.asarray(sample_start)[s].astype(np.int64)
    lens = np.asarray(sample_len)[s].astype(np.int64)
    B, T = plan.n_rows, plan.width
    total = int(lens.sum())
    first = np.cumsum(lens) - lens  # first event of each sequence in the flat list of events
    within = np.arange(total, dtype=np.int64) - np.repeat(first, lens)
    src = np.repeat(block.offsets[rows] + starts, lens) + within
    dst = np.repeat(plan.row * T + plan.col, lens) + within

    # One buffer per dtype, every key a view of it: a batch crosses from a DataLoader worker to
    # the main process as 4 shared-memory segments instead of ~30.
    N, BT = len(s), B * T
    n_long = (3 if plan.packed else 2) * BT + 3 * N  # ts, positions, [segment_ids], 3 x (N,)
    i32 = np.zeros((len(ID_COLUMNS), BT), dtype=np.int32)
    f32 = np.zeros((len(VALUE_COLUMNS), BT), dtype=np.float32)
    i64 = np.zeros(n_long, dtype=np.int64)
    mask = np.zeros(BT, dtype=bool)
    t_i32, t_f32, t_i64 = torch.from_numpy(i32), torch.from_numpy(f32), torch.from_numpy(i64)
    out: dict = {}
    for j, c in enumerate(ID_COLUMNS):
        i32[j, dst] = block.values[c][src]
        out[c] = t_i32[j].view(B, T)
    for j, c in enumerate(VALUE_COLUMNS):
        f32[j, dst] = block.values[c][src]
        out[c] = t_f32[j].view(B, T)
    i64[dst] = block.values["ts"][src]
    out["ts"] = t_i64[:BT].view(B, T)
    i64[BT + dst] = within
    out["positions"] = t_i64[BT : 2 * BT].view(B, T)
    o = 2 * BT
    if plan.packed:
        i64[o + dst] = np.repeat(plan.seg, lens)
        out["segment_ids"] = t_i64[o : o + BT].view(B, T)
        o += BT
    mask[dst] = True
    out["attention_mask"] = torch.from_numpy(mask).view(B, T)
    i64[o : o + N] = lens
    i64[o + N : o + 2 * N] = block.window_index[rows]
    i64[o + 2 * N : o + 3 * N] = starts
    out["lengths"] = t_i64[o : o + N]
    out["window_index"] = t_i64[o + N : o + 2 * N]
    out["event_offset"] = t_i64[o + 2 * N : o + 3 * N]
    out["user_id"] = block.user_id.take(pa.array(rows)).to_pylist()
    return out


def collate_windows(
    table: pa.Table,
    max_len: int,
    mode: str = "bucketed",
    max_tokens: int | None = None,
) -> list[dict]:
    """Convenience for small tables (tests, notebooks, export of a few users): the most recent
    `max_len` events of every row of `table` (shard schema), batched by `mode` with the token
    budget `max_tokens` (default: everything in one batch where possible), in table order for
    packing and by length for bucketing."""
    block = ColumnBlock.from_table(table)
    n = block.n_events.astype(np.int64)
    keep = np.flatnonzero(n > 0)
    lens = np.minimum(n[keep], max_len)
    starts = n[keep] - lens
    budget = max_tokens or max_len * max(1, len(lens))
    plans = plan_batches(lens, mode, max_len, budget)
    return [gather_batch(block, p, keep, starts, lens) for p in plans]
