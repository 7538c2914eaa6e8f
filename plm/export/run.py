"""`run_export(cfg)`: user embeddings (Parquet per `spec/outputs.md`) or the encoder as ONNX.

Batch path (`format=parquet`): the prepared shards stream through Lightning's predict loop
(`PLMDataModule.predict_dataloader`: the most recent `max_len` events of each user's window 0,
bucketed by length, each user exactly once over all ranks), an `Embedder` turns each batch into
(N, d) vectors, and `PartWriter` appends them to one Parquet part per rank. Memory is bounded by
one shard block plus `row_group_size` buffered embeddings. Under `trainer.strategy=ddp` (torchrun
or SLURM, any number of nodes) every rank writes `part-<rank>.parquet`; rank 0 then checks that
the parts hold every expected user exactly once (the manifest's user counts), writes
`_export.json` (what was consumed and produced, throughput, agreement figures) and the optional
FAISS index, and moves the staging folder into place. Nothing appears at `out` unless the
check passes.

Output folder (`format=parquet`)::

    OUT/part-00000.parquet ...   user_id, embedding fixed_size_list<float32>[d], n_events, model,
                                 model_sha256, checkpoint, tokenizer_sha256, pooling, as_of
    OUT/_export.json             the run record (inputs, outputs, counts, timings, agreement)
    OUT/_faiss/index.faiss       optional (index=flat|hnsw): inner product on L2-normalised vectors
    OUT/_faiss/user_ids.parquet  FAISS id -> user_id

(names starting with `_` are ignored by Parquet dataset readers: `pq.read_table(OUT)` reads the
embeddings only.)

`format=onnx`: `OUT/model.onnx` (+ `OUT/model.int8.onnx` with `quantize=int8`), `OUT/onnx.json`
(inputs, output, pooling, identity, agreement with the eager fp32 model on real users) and a copy
of `tokenizer.json`, i.e. what a service needs to embed raw events without PLM's training code.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from plm.data.tokenizer import iso_us
from plm.export.config import FORMATS, INDEXES, QUANTIZE, ExportConfig
from plm.export.model import (
    Embedder,
    LoadedModel,
    check_onnx_opset,
    check_positions,
    check_tokenizer,
    compile_embedder,
    cosine_agreement,
    export_onnx,
    first_call,
    load_checkpoint,
    onnx_input_names,
    quantize_int8,
    quantize_onnx_int8,
    split_pooling,
)
from plm.train.callbacks import progress_callbacks
from plm.train.run import strategy

EMBEDDINGS_FORMAT = "plm-embeddings/1"
METADATA_KEY = b"plm.embeddings"


# ----------------------------------------------------------------------------------- schema


def embedding_schema(dim: int, identity: dict) -> pa.Schema:
    """The embeddings' Parquet schema, with `identity` (JSON) as schema metadata."""
    return pa.schema(
        [
            pa.field("user_id", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
            pa.field("n_events", pa.int32(), nullable=False),  # events the embedding has read
            pa.field("model", pa.string(), nullable=False),
            pa.field("model_sha256", pa.string(), nullable=False),
            pa.field("checkpoint", pa.string(), nullable=False),
            pa.field("tokenizer_sha256", pa.string(), nullable=False),
            pa.field("pooling", pa.string(), nullable=False),
            pa.field("as_of", pa.timestamp("us", tz="UTC"), nullable=False),
        ],
        metadata={METADATA_KEY: json.dumps(identity, sort_keys=True).encode()},
    )


def embedding_table(user_ids: list[str], emb: np.ndarray, n_events: np.ndarray, identity: dict,
                    schema: pa.Schema) -> pa.Table:
    n, d = emb.shape
    flat = pa.array(np.ascontiguousarray(emb, dtype=np.float32).reshape(-1), pa.float32())
    as_of = iso_us(identity["as_of"])
    cols = [
        pa.array(user_ids, pa.string()),
        pa.FixedSizeListArray.from_arrays(flat, d),
        pa.array(np.asarray(n_events, dtype=np.int32)),
        pa.array([identity["model"]] * n, pa.string()),
        pa.array([identity["model_sha256"]] * n, pa.string()),
        pa.array([identity["checkpoint"]] * n, pa.string()),
        pa.array([identity["tokenizer_sha256"]] * n, pa.string()),
        pa.array([identity["pooling"]] * n, pa.string()),
        pa.array(np.full(n, as_of, dtype=np.int64), pa.timestamp("us", tz="UTC")),
    ]
    return pa.Table.from_arrays(cols, schema=schema)


def read_identity(path: str | Path) -> dict:
    """The identity (schema metadata) of an embeddings file or folder."""
    p = Path(path)
    f = p if p.is_file() else sorted(p.glob("part-*.parquet"))[0]
    md = pq.read_schema(f).metadata or {}
    if METADATA_KEY not in md:
        raise ValueError(f"{f} has no {METADATA_KEY.decode()} schema metadata: not written by plm-export")
    return json.loads(md[METADATA_KEY])


# ------------------------------------------------------------------------------ checks, setup


def check_raw_config(cfg: ExportConfig) -> None:
    """raw=DIR (Spark over raw tables) against the options it has no use for, and the raw-only
    options without raw=: a ValueError naming them (none is accepted and ignored)."""
    if not cfg.raw:
        given = [k for k in ("cutoff", "partitions", "rows_per_call") if getattr(cfg, k) != getattr(ExportConfig, k)]
        if cfg.spark != ExportConfig().spark:
            given.append("spark")
        if given:
            raise ValueError(f"{', '.join(given)}: only for raw=DIR (raw tables embedded with Spark); without raw=, "
                             "plm-export embeds the prepared shards of data=, cut off where plm-prep cut them "
                             "(its manifest's cutoff): drop " + ", ".join(given))
        return
    if cfg.format != "parquet":
        raise ValueError("raw=DIR writes embeddings (format=parquet); export the ONNX graph from data= alone")
    if cfg.index != "none":
        raise ValueError("index= is built by the one-process export; with raw= build it from the written Parquet")
    if cfg.splits != ExportConfig.splits:
        raise ValueError(f"splits={cfg.splits}: raw= embeds every user of the raw tables (they have no splits)")
    if cfg.read_rows != ExportConfig.read_rows or cfg.row_group_size != ExportConfig.row_group_size:
        raise ValueError("read_rows / row_group_size size the reading of prepared shards and the one-process "
                         "writer; with raw= Spark reads and writes (spark.conf)")
    t, d = cfg.trainer, ExportConfig().trainer
    if (t.compile, t.devices, t.num_nodes, t.strategy) != (d.compile, d.devices, d.num_nodes, d.strategy):
        raise ValueError("trainer.compile/devices/num_nodes/strategy run the one-process or torchrun export; with "
                         "raw= Spark spreads the work (spark.master, spark.conf) and runs eager models")
    if cfg.partitions < 0 or cfg.rows_per_call < 1:
        raise ValueError(f"partitions={cfg.partitions} must be >= 0 and rows_per_call={cfg.rows_per_call} >= 1")
    if cfg.cutoff:
        try:
            iso_us(cfg.cutoff)
        except ValueError:
            raise ValueError(f"cutoff={cfg.cutoff!r} is not an ISO-8601 time (e.g. 2024-06-29T00:00:00Z)") from None


def check_config(cfg: ExportConfig) -> None:
    check_raw_config(cfg)
    if cfg.format not in FORMATS:
        raise ValueError(f"format={cfg.format!r} is not one of {FORMATS}")
    if cfg.quantize not in QUANTIZE:
        raise ValueError(f"quantize={cfg.quantize!r} is not one of {QUANTIZE}")
    if cfg.index not in INDEXES:
        raise ValueError(f"index={cfg.index!r} is not one of {INDEXES}")
    split_pooling(cfg.pooling)  # names a bad part before anything loads
    from plm.data.schema import SPLITS

    wanted = [x.strip() for x in cfg.splits.split(",") if x.strip()]
    bad = [x for x in wanted if x not in SPLITS]
    if bad or not wanted:
        raise ValueError(f"splits={cfg.splits!r}: " + (f"unknown {bad}; " if bad else "names no split; ")
                         + f"a comma list of {', '.join(SPLITS)} (quoted on the command line: \"splits='train,val'\")")
    if cfg.format == "onnx" and cfg.trainer.compile:
        raise ValueError("trainer.compile=true compiles the eager model for format=parquet; format=onnx traces "
                         "the eager model (ONNX Runtime does its own graph optimisation): drop trainer.compile")
    if cfg.format == "onnx" and cfg.index != "none":
        raise ValueError("index= builds a FAISS index over exported embeddings: use it with format=parquet")
    if cfg.format != "onnx" and cfg.opset != ExportConfig.opset:
        raise ValueError(f"opset={cfg.opset} is the ONNX graph's opset: use it with format=onnx")
    check_onnx_opset(cfg.opset)
    if cfg.format == "onnx" and cfg.row_group_size != ExportConfig.row_group_size:
        raise ValueError(f"row_group_size={cfg.row_group_size} sizes the Parquet embeddings; format=onnx writes none")
    if cfg.format == "onnx" and (cfg.trainer.devices > 1 or cfg.trainer.num_nodes > 1 or cfg.trainer.strategy != "auto"):
        raise ValueError("format=onnx writes one graph in one process: trainer.devices/num_nodes/strategy spread a "
                         "format=parquet export over processes; drop them")
    for name in ("read_rows", "row_group_size", "agreement_users"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)} must be >= 1")
    if cfg.max_tokens < 0:
        raise ValueError(f"max_tokens={cfg.max_tokens} must be >= 0 (0 = sized for the device: auto_max_tokens)")
    if cfg.max_len < 0:
        raise ValueError(f"max_len={cfg.max_len} must be >= 0 (0 = the training length)")
    if not 0.0 < cfg.min_cosine <= 1.0:
        raise ValueError(f"min_cosine={cfg.min_cosine} must be in (0, 1]")
    t = cfg.trainer
    if t.strategy not in ("auto", "ddp"):
        raise ValueError(f"trainer.strategy={t.strategy!r}: export runs Lightning's predict loop with "
                         "strategy auto (one process) or ddp (one Parquet part per rank); a model trained with "
                         "fsdp2 exports with ddp (final.pt holds the full weights)")
    if t.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(f"trainer.accelerator={t.accelerator} but no CUDA device is visible; "
                         "use trainer.accelerator=cpu trainer.precision=32-true")
    if t.accelerator == "cpu" and t.precision not in ("32-true", "32"):
        raise ValueError(f"trainer.precision={t.precision} is for GPUs; use trainer.precision=32-true on CPU")
    if cfg.index != "none":
        try:
            import logging

            # faiss's loader logs every instruction-set build it could not load (INFO, with a
            # ModuleNotFoundError text) before it finds the generic one: not a problem, not shown
            logging.getLogger("faiss.loader").setLevel(logging.WARNING)
            import faiss  # noqa: F401
        except ImportError as e:
            raise SystemExit(f"plm-export index={cfg.index} needs faiss-cpu (pip install faiss-cpu): {e}") from None


def check_vocab(loaded: LoadedModel, vocab_sizes: dict[str, int], where: str) -> None:
    """The checkpoint's embedding tables must fit the prepared data's tokenizer exactly."""
    bad = {f: (n, vocab_sizes.get(f)) for f, n in loaded.vocab_sizes.items() if vocab_sizes.get(f) != n}
    if bad:
        raise ValueError(
            f"checkpoint {loaded.path} was trained on another tokenizer than {where}: fields "
            + ", ".join(f"{f} (model {a}, data {b})" for f, (a, b) in sorted(bad.items())[:6])
            + ". Export with the prepared folder the model was trained on, or prepare this data with its "
            "tokenizer: plm-prep raw=... out=... tokenizer=<the training prepared folder> (same tokenizer "
            "format; a model trained on an older format needs its data prepared again and retraining)."
        )


# padded events x d_model per batch of an export on CPU (max_tokens=0): the activations of one
# layer then stay in the CPU's caches (docs/benchmarks.md, "Batch size of an export on CPU")
CPU_BATCH_ACTIVATIONS = 2**18
GPU_MAX_TOKENS = 32768


def auto_max_tokens(d_model: int, max_len: int, gpu: bool = False) -> int:
    """The padded events per batch of an export given max_tokens=0: on a GPU 32768; on CPU the
    power of two nearest 2^18 / d_model (d=64: 4096, d=256: 1024), which ran 1.2-2x faster than
    32768 here. Never fewer than one sequence of max_len events."""
    if gpu:
        return max(GPU_MAX_TOKENS, max_len)
    return max(max_len, 2 ** round(math.log2(CPU_BATCH_ACTIVATIONS / max(1, d_model))))


def training_max_len(loaded: LoadedModel, manifest: dict) -> int:
    """The sequence length the checkpoint was trained/evaluated with (final.pt records it), else
    the prepared windows' max_events."""
    return loaded.max_len or int(manifest["config"]["max_events"])


def model_identity(loaded: LoadedModel, tok_sha: str, cutoff: str, embedder: Embedder, *, normalize: bool,
                   quantize: str) -> dict:
    from plm import __version__

    name = loaded.model_config.get("name", "custom")
    return {
        "format": EMBEDDINGS_FORMAT,
        "model": f"{loaded.arch}:{name}",
        "model_sha256": loaded.sha256,
        "checkpoint": os.path.basename(os.path.dirname(os.path.abspath(loaded.path))) + "/"
        + os.path.basename(loaded.path),
        "tokenizer_sha256": tok_sha,
        "pooling": embedder.pooling,
        "as_of": cutoff,
        "dim": embedder.dim,
        "normalized": bool(normalize),
        "quantize": quantize,
        "plm_version": __version__,
    }


def _set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


# ----------------------------------------------------------------------------- predict loop


class EmbedModule:
    """Factory of the LightningModule (kept lazy so `plm.export` imports without Lightning)."""

    @staticmethod
    def build(embedder: torch.nn.Module, normalize: bool):
        import lightning.pytorch as pl

        class _Embed(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.embedder = embedder
                self.normalize = normalize

            def predict_step(self, batch: dict, batch_idx: int) -> dict:
                tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
                e = self.embedder(tensors)
                if self.normalize:
                    e = torch.nn.functional.normalize(e, dim=-1)
                return {"user_id": batch["user_id"], "embedding": e.float().cpu().numpy(),
                        "n_events": batch["lengths"].cpu().numpy()}

        return _Embed()


def part_writer(staging: Path, identity: dict, schema: pa.Schema, row_group_size: int):
    """A `BasePredictionWriter` appending each rank's embeddings to `staging/part-<rank>.parquet`."""
    from lightning.pytorch.callbacks import BasePredictionWriter

    class PartWriter(BasePredictionWriter):
        def __init__(self):
            super().__init__(write_interval="batch")
            self.path: Path | None = None
            self.writer: pq.ParquetWriter | None = None
            self.buf: list[dict] = []
            self.buffered = 0
            self.rows = 0
            self.events = 0
            self.t0: float | None = None
            self.seconds = 0.0

        def setup(self, trainer, pl_module, stage: str) -> None:
            staging.mkdir(parents=True, exist_ok=True)
            self.path = staging / f"part-{trainer.global_rank:05d}.parquet"
            self.writer = pq.ParquetWriter(str(self.path), schema, compression="zstd")

        def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
            if self.t0 is None:
                self.t0 = time.perf_counter()

        def _flush(self) -> None:
            if not self.buf:
                return
            uid = [u for b in self.buf for u in b["user_id"]]
            emb = np.concatenate([b["embedding"] for b in self.buf])
            n = np.concatenate([b["n_events"] for b in self.buf])
            self.writer.write_table(embedding_table(uid, emb, n, identity, schema), row_group_size=len(uid))
            self.buf, self.buffered = [], 0

        def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                               dataloader_idx) -> None:
            self.buf.append(prediction)
            k = len(prediction["user_id"])
            self.buffered += k
            self.rows += k
            self.events += int(prediction["n_events"].sum())
            if self.buffered >= row_group_size:
                self._flush()

        def on_predict_end(self, trainer, pl_module) -> None:
            self._flush()
            self.writer.close()
            self.seconds = time.perf_counter() - self.t0 if self.t0 is not None else 0.0

    return PartWriter()


def _export_output(name: str) -> bool:
    """A file or folder name plm-export writes in its output folder."""
    import fnmatch

    return name in ("_export.json", "onnx.json", "model.onnx", "model.int8.onnx", "model.onnx.data",
                    "model.int8.onnx.data", "tokenizer.json", "_faiss") or \
        fnmatch.fnmatch(name, "part-*.parquet")


def _only_ours(out, names: list[str]) -> None:
    """An earlier export's folder with something else put in it is not ours to delete."""
    other = sorted(n for n in names if not _export_output(n))
    if other:
        raise FileExistsError(f"out={out} holds files plm-export did not write ({', '.join(other[:5])}); "
                              "overwrite=true replaces only plm-export's own output: move them, or pick another out")


def _prepare_out(out: Path, overwrite: bool) -> Path:
    """The staging folder beside `out`. `overwrite=true` replaces only an earlier export (a folder
    holding `_export.json` or `onnx.json`) or an empty folder, never a file or other data."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=true to replace it")
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"out={out} is a file, not an earlier export; overwrite=true replaces only a plm-export folder")
        if any(out.iterdir()) and not ((out / "_export.json").exists() or (out / "onnx.json").exists()):
            raise FileExistsError(f"out={out} holds other data (no _export.json or onnx.json of an earlier export); "
                                  "overwrite=true replaces only a plm-export folder: pick another out")
        _only_ours(out, [c.name for c in out.iterdir()])
    return out.with_name(out.name + ".__staging__")


def _agreement(embedder: Embedder, other, batches: list[dict]) -> dict:
    a, b = [], []
    with torch.no_grad():  # as the compiled predict loop (inference_mode=False): a compiled model
        for batch in batches:  # guards on the grad mode and would compile again under another one
            t = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
            a.append(embedder(t))
            b.append(other(t))
    return cosine_agreement(torch.cat(a), torch.cat(b))


def _sample_batches(dm, n_users: int) -> list[dict]:
    """About `n_users` users of this process's predict stream for the agreement checks, spread
    over every history length of its first block (`plm.data.datamodule.spread_sample`)."""
    from plm.data.datamodule import spread_sample

    return spread_sample(dm.predict_dataloader(), int(dm.config.shuffle_buffer), n_users=n_users)


def _check_agreement(what: str, agr: dict, min_cosine: float) -> None:
    if agr["cosine_min"] < min_cosine:
        raise RuntimeError(
            f"{what}: cosine with the eager fp32 model is {agr['cosine_min']:.4f} for some user "
            f"(mean {agr['cosine_mean']:.4f} over {agr['n']} users), below min_cosine={min_cosine}"
        )


def open_data(cfg: ExportConfig, loaded: LoadedModel):
    from plm.data.datamodule import PLMDataModule, read_manifest

    manifest = read_manifest(cfg.data)
    max_len = cfg.max_len or training_max_len(loaded, manifest)
    if cfg.max_tokens and cfg.max_tokens < max_len:
        raise ValueError(f"max_tokens={cfg.max_tokens} is smaller than one sequence of max_len={max_len} events")
    max_tokens = cfg.max_tokens or auto_max_tokens(loaded.model.cfg.d_model, max_len, gpu=_on_gpu(cfg))
    dm = PLMDataModule(cfg.data, max_len=max_len, batch_mode="bucketed", max_tokens=max_tokens,
                       predict_splits=cfg.splits, read_rows=cfg.read_rows, shuffle_buffer=max(4096, cfg.row_group_size))
    check_vocab(loaded, dm.vocab_sizes, cfg.data)
    return dm, manifest, max_len


def _on_gpu(cfg: ExportConfig) -> bool:
    """Does this export run on CUDA devices (trainer.accelerator gpu/cuda, or auto with one visible)?"""
    a = cfg.trainer.accelerator
    return a in ("gpu", "cuda") or (a == "auto" and torch.cuda.is_available())


def run_export(cfg: ExportConfig) -> dict:
    """Export embeddings (or the ONNX graph) as configured; returns the run record."""
    check_config(cfg)
    _set_threads(cfg.trainer.num_threads)
    loaded = load_checkpoint(cfg.ckpt)
    dm, manifest, max_len = open_data(cfg, loaded)
    if cfg.raw:
        return _run_raw(cfg, loaded, dm, manifest)
    embedder = Embedder(loaded.model, cfg.pooling, as_of_us=iso_us(manifest["cutoff"]), as_of_query=loaded.as_of_query)
    check_positions(loaded.model, embedder.pooling, max_len)
    check_tokenizer(loaded, dm.tokenizer_sha256, f"data={cfg.data}")
    identity = model_identity(loaded, dm.tokenizer_sha256, manifest["cutoff"], embedder, normalize=cfg.normalize,
                              quantize=cfg.quantize)
    if cfg.format == "onnx":  # the graph ships with a copy of the tokenizer
        return _run_onnx(cfg, loaded, dm, embedder, identity, max_len)
    return _run_parquet(cfg, loaded, dm, manifest, embedder, identity, max_len)


def _run_parquet(cfg, loaded, dm, manifest, embedder, identity, max_len) -> dict:
    import lightning.pytorch as pl

    from plm.data.datamodule import loader_warnings_off

    out = Path(cfg.out)
    staging = _prepare_out(out, cfg.overwrite)
    t = cfg.trainer
    agreement: dict = {}
    model = embedder
    if cfg.quantize == "int8":
        if t.accelerator not in ("cpu", "auto") or torch.cuda.is_available() and t.accelerator == "auto":
            raise ValueError("quantize=int8 is dynamic CPU quantisation: use trainer.accelerator=cpu")
        model = quantize_int8(embedder)
    if t.compile:
        model = compile_embedder(model)
    if model is not embedder:  # int8 and/or compiled: checked against the eager fp32 model first
        what = "+".join(w for w, on in (("quantize=int8", cfg.quantize == "int8"), ("trainer.compile=true", t.compile)) if on)
        sample = _sample_batches(dm, cfg.agreement_users)
        t0 = time.perf_counter()
        agr = first_call(what, lambda: _agreement(embedder, model, sample))
        agr["compiled"] = bool(t.compile)
        if t.compile:
            agr["compile_and_check_s"] = round(time.perf_counter() - t0, 1)  # includes the compilation
        if cfg.quantize == "int8":
            agr["engine"] = torch.backends.quantized.engine  # onednn | x86 | fbgemm | qnnpack
        _check_agreement(what, agr, cfg.min_cosine)
        agreement = {"int8_vs_fp32" if cfg.quantize == "int8" else "compiled_vs_fp32": agr}
    schema = embedding_schema(embedder.dim, identity)
    writer = part_writer(staging, identity, schema, cfg.row_group_size)
    trainer = pl.Trainer(
        accelerator="gpu" if t.accelerator == "cuda" else t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy(t),
        precision=t.precision,
        logger=False,
        callbacks=[writer, *progress_callbacks(cfg.progress and t.enable_progress_bar, "plm-export")],
        enable_progress_bar=cfg.progress and t.enable_progress_bar,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=str(staging),
        # compiled: no_grad, not inference_mode, as the agreement check that compiled the graphs
        # (Lightning imposes no_grad under gloo anyway; with two modes every graph compiled twice)
        inference_mode=not t.compile,
    )
    rank = trainer.global_rank
    if rank == 0 and staging.exists():
        for p in staging.glob("part-*.parquet"):
            p.unlink()  # parts of an earlier, interrupted run
    trainer.strategy.barrier("plm-export-clean") if trainer.world_size > 1 else None
    module = EmbedModule.build(model, cfg.normalize)
    t0 = time.perf_counter()
    with loader_warnings_off():
        trainer.predict(module, datamodule=dm, return_predictions=False)
    wall = time.perf_counter() - t0
    per_rank = {"rank": rank, "users": writer.rows, "events": writer.events, "seconds": round(writer.seconds, 3)}
    if trainer.world_size > 1:
        gathered: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, per_rank)
    else:
        gathered = [per_rank]
    record: dict = {}
    if rank == 0:
        record = _finish(cfg, out, staging, manifest, identity, gathered, wall, max_len, agreement, trainer.world_size,
                         max_tokens=dm.config.max_tokens)
    if trainer.world_size > 1:
        trainer.strategy.barrier("plm-export-done")
    return record or {"out": str(out), "rank": rank}


def _run_raw(cfg: ExportConfig, loaded: LoadedModel, dm, manifest: dict) -> dict:
    """raw=DIR: the raw tables, read by Spark, embedded on its executors, each task writing its
    users in the batch export's schema (write_raw_spark) to a staging folder beside out; checked
    (each user once), then published."""
    from data_prep.prep import accounting_line, discover_inputs, read_source, spark_session
    from data_prep.storage import Location
    from plm.export.spark import write_raw_spark

    out = Location.of(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"{cfg.out} exists; pass overwrite=true to replace it")
    if out.exists() and not (out.is_empty_dir() or out.child("_export.json").exists()):
        raise FileExistsError(f"out={cfg.out} holds other data (no _export.json of an earlier export); "
                              "overwrite=true replaces only a plm-export folder: pick another out")
    if out.exists():
        _only_ours(cfg.out, out.entry_names())
    inputs, _ = discover_inputs(Location.of(cfg.raw))
    present = {s: f for s, f in inputs.items() if f}
    if not present:
        raise ValueError(f"raw={cfg.raw}: no source has Parquet files ({'/, '.join(inputs)}/)")
    cutoff = cfg.cutoff or manifest["cutoff"]
    check_tokenizer(loaded, dm.tokenizer_sha256, f"data={cfg.data}")
    agreement: dict = {}
    if cfg.quantize == "int8":  # checked like the batch export: on the prepared data's first users
        embedder = Embedder(loaded.model, cfg.pooling, as_of_us=iso_us(cutoff), as_of_query=loaded.as_of_query)
        agr = _agreement(embedder, quantize_int8(embedder), _sample_batches(dm, cfg.agreement_users))
        agr["engine"] = torch.backends.quantized.engine
        _check_agreement("quantize=int8", agr, cfg.min_cosine)
        agreement = {"int8_vs_fp32": agr}
    spark = spark_session(cfg.spark)
    staging = Location.of(cfg.out.rstrip("/") + ".__staging__")
    staging.delete()
    staging.mkdir()
    t0 = time.perf_counter()
    sources = {s: read_source(spark, s, files) for s, files in present.items()}
    identity, files, shared, accounting = write_raw_spark(sources, cfg.ckpt, cfg.data, cutoff, staging.uri,
                                      partitions=cfg.partitions or None, rows_per_call=cfg.rows_per_call,
                                      pooling=cfg.pooling, normalize=cfg.normalize, quantize=cfg.quantize,
                                      max_len=cfg.max_len, max_tokens=cfg.max_tokens)
    wall = time.perf_counter() - t0
    for source, acc in ((s, accounting[s]) for s in inputs if s in accounting):  # as plm-prep logs it
        after = acc["after_cutoff_rows"]
        print(f"plm-export: {accounting_line(source, acc)}"
              + (f"; {after:,} kept at or after the cut-off, left out" if after else ""), flush=True)
    kept = {f["path"] for f in files}
    for path in staging.list_files(".parquet", recursive=False):
        if path not in kept:  # a failed or speculative task attempt's file
            staging.fs.delete_file(path)
    parts = []
    for i, f in enumerate(files):  # in partition order: two runs give the same names
        name = f"part-{i:05d}.parquet"
        staging.fs.move(f["path"], staging.child(name).path)
        parts.append((name, int(f["rows"])))
    users, events = sum(r for _, r in parts), sum(int(f["events"]) for f in files)
    if users == 0:
        staging.delete()
        raise ValueError(f"raw={cfg.raw}: no user has a valid event before cutoff={cutoff}; nothing published")
    from pyspark.sql import functions as F

    distinct = spark.read.parquet(staging.uri).select(F.countDistinct("user_id")).collect()[0][0]
    if distinct != users:
        staging.delete()
        raise RuntimeError(f"raw export wrote {users} rows for {distinct} users; nothing published")
    record = {
        "format": EMBEDDINGS_FORMAT,
        "config": asdict(cfg),
        "path": "raw tables, Spark (plm.export.spark.write_raw_spark)",
        "inputs": {"raw": cfg.raw, "data": cfg.data, "ckpt": cfg.ckpt, "cutoff": cutoff,
                   "spark_master": cfg.spark.master, "max_tokens": dm.config.max_tokens,
                   "sources": {s: {"files": len(f), "rows": sum(x.rows for x in f),
                                   "shared_event_ids_left_out": shared.get(s, 0),
                                   "accounting": accounting.get(s)} for s, f in inputs.items()}},
        "outputs": {"path": cfg.out, "parts": [{"path": n, "rows": r} for n, r in parts], "users": users,
                    "events": events, "dim": identity["dim"]},
        "identity": identity,
        "agreement": agreement,
        "throughput": {"seconds": round(wall, 3), "users_per_s": round(users / max(wall, 1e-9), 1),
                       "events_per_s": round(events / max(wall, 1e-9), 1)},
    }
    staging.child("_export.json").write_json(record)
    if out.exists():
        out.delete()
    staging.move_to(out)
    return record


def expected_users(manifest: dict, splits: list[str]) -> int:
    return sum(int(manifest["splits"].get(s, {}).get("users", 0)) for s in splits)


def _finish(cfg, out: Path, staging: Path, manifest: dict, identity: dict, ranks: list[dict], wall: float,
            max_len: int, agreement: dict, world: int, max_tokens: int) -> dict:
    parts = sorted(staging.glob("part-*.parquet"))
    extra = [p for p in parts if int(p.stem.split("-")[1]) >= world]
    for p in extra:
        p.unlink()
    parts = [p for p in parts if p not in extra]
    ids = pa.concat_arrays([pq.read_table(p, columns=["user_id"]).column("user_id").combine_chunks() for p in parts]) \
        if parts else pa.array([], pa.string())
    n = len(ids)
    n_unique = len(pa.compute.unique(ids)) if n else 0
    splits = dm_splits(cfg, manifest)
    want = expected_users(manifest, splits)
    if n_unique != n or n != want:
        raise RuntimeError(
            f"plm-export: the parts in {staging} hold {n} rows for {n_unique} distinct users, expected "
            f"{want} users (splits {splits} in {cfg.data}/manifest.json), each exactly once; output not published"
        )
    users = sum(r["users"] for r in ranks)
    events = sum(r["events"] for r in ranks)
    slowest = max([r["seconds"] for r in ranks] + [1e-9])
    record = {
        "format": EMBEDDINGS_FORMAT,
        "identity": identity,
        "inputs": {"checkpoint": str(Path(cfg.ckpt).resolve()), "data": str(cfg.data),
                   "manifest_cutoff": manifest["cutoff"], "splits": splits, "max_len": max_len,
                   "max_tokens": max_tokens},
        "config": asdict(cfg),
        "outputs": {"parts": [{"path": p.name, "rows": pq.ParquetFile(p).metadata.num_rows} for p in parts],
                    "users": n, "dim": identity["dim"]},
        "ranks": ranks,
        "throughput": {"users_per_s": round(users / slowest, 1), "events_per_s": round(events / slowest, 1),
                       "predict_wall_s": round(wall, 3)},
        "agreement": agreement,
    }
    if cfg.index != "none":
        record["index"] = build_faiss_index(staging, parts, cfg.index)
    (staging / "_export.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    staging.rename(out)
    return record


def dm_splits(cfg: ExportConfig, manifest: dict) -> list[str]:
    want = [s.strip() for s in cfg.splits.split(",") if s.strip()]
    return [s for s in want if any(x.get("rows", 1) for x in manifest["splits"].get(s, {}).get("shards", []))]


def build_faiss_index(folder: Path, parts: list[Path], kind: str) -> dict:
    """`folder/_faiss/index.faiss` over L2-normalised embeddings (inner product = cosine) and
    `folder/_faiss/user_ids.parquet` (row i = FAISS id i)."""
    import faiss

    t = pa.concat_tables([pq.read_table(p, columns=["user_id", "embedding"]) for p in parts])
    d = t.schema.field("embedding").type.list_size
    x = np.ascontiguousarray(t.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, d),
                             dtype=np.float32)
    faiss.normalize_L2(x)
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    else:
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
    index.add(x)
    (folder / "_faiss").mkdir(exist_ok=True)
    faiss.write_index(index, str(folder / "_faiss" / "index.faiss"))
    pq.write_table(pa.table({"faiss_id": pa.array(np.arange(len(x)), pa.int64()), "user_id": t.column("user_id")}),
                   folder / "_faiss" / "user_ids.parquet")
    return {"kind": kind, "metric": "cosine (inner product of L2-normalised vectors)", "n": int(index.ntotal),
            "path": "_faiss/index.faiss", "ids": "_faiss/user_ids.parquet"}


# ------------------------------------------------------------------------------------- ONNX


def _run_onnx(cfg, loaded, dm, embedder, identity, max_len: int) -> dict:
    import onnxruntime as ort

    out = Path(cfg.out)
    staging = _prepare_out(out, cfg.overwrite)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    batches = _sample_batches(dm, cfg.agreement_users)
    names = onnx_input_names(loaded.vocab_sizes, loaded.numeric_fields, as_of=embedder.needs_as_of)
    if embedder.needs_as_of:  # the graph takes the as-of time per user (a service asks "as of now")
        for b in batches:
            b["as_of"] = torch.full((len(b["user_id"]),), embedder.as_of_us, dtype=torch.long)
    sample = _padded_sample(batches)
    export_onnx(embedder, sample, names, staging / "model.onnx", cfg.opset, normalize=cfg.normalize)
    files = {"fp32": "model.onnx"}
    if cfg.quantize == "int8":
        quantize_onnx_int8(staging / "model.onnx", staging / "model.int8.onnx")
        files["int8"] = "model.int8.onnx"
    agreement = {}
    for kind, fname in files.items():
        sess = ort.InferenceSession(str(staging / fname), providers=["CPUExecutionProvider"])
        agreement[f"onnx_{kind}_vs_fp32"] = _agreement(embedder, _ort_fn(sess, names), batches)
    for what, agr in agreement.items():
        _check_agreement(what, agr, cfg.min_cosine)
    (staging / "tokenizer.json").write_bytes(dm.tokenizer_json)
    record = {
        "format": "plm-onnx/1",
        "identity": identity,
        "files": files,
        "inputs": [{"name": n, "shape": ["batch"] if n == "as_of" else ["batch", "events"],
                    "dtype": "bool" if n == "attention_mask" else "int64" if n in ("ts", "positions", "as_of")
                    else "float32" if n.endswith("_value") else "int32"} for n in names],
        "output": {"name": "embedding", "shape": ["batch", identity["dim"]], "dtype": "float32"},
        "max_len": max_len,
        "normalize": bool(cfg.normalize),  # true: the graph L2-normalises its output (cosine = dot)
        "agreement": agreement,
        "config": asdict(cfg),
    }
    (staging / "onnx.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    staging.rename(out)
    return record


def _padded_sample(batches: list[dict]) -> dict[str, torch.Tensor]:
    """A small batch with at least one padded position (the traced graph is the masked path)."""
    b = {k: v[:4] for k, v in batches[0].items() if isinstance(v, torch.Tensor) and v.dim() == 2}
    if bool(b["attention_mask"].all()):
        b = {k: torch.cat([v, torch.zeros_like(v[:, :1])], dim=1) for k, v in b.items()}
    if "as_of" in batches[0]:
        b["as_of"] = batches[0]["as_of"][:4]
    return b


def _ort_fn(sess, names: list[str]):
    wanted = [i.name for i in sess.get_inputs()]

    def run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        feed = {n: batch[n].numpy() for n in names if n in wanted}
        return torch.from_numpy(sess.run(None, feed)[0])

    return run
