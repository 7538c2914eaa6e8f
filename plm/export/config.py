"""`ExportConfig`: the typed schema of `plm-export` (values in `conf/export.yaml`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from plm.config import SparkConfig
from plm.train.config import TrainerConfig

FORMATS = ("parquet", "onnx")
# The keys of the shared `trainer` group that plm-export reads; the others (max_steps, checkpoints,
# ...) train, so giving one to plm-export is an error rather than an ignored option.
EXPORT_TRAINER_KEYS = ("accelerator", "devices", "num_nodes", "strategy", "process_group_backend", "precision",
                       "num_threads", "enable_progress_bar", "compile")
QUANTIZE = ("none", "int8")
INDEXES = ("none", "flat", "hnsw")


@dataclass
class ExportConfig:
    """`plm-export ckpt=RUN/final.pt data=PREPARED out=PATH [pooling=...] [quantize=int8] [format=onnx]`."""

    ckpt: str = MISSING  # final.pt of plm-train (or a run folder holding one, or a Lightning .ckpt file)
    data: str = MISSING  # folder written by plm-prep (manifest.json, tokenizer.json, shards)
    out: str = MISSING  # format=parquet: a folder of Parquet parts; format=onnx: a folder for model.onnx
    overwrite: bool = False
    format: str = "parquet"  # parquet (embeddings per spec/outputs.md) | onnx (the encoder as an ONNX graph)
    quantize: str = "none"  # none | int8 (dynamic int8 of every Linear; agreement with fp32 is checked)
    # parts joined by '+': model | mean | last | max | cls | attention | asof | recent | recent<N>d | bank
    # (plm.export.model); default: what the model was trained with + the time-decayed recent mean
    pooling: str = "model+recent"
    normalize: bool = False  # L2-normalise every embedding (cosine = dot product)
    splits: str = "train,val,test"  # users of these splits (each user is in exactly one split)
    max_len: int = 0  # most recent events per user; 0 = the length the model was trained on
    # padded events per batch (B x T), bounds memory; 0 = sized for the device (auto_max_tokens:
    # 32768 on a GPU; on CPU ~2^18 / d_model, 4096 for d=64, which keeps a layer in cache)
    max_tokens: int = 0
    read_rows: int = 1024  # rows per Arrow record batch when reading shards
    row_group_size: int = 8192  # embeddings per Parquet row group (rows buffered before a write)
    index: str = "none"  # none | flat (exact cosine) | hnsw: a FAISS index beside the Parquet (faiss-cpu)
    min_cosine: float = 0.99  # quantize/onnx: fail if any checked user's cosine with fp32 is lower
    agreement_users: int = 512  # users compared with the fp32 model (spread over the first block's lengths)
    opset: int = 23  # ONNX opset, >= 18; 23+: one fused Attention node per block (ONNX Runtime >= 1.23)
    progress: bool = True  # progress bar
    # raw=DIR: embed the raw tables of DIR ({payments,logins,orders}/*.parquet, any Hadoop-FS URI)
    # with Spark (plm.export.spark.embed_raw_spark) instead of data='s shards; `data` still gives
    # the tokenizer and window settings. Only with raw: cutoff (default: data's cut-off),
    # partitions, rows_per_call, spark.* (as plm-prep's: master, conf, log_level).
    raw: str = ""
    cutoff: str = ""
    partitions: int = 0  # partitions by user_id; 0 = sized by Spark's adaptive execution
    rows_per_call: int = 200_000  # raw rows handed to the model at once per Spark task
    spark: SparkConfig = field(default_factory=lambda: SparkConfig(app_name="plm-export"))
    # The hardware keys of plm-train's trainer group (trainer=cpu|gpu|ddp|...): accelerator, devices,
    # num_nodes, strategy (auto | ddp), precision, process_group_backend, num_threads,
    # enable_progress_bar, and compile (torch.compile the embedder, fp32 or int8: a one-off
    # compilation, then faster batches; checked against eager fp32 like int8). Its training keys
    # (max_steps, checkpoints, ...) have no role in export: plm-export refuses them on the
    # command line (check_trainer_overrides).
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


ConfigStore.instance().store(name="export_schema", node=ExportConfig)


def check_trainer_overrides(overrides: list[str], raw: bool = False) -> None:
    """Command-line overrides (`trainer.max_steps=5`, `+trainer.x=1`, `~trainer.y`) that set a
    training-only key of the trainer group: a ValueError naming them (export would ignore them).
    With raw=DIR Spark runs the model, so every trainer key is refused."""
    bad = []
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if raw and (key == "trainer" or key.startswith("trainer.")):
            raise ValueError(f"{key}: with raw=DIR Spark runs the model on its executors (spark.master, "
                             "spark.conf, spark.task.cpus threads per task); the trainer group has no role")
        if key.startswith("trainer.") and key.split(".")[1] not in EXPORT_TRAINER_KEYS:
            bad.append(key)
    if bad:
        raise ValueError(f"{', '.join(bad)}: plm-export reads only trainer.{{{','.join(EXPORT_TRAINER_KEYS)}}} "
                         "of the trainer group; the other keys train (drop them)")
