"""The Lightning side of the data pipeline: `DataConfig`, `PLMDataModule`, the resumable
`PLMDataLoader` and the `LoaderTimer` behind the data-wait figure (see `docs/data-loading.md`).

Example::

    dm = PLMDataModule("runs/demo/pipeline/prepared", max_len=256, batch_mode="packed", max_tokens=8192,
                       num_workers=2, seed=0)
    model = PLM(cfg, field_vocab_sizes=dm.vocab_sizes)
    trainer.fit(model, datamodule=dm)      # resumes exactly from a mid-epoch checkpoint
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, fields, replace
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pyarrow.fs as pafs
import torch
from torch.utils.data import DataLoader, IterableDataset

from plm.data.config import DataConfig  # noqa: F401  (re-exported: plm.data.datamodule.DataConfig)
from plm.data.dataset import PLMStream, SplitIndex, join, resolve_fs
from plm.data.schema import NUMERIC_FIELDS, SHARD_FORMAT_VERSION
from plm.data.tokenizer import Tokenizer

STATE_VERSION = 1


# ------------------------------------------------------------------------------------- config


# ------------------------------------------------------------------------------- data-wait timer


class LoaderTimer:
    """Data-wait accounting of a loader's iterator.

    Per batch, `wait` is the time spent inside `next()` (waiting for data) and `step` the time
    from the previous batch's hand-over to this one's (the training step plus the wait). The
    data-wait fraction of step time is `wait_s / step_s`: ~0 means the loader keeps up, 0.3
    means 30% of wall time is spent waiting for batches. The first batch of each iterator
    (worker start-up, resume fast-forward) is kept apart in `startup_s`. `summary(reset=True)`
    returns the figures since the last reset (what a logging callback calls every N steps).
    """

    def __init__(self) -> None:
        self.reset()
        self.startup_s = 0.0
        self.total_batches = 0

    def reset(self) -> None:
        self.wait_s = 0.0
        self.step_s = 0.0
        self.batches = 0
        self.max_wait_s = 0.0

    def _start_iter(self) -> None:
        self._last: float | None = None

    def _record(self, t_request: float, t_ready: float) -> None:
        wait = t_ready - t_request
        self.total_batches += 1
        if getattr(self, "_last", None) is None:
            self.startup_s += wait
        else:
            self.wait_s += wait
            self.step_s += t_ready - self._last  # type: ignore[operator]
            self.batches += 1
            self.max_wait_s = max(self.max_wait_s, wait)
        self._last = t_ready

    @property
    def fraction(self) -> float:
        """Data-wait share of step time since the last reset (0 when nothing measured)."""
        return self.wait_s / self.step_s if self.step_s > 0 else 0.0

    def summary(self, reset: bool = False) -> dict[str, float]:
        out = {
            "data_wait_fraction": self.fraction,
            "data_wait_s": self.wait_s,
            "step_s": self.step_s,
            "batches": float(self.batches),
            "max_wait_s": self.max_wait_s,
            "startup_s": self.startup_s,
        }
        if reset:
            self.reset()
        return out


class DataWaitCallback(pl.Callback):
    """Logs `data/wait_fraction` (and mean wait in ms) of the training loader every
    `every_n_steps` steps, from the `LoaderTimer` of `PLMDataModule.timer`."""

    def __init__(self, timer: LoaderTimer, every_n_steps: int = 50):
        self.timer = timer
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % self.every_n_steps == 0 and self.timer.batches:
            s = self.timer.summary(reset=True)
            pl_module.log("data/wait_fraction", s["data_wait_fraction"], on_step=True)
            pl_module.log("data/wait_ms", 1000 * s["data_wait_s"] / max(s["batches"], 1), on_step=True)


# ------------------------------------------------------------------------------------- loader


@contextlib.contextmanager
def loader_warnings_off() -> Iterator[None]:
    """Silence Lightning's three warnings about `PLMDataLoader` that do not apply to it: its
    `__len__` *is* exact with several workers (each worker takes its own slice, see
    `PLMDataLoader`); it shards by rank itself, so there is no sampler to infer batch
    indices from; and an epoch shorter than `log_every_n_steps` (a small world) does not stop
    the logging, which counts steps across epochs (tests/integration/test_train.py)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*IterableDataset.*has `__len__` defined.*")
        warnings.filterwarnings("ignore", message=".*infer the batch indices.*")
        warnings.filterwarnings("ignore", message=r".*number of training batches .* is smaller than the logging interval.*")
        yield


def interleave(counts: list[int]) -> list[tuple[int, int]]:
    """The canonical order of a rank's batches: (worker, index) round-robin over workers, a
    worker that has no batch left is skipped (what torch's DataLoader does, made explicit)."""
    out = []
    for i in range(max(counts, default=0)):
        out.extend((w, i) for w, n in enumerate(counts) if i < n)
    return out


def consumed_per_worker(counts: list[int], k: int) -> list[int]:
    """How many batches of each worker the first `k` batches of `interleave(counts)` hold."""
    done = [0] * len(counts)
    for w, _ in interleave(counts)[:k]:
        done[w] += 1
    return done


class _WorkerView(IterableDataset):
    """What the torch DataLoader iterates: the stream's consumer for this worker, from its resume
    point, tagged (worker, index) so the main process can restore the canonical order."""

    def __init__(self, stream: PLMStream, epoch: int, skips: list[int], rank: int, world: int):
        super().__init__()
        self.stream, self.epoch, self.skips, self.rank, self.world = stream, epoch, skips, rank, world

    def __iter__(self):
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        w, W = (0, 1) if info is None else (info.id, info.num_workers)
        skip = self.skips[w]
        for i, batch in enumerate(self.stream.iter_consumer(self.epoch, self.rank * W + w, self.world * W, skip)):
            yield w, skip + i, batch


class PLMDataLoader:
    """Iterable of batches of a `PLMStream` with exact resume (Lightning's `_Stateful` protocol).

    Not a `torch.utils.data.DataLoader` subclass on purpose: Lightning leaves other iterables
    alone (no sampler injection or re-instantiation). It builds a torch DataLoader per iterator
    (`batch_size=None`, `num_workers` workers, no persistent workers: each iterator forks
    workers that carry the current epoch and resume point) and puts the workers' batches back
    into the canonical order `interleave(counts)`, so the sequence of batches depends only on
    (seed, epoch, rank, world_size, num_workers), not on worker timing.

    Position: `epoch` and `batches` (handed out in this epoch). A new iterator continues from
    the position (an abandoned iterator is continued, not restarted); handing out the last batch
    of an epoch moves to (epoch + 1, 0). `state_dict()` is that position plus a fingerprint;
    `load_state_dict()` restores it, and the next iterator fast-forwards: each worker skips its
    consumed batches by planning from the index (no event decoded for skipped blocks; the block
    holding the resume point is read and its first batches discarded). `__len__` is this
    epoch's batch count on this rank, so Lightning does not prefetch and the count of batches
    handed out equals the count trained on. With `resumable=False` (evaluation) every iterator
    starts at the beginning of `epoch` and the position never moves.
    """

    def __init__(
        self,
        stream: PLMStream,
        num_workers: int = 0,
        *,
        resumable: bool = True,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        timer: LoaderTimer | None = None,
        multiprocessing_context: Any = None,
    ):
        self.dataset = stream
        self.num_workers = int(num_workers)
        self.resumable = resumable
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.timer = timer if timer is not None else LoaderTimer()
        self.multiprocessing_context = multiprocessing_context
        self.epoch = 0
        self.batches = 0

    # ------------------------------------------------------------------------------- position
    def set_epoch(self, epoch: int) -> None:
        """Jump to the start of `epoch`."""
        self.epoch, self.batches = int(epoch), 0

    def counts(self, epoch: int | None = None) -> list[int]:
        """Batches each worker of this rank yields in `epoch` (default: the current one)."""
        return self.dataset.batch_counts(self.epoch if epoch is None else epoch, self.num_workers)

    def __len__(self) -> int:
        return sum(self.counts())

    def state_dict(self) -> dict:
        rank, world = self.dataset.resolve_distributed()
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "batches": self.batches,
            "num_workers": self.num_workers,
            "world_size": world,
            "fingerprint": self.dataset.fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by `state_dict` (by any rank: under DDP every rank has handed
        out the same number of batches, so rank 0's state is every rank's)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}")
        _, world = self.dataset.resolve_distributed()
        problems = []
        if state["num_workers"] != self.num_workers:
            problems.append(f"num_workers {state['num_workers']} -> {self.num_workers}")
        if state["world_size"] != world:
            problems.append(f"world_size {state['world_size']} -> {world}")
        fp = self.dataset.fingerprint()
        for k, v in state["fingerprint"].items():
            if fp.get(k) != v:
                problems.append(f"{k} {v!r} -> {fp.get(k)!r}")
        if problems:
            raise ValueError(
                "cannot resume the data stream exactly, the layout changed since the checkpoint: "
                + "; ".join(problems)
                + ". Use the same data and DataConfig, or start a fresh epoch with set_epoch()."
            )
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])

    # ------------------------------------------------------------------------------ iterating
    def __iter__(self) -> Iterator[dict]:
        if not self.resumable:
            return _LoaderIter(self, self.epoch, 0)
        return _LoaderIter(self, self.epoch, self.batches)

    def _advance(self, epoch: int, handed_out: int, total: int) -> None:
        if not self.resumable or epoch != self.epoch:
            return
        if handed_out >= total:
            self.epoch, self.batches = epoch + 1, 0
        else:
            self.batches = handed_out


class _LoaderIter:
    def __init__(self, loader: PLMDataLoader, epoch: int, start: int):
        self.loader = loader
        self.epoch = epoch
        stream = loader.dataset
        rank, world = stream.resolve_distributed()  # in the main process, before workers fork
        counts = loader.counts(epoch)
        self.total = sum(counts)
        if start > self.total:
            raise ValueError(f"resume point {start} is past the {self.total} batches of epoch {epoch}")
        self.order = interleave(counts)
        self.pos = start
        skips = consumed_per_worker(counts, start)
        view = _WorkerView(stream, epoch, skips, rank, world)
        W = loader.num_workers
        if start < self.total:
            dl = DataLoader(
                view,
                batch_size=None,
                num_workers=W,
                pin_memory=loader.pin_memory,
                prefetch_factor=loader.prefetch_factor if W > 0 else None,
                multiprocessing_context=loader.multiprocessing_context if W > 0 else None,
                # its own generator: a DataLoader without one draws its workers' base seed from the
                # global torch RNG when an iterator starts, so a resumed run (whose iterators start
                # elsewhere) would draw dropout masks other than the uninterrupted run's
                generator=torch.Generator().manual_seed(int(stream.seed) * 1_000_003 + int(epoch)),
            )
            self._it = iter(dl)
        else:
            self._it = iter(())
        self._pending: dict[tuple[int, int], dict] = {}
        loader.timer._start_iter()

    def __iter__(self) -> _LoaderIter:
        return self

    def __next__(self) -> dict:
        t0 = time.perf_counter()
        if self.pos >= self.total:
            self._it = iter(())  # release the workers
            raise StopIteration
        key = self.order[self.pos]
        while key not in self._pending:
            try:
                w, i, batch = next(self._it)
            except StopIteration:
                raise RuntimeError(
                    f"data workers ended after {self.pos} of {self.total} batches (expected {key})"
                ) from None
            self._pending[(w, i)] = batch
        batch = self._pending.pop(key)
        self.pos += 1
        self.loader._advance(self.epoch, self.pos, self.total)
        if self.pos >= self.total:
            self._it = iter(())
        self.loader.timer._record(t0, time.perf_counter())
        return batch


# --------------------------------------------------------------------------------- datamodule


def spread_sample(batches, block: int, n_batches: int | None = None, n_users: int | None = None,
                  keep: int = 16) -> list[dict]:
    """Batches of the first block of an eval or predict stream spread over every history length.

    Those streams bucket each block of `block` users shortest first, so their first batches hold
    only the shortest histories: a check or a metric on them says nothing of long ones. One pass
    over the block keeps batches evenly spaced through it (a stride that doubles as more than
    2 x `keep` are held) and always its last, longest batch. `n_batches`: at most that many of
    them, evenly spaced, first and last included. `n_users`: each kept batch cut to its first
    rows, an equal share of about `n_users` (rows of a bucketed batch are independent users)."""
    keep = max(keep, n_batches or 0)
    kept: list[tuple[int, dict]] = []
    stride, seen, prev, last = 1, 0, -1, None
    for i, batch in enumerate(batches):
        longest = int(batch["lengths"].max())
        if longest < prev or seen >= block:  # the next block (shortest first again)
            break
        prev, last = longest, (i, batch)
        seen += len(batch["user_id"])
        if i % stride == 0:
            kept.append((i, batch))
            if len(kept) > 2 * keep:
                stride *= 2
                kept = [(j, b) for j, b in kept if j % stride == 0]
    if last is not None and (not kept or kept[-1][0] != last[0]):
        kept.append(last)
    out = [b for _, b in kept]
    if n_batches and len(out) > n_batches:
        picks = np.unique(np.round(np.linspace(0, len(out) - 1, max(1, n_batches))).astype(int))
        out = [out[i] for i in picks]
    if n_users:
        share = max(1, -(-n_users // max(1, len(out))))
        out = [first_rows(b, share) for b in out]
    return out


def first_rows(batch: dict, n: int) -> dict:
    """The first `n` sequences of a bucketed (one sequence per row) batch: every per-sequence
    tensor and list cut."""
    B = len(batch["user_id"])
    if n >= B:
        return batch
    return {k: (v[:n] if (isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == B)
                or (isinstance(v, list) and len(v) == B) else v) for k, v in batch.items()}


def _read_bytes(fs: pafs.FileSystem, path: str, what: str) -> bytes:
    try:
        with fs.open_input_stream(path) as fh:
            return fh.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: {what}") from None


def _read_json(fs: pafs.FileSystem, path: str, what: str) -> dict:
    return json.loads(_read_bytes(fs, path, what).decode())


def read_tokenizer_json(path: str, manifest: dict) -> bytes:
    """The bytes of a prepared folder's tokenizer.json (where its manifest says it is)."""
    fs, root = resolve_fs(path)
    rel = (manifest.get("tokenizer") or {}).get("path", "tokenizer.json")
    return _read_bytes(fs, join(root, rel), "the tokenizer written by plm-prep is missing")


def read_manifest(path: str) -> dict:
    """manifest.json of a prepared folder, checked (exists, format_version, splits)."""
    fs, root = resolve_fs(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"prepared data folder {path} does not exist (DataConfig.path)")
    m = _read_json(
        fs, join(root, "manifest.json"), "DataConfig.path must be a folder written by plm-prep (manifest.json is missing)"
    )
    v = m.get("format_version")
    if v != SHARD_FORMAT_VERSION:
        raise ValueError(
            f"{join(root, 'manifest.json')}: format_version {v!r} is not supported (this PLM reads "
            f"{SHARD_FORMAT_VERSION!r}); re-run plm-prep with this version"
        )
    if not isinstance(m.get("splits"), dict):
        raise ValueError(f"{join(root, 'manifest.json')} has no 'splits' section")
    return m


class PLMDataModule(pl.LightningDataModule):
    """Prepared shards -> train/val/test/predict loaders (see `DataConfig` for every knob).

    `PLMDataModule(path, **DataConfig fields)` or `PLMDataModule(config=DataConfig(...))`. The
    manifest and tokenizer are read at construction, so `vocab_sizes` (embedding table size per
    field) and `numeric_fields` are available before the model is built.

    Loaders: train = random sub-windows, shuffled, resumable (`PLMDataLoader`); val/test = one
    sample per user (the most recent events of window 0), fixed order, rank-sharded; predict =
    the same over `predict_splits`, each user exactly once per rank layout (ranks take
    disjoint contiguous slices), in a deterministic order; batches carry `user_id`.
    """

    def __init__(self, path: str | None = None, *, config: DataConfig | None = None, **overrides: Any):
        super().__init__()
        cfg = config if config is not None else DataConfig()
        known = {f.name for f in fields(DataConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown DataConfig fields {unknown}; known: {sorted(known)}")
        cfg = replace(cfg, **overrides)
        if path is not None:
            cfg = replace(cfg, path=str(path))
        cfg.validate()
        self.config = cfg
        self.save_hyperparameters(asdict(cfg))
        self.fs, self.root = resolve_fs(cfg.path)
        self.manifest = read_manifest(cfg.path)
        self.tokenizer_json = read_tokenizer_json(cfg.path, self.manifest)  # the bytes, e.g. for an ONNX bundle
        self.tokenizer = Tokenizer.from_dict(json.loads(self.tokenizer_json.decode()))
        # the identity checkpoints and embeddings record
        self.tokenizer_sha256 = hashlib.sha256(self.tokenizer_json).hexdigest()
        self.vocab_sizes: dict[str, int] = self.tokenizer.vocab_sizes()
        self.numeric_fields: tuple[str, ...] = tuple(f.name for f in NUMERIC_FIELDS if f.name in self.tokenizer.numeric)
        self.timer = LoaderTimer()
        self._indexes: dict[tuple[str, ...], SplitIndex] = {}
        self.train_loader: PLMDataLoader | None = None

    # ---------------------------------------------------------------------------------- parts
    def split_shards(self, split: str) -> list[tuple[str, int]]:
        """(path, rows) of every shard of `split`; a clear error if it has none."""
        splits = self.manifest["splits"]
        if split not in splits:
            raise ValueError(f"{self.config.path}: manifest.json has no split {split!r} (has {sorted(splits)})")
        shards = [(join(self.root, s["path"]), int(s["rows"])) for s in splits[split].get("shards", []) if s.get("rows", 1)]
        if not shards:
            raise ValueError(
                f"{self.config.path}: split {split!r} has no shards ({splits[split].get('windows', 0)} windows); "
                "prepare data with users in it (plm-prep val_fraction/test_fraction) or do not use this split ("
                + ("plm-train: trainer.limit_val_batches=0 trains without validation; " if split == "val" else "")
                + "plm-export: splits= without it)"
            )
        return shards

    def index(self, splits: tuple[str, ...]) -> SplitIndex:
        if splits not in self._indexes:
            shards = [s for sp in splits for s in self.split_shards(sp)]
            self._indexes[splits] = SplitIndex.open(shards, self.fs)
        return self._indexes[splits]

    def stream(self, splits: str | tuple[str, ...], mode: str) -> PLMStream:
        """A `PLMStream` over `splits` in `mode` (train | eval | predict) with this config."""
        c = self.config
        splits = (splits,) if isinstance(splits, str) else tuple(splits)
        train = mode == "train"
        max_len = c.max_len if train or not c.eval_max_len else c.eval_max_len
        return PLMStream(
            self.index(splits),
            mode=mode,
            max_len=max_len,
            batch_mode=c.batch_mode,
            max_tokens=c.max_tokens,
            max_batch_size=c.max_batch_size,
            shuffle_buffer=c.shuffle_buffer,
            seed=c.seed,
            subwindow=c.subwindow,
            min_len=c.min_len if train else min(c.min_len, max_len),  # sub-windows are training's
            even_batches=c.even_batches if train else (c.eval_even_batches if mode == "eval" else "off"),
            rank=None if c.rank < 0 else c.rank,
            world_size=None if c.world_size < 0 else c.world_size,
            read_rows=c.read_rows,
            name="+".join(splits),
        )

    def loader(self, stream: PLMStream, resumable: bool) -> PLMDataLoader:
        c = self.config
        return PLMDataLoader(
            stream,
            c.num_workers,
            resumable=resumable,
            pin_memory=c.pin_memory,
            prefetch_factor=c.prefetch_factor,
            timer=self.timer if resumable else LoaderTimer(),
        )

    # ----------------------------------------------------------------------------- lightning
    def train_dataloader(self) -> PLMDataLoader:
        self.train_loader = self.loader(self.stream("train", "train"), resumable=True)
        return self.train_loader

    def val_dataloader(self) -> PLMDataLoader:
        return self.loader(self.stream("val", "eval"), resumable=False)

    def test_dataloader(self) -> PLMDataLoader:
        return self.loader(self.stream("test", "eval"), resumable=False)

    def predict_dataloader(self) -> PLMDataLoader:
        splits = []
        for s in self.config.splits_to_predict():
            sp = self.manifest["splits"].get(s, {})
            if any(x.get("rows", 1) for x in sp.get("shards", [])):
                splits.append(s)
            else:
                warnings.warn(f"predict: split {s!r} has no shards; skipped", stacklevel=2)
        if not splits:
            raise ValueError(f"{self.config.path}: none of predict_splits={self.config.predict_splits!r} has shards")
        stream = self.stream(tuple(splits), "predict")
        _, world = stream.resolve_distributed()
        consumers = world * max(1, self.config.num_workers)
        if stream.n_samples < consumers:  # the same on every rank: all stop here, none in a collective
            raise ValueError(f"predict: {stream.n_samples} user(s) for {world} process(es) x "
                             f"{max(1, self.config.num_workers)} loader worker(s): some would have no user; "
                             f"run with at most {stream.n_samples} processes x workers")
        return self.loader(stream, resumable=False)
