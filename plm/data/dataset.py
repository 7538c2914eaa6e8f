"""Streaming dataset over the prepared Parquet shards of a split (see `docs/data-loading.md`).

`PLMStream` is an `IterableDataset` that yields *batches* (dicts in the model's batch contract,
built by `plm.data.collate`), already sized by a token budget. Everything it does is a
deterministic function of `(seed, epoch, rank, world_size, num_workers)` and the shards:

**Static index** (`SplitIndex`, read once): the shard files, their row groups, and two int32
columns of every window (`n_events`, `window_index`), a few bytes per window. From them every
sample length and every batch boundary can be computed *without reading any event*, which is
what makes batch counting (`__len__`), equal batch counts for DDP and the fast-forward of an
exact resume cheap.

**Eligible windows.** Training: every window with at least one event. Evaluation/predict: the
window with `window_index == 0` of every user (its most recent events), so one sample per user.

**Sharding rule (no duplicate, no loss).** Read units are `(shard, row group)` pairs. Per epoch
the unit order is shuffled with `(seed, epoch)` (training only) and the eligible windows are
concatenated in that order into one list of M windows. With C = world_size x num_workers
consumers, consumer `c = rank * num_workers + worker` takes the contiguous slice
`[c*M//C, (c+1)*M//C)` of that list. The slices partition the list, so every eligible window
goes to exactly one consumer per epoch, and consumers differ by at most one window. When units
are fewer than consumers this simply splits a unit at row level (each consumer reads only its
rows of the row group; a consumer whose slice starts inside a row group decodes and discards the
rows before it). Windows are balanced, batches are not (packing depends on lengths): see
`even_batches`.

**Shuffling (training).** Unit order per epoch, then a block shuffle: a consumer's slice is cut
into blocks of `shuffle_buffer` windows (the first block has a random size in
[shuffle_buffer/2, shuffle_buffer] so block boundaries move every epoch), each block is permuted
with a generator seeded by `(seed, epoch, consumer, consumers, block)` and batched on its own.
Memory is bounded by one block of windows (plus one Arrow record batch of `read_rows` rows).

**Samples.** Training (`subwindow`): `random` = a contiguous slice of min(n, max_len) events at a
uniformly random start; `tail` = the last min(n, max_len) events; `random_length` = a random
length in [min(min_len, n'), n'] with n' = min(n, max_len), at a random start. The random draws
are a counter-based hash of `(seed, epoch, window)`, so a window's sub-window does not depend on
which rank/worker reads it. Evaluation/predict: the last min(n, max_len) events of window 0.

**Batches.** Per block, `plan_packed` (rows of max_len events, greedy first-fit, at most
max_tokens // max_len rows) or `plan_bucketed` (sorted by length, B x T <= max_tokens, batch order
shuffled in training). The last batch of a block may be smaller than the budget.

**Even batches (DDP).** `even_batches="off"`: every consumer yields its natural number of batches
(no duplicate, no loss; ranks may differ by a few batches, which can hang DDP). `"drop"`: every
consumer yields exactly T = min over all consumers of the natural count; the extra batches at
the end of a consumer's stream are dropped for this epoch (they differ every epoch).
`"pad"`: T = max; consumers with fewer batches repeat their own batches from the start
(flagged `batch["repeat"] = True`). Both make every rank yield num_workers x T batches.
Computing T plans all consumers' batches from the index: a Python pass over the split's lengths
per epoch in every process (measured: ~2.3 us/window packed, ~0.5 us/window bucketed, i.e. ~2 s
per million windows).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from torch.utils.data import IterableDataset, get_worker_info

from plm.data.collate import (
    BATCH_MODES,
    LIST_COLUMNS,
    SCALAR_COLUMNS,
    BatchPlan,
    ColumnBlock,
    gather_batch,
    plan_batches,
)

MODES = ("train", "eval", "predict")
from plm.data.config import EVEN_BATCHES, SUBWINDOWS  # noqa: E402,F401

READ_COLUMNS = SCALAR_COLUMNS + LIST_COLUMNS


# ---------------------------------------------------------------------------------- filesystem


def resolve_fs(path: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or any URI pyarrow understands (s3://, ...)."""
    if filesystem is not None:
        return filesystem, path
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def join(base: str, rel: str) -> str:
    return rel if rel.startswith("/") or "://" in rel else f"{base.rstrip('/')}/{rel}"


# ------------------------------------------------------------------------------------- index


@dataclass(frozen=True)
class ShardFile:
    path: str
    rows: int
    row_groups: tuple[int, ...]  # rows of each row group


class SplitIndex:
    """Files, row groups and the per-window `n_events` / `window_index` of one or more splits.

    Global window id (`gid`) = position in the concatenation of all files' rows, in the given
    file order. `open` reads each file's footer and the two int32 columns (checking the shard
    columns exist and that the manifest's row counts match)."""

    def __init__(
        self,
        files: list[ShardFile],
        n_events: np.ndarray,
        window_index: np.ndarray,
        filesystem: pafs.FileSystem,
    ):
        self.files = files
        self.n_events = np.asarray(n_events, dtype=np.int32)
        self.window_index = np.asarray(window_index, dtype=np.int32)
        self.filesystem = filesystem
        self.file_offsets = np.cumsum([0] + [f.rows for f in files]).astype(np.int64)
        units = []  # (file, row group, first gid, end gid)
        for fi, f in enumerate(files):
            start = int(self.file_offsets[fi])
            for rg, n in enumerate(f.row_groups):
                if n:
                    units.append((fi, rg, start, start + n))
                start += n
        self.units = units
        self.unit_starts = np.array([u[2] for u in units] + [len(self.n_events)], dtype=np.int64)

    @property
    def n_windows(self) -> int:
        return len(self.n_events)

    @classmethod
    def open(
        cls,
        shards: list[tuple[str, int | None]],
        filesystem: pafs.FileSystem | None = None,
    ) -> SplitIndex:
        """`shards`: (path, rows expected or None) per file, in order."""
        fs = filesystem
        files, n_events, window_index = [], [], []
        for path, expected in shards:
            fs, p = resolve_fs(path, filesystem)  # each URI resolved on its own
            try:
                pf = pq.ParquetFile(fs.open_input_file(p))
            except FileNotFoundError as e:
                raise FileNotFoundError(f"shard {path} listed in the manifest does not exist") from e
            except (OSError, pa.ArrowInvalid) as e:
                raise ValueError(f"shard {path} is not a readable Parquet file: {e}") from e
            names = set(pf.schema_arrow.names)
            missing = [c for c in READ_COLUMNS if c not in names]
            if missing:
                raise ValueError(f"shard {path} lacks the shard columns {missing} (see docs/data-contracts.md)")
            md = pf.metadata
            rows = md.num_rows
            if expected is not None and int(expected) != rows:
                raise ValueError(f"shard {path} has {rows} rows but manifest.json says {expected}")
            rgs = tuple(md.row_group(i).num_rows for i in range(md.num_row_groups))
            t = pf.read(columns=["n_events", "window_index"], use_threads=False)
            n_events.append(t.column("n_events").to_numpy().astype(np.int32))
            window_index.append(t.column("window_index").to_numpy().astype(np.int32))
            files.append(ShardFile(p, rows, rgs))
        if fs is None:
            fs = pafs.LocalFileSystem()
        cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int32))  # noqa: E731
        return cls(files, cat(n_events), cat(window_index), fs)


# ------------------------------------------------------------------------------------ random


def _splitmix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def hash_uniform(seed: int, epoch: int, stream: int, ids: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) draws keyed by (seed, epoch, stream, id), independent of iteration order."""
    key = _splitmix(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    key = _splitmix(key ^ np.uint64(epoch & 0xFFFFFFFFFFFFFFFF))
    key = _splitmix(key ^ np.uint64(stream))
    z = _splitmix(np.asarray(ids, dtype=np.uint64) ^ key)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


_UNITS, _PHASE, _BLOCK = 1, 2, 3  # what a generator is for (first word of its key)


def _rng(what: int, seed: int, epoch: int, consumer: int = 0, n_consumers: int = 0, block: int = 0) -> np.random.Generator:
    """A generator keyed by a fixed-length tuple (distinct keys give independent streams)."""
    key = [what, seed, epoch, consumer, n_consumers, block]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


# ------------------------------------------------------------------------------------ stream


@dataclass
class _Block:
    lo: int  # positions [lo, hi) in the consumer's window list
    hi: int
    start: np.ndarray  # per window of the block: first event of the sample in the window
    length: np.ndarray  # per window: events of the sample
    plans: list[BatchPlan]


class PLMStream(IterableDataset):
    """Token-budget batches streamed from the shards of `index` (see the module docstring).

    Iterating it directly (e.g. in a plain `DataLoader(stream, batch_size=None, num_workers=W)`)
    yields the batches of this process's consumer(s) for `self.epoch`; `PLMDataLoader` adds the
    exact resume, a deterministic worker interleave and the batch count. `iter_consumer` runs one
    consumer explicitly (for tests and tools that simulate ranks and workers).
    """

    def __init__(
        self,
        index: SplitIndex,
        *,
        mode: str = "train",
        max_len: int = 512,
        batch_mode: str = "packed",
        max_tokens: int = 16384,
        max_batch_size: int = 0,
        shuffle: bool | None = None,
        shuffle_buffer: int = 4096,
        seed: int = 0,
        subwindow: str = "random",
        min_len: int = 1,
        even_batches: str = "off",
        rank: int | None = None,
        world_size: int | None = None,
        read_rows: int = 1024,
        name: str = "",
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        if batch_mode not in BATCH_MODES:
            raise ValueError(f"batch_mode {batch_mode!r} is not one of {BATCH_MODES}")
        if subwindow not in SUBWINDOWS:
            raise ValueError(f"subwindow {subwindow!r} is not one of {SUBWINDOWS}")
        if even_batches not in EVEN_BATCHES:
            raise ValueError(f"even_batches {even_batches!r} is not one of {EVEN_BATCHES}")
        if max_len < 1:
            raise ValueError(f"max_len={max_len} must be >= 1")
        if max_tokens < max_len:
            raise ValueError(f"max_tokens={max_tokens} must be >= max_len={max_len} (one sequence per batch at least)")
        if shuffle_buffer < 1 or read_rows < 1:
            raise ValueError("shuffle_buffer and read_rows must be >= 1")
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0")
        if not 1 <= min_len <= max_len:
            raise ValueError(f"min_len={min_len} must be in [1, max_len={max_len}]")
        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank and world_size, or neither (then torch.distributed decides)")
        if world_size is not None and not 0 <= rank < world_size:  # type: ignore[operator]
            raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
        self.index = index
        self.mode = mode
        self.max_len = max_len
        self.batch_mode = batch_mode
        self.max_tokens = max_tokens
        self.max_batch_size = max_batch_size
        self.shuffle = (mode == "train") if shuffle is None else bool(shuffle)
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.subwindow = subwindow
        self.min_len = min_len
        self.even_batches = even_batches
        self.rank = rank
        self.world_size = world_size
        self.read_rows = read_rows
        self.name = name
        self.epoch = 0
        n = index.n_events
        if mode == "train":
            eligible = n > 0
        else:
            eligible = (index.window_index == 0) & (n > 0)
        self.eligible = eligible
        # eligible gids in natural order, and where each unit's eligible gids start in it
        self._elig = np.flatnonzero(eligible).astype(np.int64)
        self._unit_elig = np.searchsorted(self._elig, index.unit_starts).astype(np.int64)
        self._cache: dict = {}

    # ------------------------------------------------------------------ layout and bookkeeping
    @property
    def n_samples(self) -> int:
        """Eligible windows per epoch (= samples over all consumers, before even_batches)."""
        return len(self._elig)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resolve_distributed(self) -> tuple[int, int]:
        """(rank, world_size): as passed, else from torch.distributed once initialised (then
        kept), else (0, 1) for now. `PLMDataLoader` resolves it in the main process and hands the
        values to its workers."""
        if self.rank is None or self.world_size is None:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            else:
                return 0, 1
        return self.rank, self.world_size

    def even_mode(self) -> str:
        if self.even_batches == "auto":
            _, world = self.resolve_distributed()
            return "drop" if world > 1 and self.mode == "train" else "off"
        return self.even_batches

    def fingerprint(self) -> dict:
        """What must match for a saved position to mean the same batches."""
        return {
            "n_windows": int(self.index.n_windows),
            "files": [f.path.rsplit("/", 1)[-1] for f in self.index.files],
            "mode": self.mode,
            "max_len": self.max_len,
            "batch_mode": self.batch_mode,
            "max_tokens": self.max_tokens,
            "max_batch_size": self.max_batch_size,
            "shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer,
            "seed": self.seed,
            "subwindow": self.subwindow,
            "min_len": self.min_len,
            "even_batches": self.even_batches,
        }

    # ------------------------------------------------------------------------------- planning
    def epoch_order(self, epoch: int) -> np.ndarray:
        """Eligible gids in this epoch's stream order (units shuffled in training)."""
        key = ("order", epoch)
        if key not in self._cache:
            # a new epoch: forget plans and counts of epochs other than its neighbours
            self._cache = {k: v for k, v in self._cache.items() if k[0] != "order" and abs(k[1] - epoch) <= 1}
            n_units = len(self.index.units)
            if self.shuffle and n_units > 1:
                perm = _rng(_UNITS, self.seed, epoch).permutation(n_units)
                ue = self._unit_elig
                parts = [self._elig[ue[u] : ue[u + 1]] for u in perm]
                order = np.concatenate(parts) if parts else self._elig
            else:
                order = self._elig
            self._cache[key] = order
        return self._cache[key]

    def consumer_rows(self, epoch: int, consumer: int, n_consumers: int) -> np.ndarray:
        """The gids consumer `consumer` of `n_consumers` reads in `epoch` (the partition rule)."""
        if not 0 <= consumer < n_consumers:
            raise ValueError(f"consumer {consumer} is not in [0, {n_consumers})")
        order = self.epoch_order(epoch)
        m = len(order)
        return order[consumer * m // n_consumers : (consumer + 1) * m // n_consumers]

    def sample_spans(self, epoch: int, gids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start, length) of the sample drawn from each window `gids` in `epoch`."""
        n = self.index.n_events[gids].astype(np.int64)
        cap = np.minimum(n, self.max_len)
        if self.mode != "train" or self.subwindow == "tail":
            return n - cap, cap
        if self.subwindow == "random_length":
            lo = np.minimum(self.min_len, cap)
            length = lo + np.floor(hash_uniform(self.seed, epoch, 2, gids) * (cap - lo + 1)).astype(np.int64)
            length = np.minimum(length, cap)
        else:
            length = cap
        start = np.floor(hash_uniform(self.seed, epoch, 1, gids) * (n - length + 1)).astype(np.int64)
        return np.minimum(start, n - length), length

    def _plan_blocks(self, epoch: int, consumer: int, n_consumers: int) -> tuple[np.ndarray, list[_Block]]:
        key = ("blocks", epoch, consumer, n_consumers)
        if key in self._cache:
            return self._cache[key]
        rows = self.consumer_rows(epoch, consumer, n_consumers)
        m, S = len(rows), self.shuffle_buffer
        if self.shuffle and m > S:
            first = int(_rng(_PHASE, self.seed, epoch, consumer, n_consumers).integers((S + 1) // 2, S + 1))
        else:
            first = S
        bounds = [0] + list(range(first, m, S)) + [m] if m else [0]
        bounds = sorted(set(bounds))
        starts, lengths = self.sample_spans(epoch, rows)
        blocks = []
        for b, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            st, ln = starts[lo:hi], lengths[lo:hi]
            rng = _rng(_BLOCK, self.seed, epoch, consumer, n_consumers, b) if self.shuffle else None
            perm = rng.permutation(hi - lo) if rng is not None else np.arange(hi - lo)
            plans = plan_batches(ln[perm], self.batch_mode, self.max_len, self.max_tokens, self.max_batch_size, rng)
            for p in plans:
                p.samples = perm[p.samples]
            blocks.append(_Block(lo, hi, st, ln, plans))
        out = (rows, blocks)
        # keep the plans of the last few consumers asked for (a worker only needs its own)
        old = [k for k in self._cache if k[0] == "blocks"]
        for k in old[:-3]:
            del self._cache[k]
        self._cache[key] = out
        return out

    def natural_count(self, epoch: int, consumer: int, n_consumers: int) -> int:
        """Batches consumer `consumer` yields in `epoch` before even_batches."""
        key = ("count", epoch, consumer, n_consumers)
        if key not in self._cache:
            _, blocks = self._plan_blocks(epoch, consumer, n_consumers)
            self._cache[key] = sum(len(b.plans) for b in blocks)
        return self._cache[key]

    def target_count(self, epoch: int, n_consumers: int) -> int | None:
        """Batches per consumer under even_batches drop/pad (None when off)."""
        mode = self.even_mode()
        if mode == "off":
            return None
        key = ("target", epoch, n_consumers, mode)
        if key not in self._cache:
            counts = [self.natural_count(epoch, c, n_consumers) for c in range(n_consumers)]
            if mode == "drop":
                target = min(counts)
                if target == 0 and max(counts):
                    raise ValueError(
                        f"even_batches='drop': a consumer has no windows ({self.n_samples} samples for "
                        f"{n_consumers} rank x worker consumers), so every consumer would drop all of its "
                        "batches; use fewer workers or ranks"
                    )
            else:
                target = max(counts)
                if target and min(counts) == 0:
                    raise ValueError(
                        f"even_batches='pad': a consumer has no windows ({self.n_samples} samples for "
                        f"{n_consumers} rank x worker consumers); use fewer workers or ranks"
                    )
            self._cache[key] = target
        return self._cache[key]

    def batch_counts(self, epoch: int, num_workers: int) -> list[int]:
        """Batches each worker of this rank yields in `epoch` (after even_batches)."""
        rank, world = self.resolve_distributed()
        W = max(1, num_workers)
        C = world * W
        target = self.target_count(epoch, C)
        if target is not None:
            return [target] * W
        return [self.natural_count(epoch, rank * W + w, C) for w in range(W)]

    # ------------------------------------------------------------------------------- iterating
    def iter_consumer(self, epoch: int, consumer: int, n_consumers: int, skip: int = 0) -> Iterator[dict]:
        """Batches of one consumer in `epoch`, from its `skip`-th on (fast-forward: skipped
        blocks are not read; only the block holding batch `skip` is decoded)."""
        target = self.target_count(epoch, n_consumers)
        natural = self.natural_count(epoch, consumer, n_consumers)
        total = natural if target is None else target
        i = skip
        while i < total:
            before = i
            if i < natural:
                for b in self._natural(epoch, consumer, n_consumers, i, min(total, natural)):
                    b["repeat"] = False
                    yield b
                    i += 1
            else:  # even_batches="pad": repeat this consumer's batches from the start
                j = (i - natural) % natural
                for b in self._natural(epoch, consumer, n_consumers, j, min(natural, j + total - i)):
                    b["repeat"] = True
                    yield b
                    i += 1
            if i == before:
                raise RuntimeError(f"{self.name or 'stream'}: consumer {consumer} produced no batch at {i}")

    def _natural(self, epoch: int, consumer: int, n_consumers: int, skip: int, stop: int) -> Iterator[dict]:
        rows, blocks = self._plan_blocks(epoch, consumer, n_consumers)
        reader = _RowReader(self.index, rows, self.eligible, self.read_rows)
        i = 0
        for blk in blocks:
            nb = len(blk.plans)
            if i >= stop:
                return
            if i + nb <= skip:
                reader.skip(blk.hi - blk.lo)
                i += nb
                continue
            data = reader.read(blk.hi - blk.lo)
            expect = self.index.n_events[rows[blk.lo : blk.hi]]
            if not np.array_equal(data.n_events, expect):
                raise RuntimeError(f"{self.name or 'stream'}: shard rows changed since the index was read")
            for p in blk.plans:
                if skip <= i < stop:
                    yield gather_batch(data, p, None, blk.start, blk.length)
                i += 1
                if i >= stop:
                    return

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def __iter__(self) -> Iterator[dict]:
        rank, world = self.resolve_distributed()
        w, W = self._worker()
        return self.iter_consumer(self.epoch, rank * W + w, world * W)


class _RowReader:
    """Reads the windows `gids` (one consumer's list, in stream order) block by block.

    The list is a sequence of runs; each run lies in one (file, row group) and its gids ascend,
    and every eligible window between a run's first and last gid belongs to the run. A run is
    streamed with `ParquetFile.iter_batches` (record batches of `read_rows` rows); rows before
    the run's next wanted gid are decoded and discarded (Parquet has no row-level seek), and a run
    skipped entirely is never opened."""

    def __init__(self, index: SplitIndex, gids: np.ndarray, eligible: np.ndarray, read_rows: int):
        self.index = index
        self.gids = gids
        self.eligible = eligible
        self.read_rows = read_rows
        unit_of = np.searchsorted(index.unit_starts, gids, side="right") - 1
        if len(gids):
            cut = np.flatnonzero((unit_of[1:] != unit_of[:-1]) | (gids[1:] <= gids[:-1])) + 1
            self.run_bounds = np.r_[0, cut, len(gids)].astype(np.int64)
        else:
            self.run_bounds = np.zeros(1, np.int64)
        self.run_unit = unit_of[self.run_bounds[:-1]] if len(gids) else np.zeros(0, np.int64)
        self.pos = 0  # next position in gids
        self._run = -1
        self._iter = None
        self._next_gid = 0  # gid of the first row of `_pending` (or of the iterator's next batch)
        self._pending: pa.RecordBatch | None = None
        self._pf_path: str | None = None
        self._pf: pq.ParquetFile | None = None

    def skip(self, n: int) -> None:
        self.pos += n

    def _open_run(self, r: int) -> None:
        fi, rg, start, _ = self.index.units[int(self.run_unit[r])]
        f = self.index.files[fi]
        if self._pf_path != f.path:
            self._pf = pq.ParquetFile(self.index.filesystem.open_input_file(f.path))
            self._pf_path = f.path
        self._iter = self._pf.iter_batches(  # type: ignore[union-attr]
            batch_size=self.read_rows, row_groups=[rg], columns=list(READ_COLUMNS), use_threads=False
        )
        self._run = r
        self._next_gid = start
        self._pending = None

    def read(self, n: int) -> ColumnBlock:
        pieces: list[ColumnBlock] = []
        end = self.pos + n
        while self.pos < end:
            r = int(np.searchsorted(self.run_bounds, self.pos, side="right") - 1)
            run_end = int(self.run_bounds[r + 1])
            take_to = min(end, run_end)
            want_lo, want_hi = int(self.gids[self.pos]), int(self.gids[take_to - 1])
            if r != self._run or want_lo < self._next_gid:
                self._open_run(r)
            while True:
                if self._pending is None:
                    try:
                        self._pending = next(self._iter)  # type: ignore[arg-type]
                    except StopIteration as e:
                        raise RuntimeError(f"{self._pf_path}: fewer rows than the index says") from e
                rb = self._pending
                first = self._next_gid
                last = first + rb.num_rows - 1
                if last < want_lo:  # entirely before what we want: discard
                    self._pending, self._next_gid = None, last + 1
                    continue
                lo = max(want_lo, first)
                hi = min(want_hi, last)
                g = np.arange(lo, hi + 1)
                sel = g[self.eligible[g]] - first
                if len(sel):
                    contiguous = sel[-1] - sel[0] + 1 == len(sel)
                    part = rb.slice(int(sel[0]), len(sel)) if contiguous else rb.take(pa.array(sel))
                    pieces.append(ColumnBlock.from_table(part, self._pf_path or ""))
                    self.pos += len(sel)
                if hi < last:  # keep the rest of this record batch for the next read
                    self._pending = rb.slice(hi + 1 - first)
                    self._next_gid = hi + 1
                else:
                    self._pending, self._next_gid = None, last + 1
                if hi >= want_hi:
                    break
            if self.pos != take_to:
                raise RuntimeError("reader out of step with the window list")
        if not pieces:
            raise RuntimeError("empty read")
        return ColumnBlock.concat(pieces)
