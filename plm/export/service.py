"""Embed raw events of a few users without Spark: what a scoring service calls.

    emb = UserEmbedder.from_files("runs/demo/pipeline/train/final.pt", "runs/demo/pipeline/prepared")
    table = emb.embed_raw({"payments": payments, "logins": logins}, cutoff="2024-06-01T00:00:00Z")
    # -> pa.Table: user_id, embedding fixed_size_list<float32>[d], n_events (sorted by user_id)

The raw tables follow `spec/raw-events.md` (any subset of sources, any extra columns). They go
through `plm.data.tokenizer.encode_raw`, the pure-Python twin of `plm-prep` (same validation,
duplicate removal, merge order, features, token ids and windows, with the prepared folder's
`tokenizer.json` and window settings), then through the same `Embedder` and the same bucketed
batches as `plm-export`: a user's vector equals the batch export's for the same events and
cut-off (tested). Invalid rows are dropped here as plm-prep quarantines them (the same valid
time window: from the prepared folder's start to its configured `ts_max`, else one day after
this run, as plm-prep's default; rows after the cut-off are valid and left out of the
sequences, so an event id they share with an earlier row conflicts as in plm-prep), and
`accounting` says how many of each source's rows were kept, quarantined (per reason), duplicates
or at/after the cut-off (plm-prep's manifest accounting); a user with no valid event before the
cut-off has no row, and `missing_users` says which.

At scale (hundreds of millions of users) run this where the data lives:
`plm.export.spark.embed_raw_spark` calls `embed_raw` on the executors of a Spark job over raw
tables (`mapInArrow`, users never split), or `plm-export` under torchrun over prepared shards.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from plm.data.collate import collate_windows
from plm.data.tokenizer import Tokenizer, encode_raw, iso_us
from plm.export.model import (
    DEFAULT_POOLING,
    Embedder,
    LoadedModel,
    check_positions,
    check_tokenizer,
    load_checkpoint,
    quantize_int8,
)


def window_start(manifest: dict) -> str:
    """The start of the valid time window of a prepared folder (its `manifest.json`): rows
    before it are `ts_out_of_range` for `plm-prep` and for every path that embeds raw rows."""
    return manifest.get("ts_window", {}).get("min", manifest["config"]["ts_min"])


def window_end(manifest: dict | None = None, ts_max: str | None = None) -> str:
    """The end of the valid time window for raw rows, by plm-prep's rule: `ts_max` if given,
    else the prepared folder's configured `ts_max`, else one day after now (plm-prep's default,
    at this run's time). Resolve it once per job: Spark's executors get the driver's value."""
    import datetime as dt

    ts_max = ts_max or (manifest or {}).get("config", {}).get("ts_max")
    if ts_max:
        return ts_max
    end = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) + dt.timedelta(days=1)
    return end.strftime("%Y-%m-%dT%H:%M:%SZ")


class UserEmbedder:
    """Raw events or prepared windows -> user embeddings with a trained checkpoint (CPU)."""

    def __init__(self, loaded: LoadedModel, tokenizer: Tokenizer, max_events: int, stride: int,
                 ts_min: str = "1990-01-01T00:00:00Z", max_len: int = 0, pooling: str = DEFAULT_POOLING,
                 normalize: bool = False, quantize: str = "none", max_tokens: int = 0, ts_max: str | None = None):
        from plm.export.run import auto_max_tokens, check_vocab

        check_vocab(loaded, tokenizer.vocab_sizes(), "the given tokenizer")
        self.loaded = loaded
        self.tokenizer = tokenizer
        self.max_events, self.stride, self.ts_min = int(max_events), int(stride), ts_min
        self.ts_max = ts_max  # None: one day after each embed_raw call (window_end)
        self.max_len = int(max_len or max_events)
        if max_tokens < 0 or 0 < max_tokens < self.max_len:  # as plm-export refuses it
            raise ValueError(f"max_tokens={max_tokens} is smaller than one sequence of max_len={self.max_len} "
                             "events (0 = sized for CPU caches)")
        # 0: sized for CPU caches, as plm-export's default (auto_max_tokens)
        self.max_tokens = int(max_tokens) or auto_max_tokens(loaded.model.cfg.d_model, self.max_len)
        self.normalize = normalize
        self.embedder = Embedder(loaded.model, pooling, as_of_query=loaded.as_of_query)
        check_positions(loaded.model, self.embedder.pooling, self.max_len)
        if quantize == "int8":
            self.embedder = quantize_int8(self.embedder)
        elif quantize != "none":
            raise ValueError(f"quantize={quantize!r} is not one of none, int8")
        self.missing_users: list[str] = []
        self.accounting: dict[str, dict] = {}  # of the last embed_raw call, per source (see encode_raw)

    @classmethod
    def from_files(cls, ckpt: str, data: str, **kw) -> UserEmbedder:
        """`ckpt`: final.pt (or run folder); `data`: the prepared folder the model was trained on
        (its tokenizer.json, window settings and valid time window are used). `kw`: max_len (0 =
        training length), pooling, normalize, quantize, max_tokens, ts_max (default: the prepared
        folder's configured one, else one day after each call, as plm-prep's)."""
        from plm.data.datamodule import read_manifest, read_tokenizer_json
        from plm.export.run import training_max_len

        loaded = load_checkpoint(ckpt)
        manifest = read_manifest(data)
        tok_bytes = read_tokenizer_json(data, manifest)
        tok_sha = hashlib.sha256(tok_bytes).hexdigest()
        check_tokenizer(loaded, tok_sha, f"data={data}")
        tok = Tokenizer.from_dict(json.loads(tok_bytes))
        c = manifest["config"]
        kw.setdefault("max_len", 0)
        kw["ts_max"] = kw.get("ts_max") or c.get("ts_max")
        if not kw["max_len"]:
            kw["max_len"] = training_max_len(loaded, manifest)
        obj = cls(loaded, tok, c["max_events"], c["stride"], ts_min=window_start(manifest), **kw)
        obj.tokenizer_sha256 = tok_sha
        return obj

    @property
    def dim(self) -> int:
        return self.embedder.dim

    def _as_of_us(self, as_of: str | None, what: str) -> int | None:
        if not self.embedder.needs_as_of:
            return None
        if as_of is None:
            raise ValueError(f"pooling={self.embedder.pooling} embeds users as of a time: pass {what}")
        return iso_us(as_of)

    def embed_raw(self, tables: dict[str, pa.Table | None], cutoff: str | None = None) -> pa.Table:
        """Raw contract tables (payments/logins/orders, any subset) -> one row per user with at
        least one valid event before `cutoff` (None: all events), sorted by user_id."""
        users = set()
        for t in tables.values():
            if t is not None and "user_id" in t.column_names:
                users.update(u for u in pc.unique(t.column("user_id")).to_pylist() if u is not None)
        self.accounting = {}
        try:
            windows = encode_raw(tables, self.tokenizer, cutoff=cutoff, ts_min=self.ts_min,
                                 ts_max=window_end(ts_max=self.ts_max), max_events=self.max_events,
                                 stride=self.stride, accounting=self.accounting)
        except ValueError as e:
            if "no valid events" not in str(e):
                raise
            windows = None
        as_of = self._as_of_us(cutoff, "cutoff=ISO-TIME")
        out = self._embed(windows, as_of) if windows is not None else self._empty()
        self.missing_users = sorted(users - set(out.column("user_id").to_pylist()))
        return out

    def embed_windows(self, windows: pa.Table, as_of: str | None = None) -> pa.Table:
        """Prepared windows (shard schema) -> embeddings of each user's window 0, sorted by user_id.
        `as_of` (ISO time; the as-of poolings need it, e.g. the prepared data's cut-off)."""
        return self._embed(windows, self._as_of_us(as_of, "as_of=ISO-TIME"))

    def _embed(self, windows: pa.Table, as_of_us: int | None) -> pa.Table:
        w0 = windows.filter(pc.and_(pc.equal(windows.column("window_index"), 0),
                                    pc.greater(windows.column("n_events"), 0)))
        if w0.num_rows == 0:
            return self._empty()
        uids, embs, lens = [], [], []
        with torch.no_grad():
            for batch in collate_windows(w0, self.max_len, mode="bucketed", max_tokens=self.max_tokens):
                t = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
                if as_of_us is not None:
                    t["as_of"] = torch.full((len(batch["user_id"]),), as_of_us, dtype=torch.long)
                e = self.embedder(t)
                if self.normalize:
                    e = torch.nn.functional.normalize(e, dim=-1)
                uids += batch["user_id"]
                embs.append(e.float().numpy())
                lens.append(batch["lengths"].numpy())
        emb = np.concatenate(embs)
        n = np.concatenate(lens).astype(np.int32)
        order = np.argsort(np.asarray(uids, dtype=object), kind="stable")
        flat = pa.array(emb[order].reshape(-1), pa.float32())
        return pa.table({
            "user_id": pa.array([uids[i] for i in order], pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, self.dim),
            "n_events": pa.array(n[order]),
        })

    def _empty(self) -> pa.Table:
        return pa.table({"user_id": pa.array([], pa.string()),
                         "embedding": pa.FixedSizeListArray.from_arrays(pa.array([], pa.float32()), self.dim),
                         "n_events": pa.array([], pa.int32())})
