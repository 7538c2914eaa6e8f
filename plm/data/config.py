"""`DataConfig`: how prepared shards become batches (the `data.*` keys of `plm-train`). Kept free
of torch and Lightning imports so that every CLI composes its config quickly; the loaders live in
`plm.data.datamodule` / `plm.data.dataset`."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from plm.data.schema import SPLITS

BATCH_MODES = ("packed", "bucketed")
SUBWINDOWS = ("random", "tail", "random_length")
EVEN_BATCHES = ("auto", "off", "drop", "pad")


@dataclass
class DataConfig:
    """How prepared shards become training batches (`PLMDataModule`). Primitives only."""

    # Folder written by plm-prep (manifest.json, tokenizer.json, train/ val/ test/); a local
    # path or a URI pyarrow understands (s3://, gs://, hdfs://).
    path: str = MISSING
    # Events per sequence. Training: the cap of the sub-window drawn from each window (packed
    # rows are this long too). Evaluation/predict: the most recent max_len events of window 0.
    max_len: int = 512
    # Evaluation/predict sequence length; 0 = max_len.
    eval_max_len: int = 0
    # "packed": several users per row of max_len events (segment_ids/positions, block-diagonal
    # attention); "bucketed": one user per row, sorted by length, padded to the batch's longest.
    batch_mode: str = "packed"
    # Token budget per batch: padded slots B x T <= max_tokens (packed: max_tokens // max_len rows).
    max_tokens: int = 16384
    # Bucketed only: at most this many sequences per batch (0 = no cap besides max_tokens).
    max_batch_size: int = 0
    # Training shuffle block (windows): each worker permutes blocks of this many windows and
    # batches each block on its own. Memory ~ shuffle_buffer x window bytes per worker.
    shuffle_buffer: int = 4096
    # Training sub-window of each window: "random" (random start, min(n, max_len) events),
    # "tail" (the most recent min(n, max_len) events), "random_length" (random length in
    # [min_len, min(n, max_len)] at a random start).
    subwindow: str = "random"
    # Shortest sub-window for subwindow=random_length.
    min_len: int = 1
    # Training batches per rank under DDP: "auto" (= "drop" when world_size > 1, else "off"),
    # "off" (every window exactly once; ranks may differ by a few batches: DDP can hang),
    # "drop" (every worker of every rank yields the smallest worker's count; the surplus is
    # dropped this epoch), "pad" (the largest count; short workers repeat batches, repeat=True).
    even_batches: str = "auto"
    # The same for validation/test ("off" keeps each user exactly once; "pad" repeats batches,
    # flagged repeat=True, so metrics can skip them).
    eval_even_batches: str = "off"
    # DataLoader worker processes per rank (0 = read in the training process).
    num_workers: int = 0
    # DataLoader pin_memory (for GPU training).
    pin_memory: bool = False
    # Batches each worker prepares ahead (DataLoader prefetch_factor; ignored with 0 workers).
    prefetch_factor: int = 2
    # Rows per Arrow record batch when streaming a Parquet row group (bounds read memory).
    read_rows: int = 1024
    # Seed of every shuffle and sub-window draw (with the epoch).
    seed: int = 0
    # Splits whose users predict_dataloader yields (comma-separated), each user once.
    predict_splits: str = "train,val,test"
    # Explicit distributed layout; -1 = from torch.distributed when initialised (else 0 / 1).
    rank: int = -1
    world_size: int = -1

    def validate(self) -> None:
        if self.path in (MISSING, "", None):
            raise ValueError("DataConfig.path is not set: point it at a folder written by plm-prep")
        if self.batch_mode not in BATCH_MODES:
            raise ValueError(f"DataConfig.batch_mode={self.batch_mode!r} is not one of {BATCH_MODES}")
        if self.subwindow not in SUBWINDOWS:
            raise ValueError(f"DataConfig.subwindow={self.subwindow!r} is not one of {SUBWINDOWS}")
        for name in ("even_batches", "eval_even_batches"):
            if getattr(self, name) not in EVEN_BATCHES:
                raise ValueError(f"DataConfig.{name}={getattr(self, name)!r} is not one of {EVEN_BATCHES}")
        for name in ("max_len", "max_tokens", "shuffle_buffer", "read_rows", "min_len", "prefetch_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"DataConfig.{name}={getattr(self, name)} must be >= 1")
        for name in ("eval_max_len", "max_batch_size", "num_workers", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"DataConfig.{name}={getattr(self, name)} must be >= 0")
        if self.batch_mode == "packed" and self.max_batch_size > 0:
            raise ValueError(f"DataConfig.max_batch_size={self.max_batch_size} caps bucketed batches; packed batches "
                             "have max_tokens // max_len rows of several users each: set batch_mode=bucketed or drop it")
        if max(self.max_len, self.eval_max_len) > self.max_tokens:
            raise ValueError(
                f"DataConfig.max_tokens={self.max_tokens} is smaller than one sequence of "
                f"max_len={max(self.max_len, self.eval_max_len)} events"
            )
        if (self.rank < 0) != (self.world_size < 0):
            raise ValueError("DataConfig.rank and world_size must both be set or both be -1")
        if self.world_size >= 0 and not 0 <= self.rank < self.world_size:
            raise ValueError(f"DataConfig.rank={self.rank} is not in [0, world_size={self.world_size})")
        bad = [s for s in self.splits_to_predict() if s not in SPLITS]
        if bad:
            raise ValueError(f"DataConfig.predict_splits has unknown splits {bad}; known: {SPLITS}")

    def splits_to_predict(self) -> list[str]:
        return [s.strip() for s in self.predict_splits.split(",") if s.strip()]
