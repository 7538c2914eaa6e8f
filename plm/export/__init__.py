"""Embedding export (`plm-export`): checkpoint -> user embeddings (Parquet per spec/outputs.md),
ONNX / int8 models, FAISS index, and the Spark-free `UserEmbedder` for raw events.

- `run_export(cfg: ExportConfig) -> dict` (the CLI's function), `read_identity(path)`.
- `UserEmbedder.from_files(ckpt, prepared_dir)`: raw events of a few users -> embeddings,
  identical to the batch path (`plm.export.service`).
- `plm.export.spark.embed_raw_spark(sources, ckpt, prepared_dir, cutoff)`: raw contract
  DataFrames -> an embeddings DataFrame computed on a Spark cluster's executors (same vectors).
- building blocks: `load_checkpoint`, `Embedder`, `quantize_int8`, `export_onnx` (`plm.export.model`).

Attributes are imported on first use, so `plm.export.config` (read by every CLI) stays light.
"""

from importlib import import_module

_WHERE = {
    "ExportConfig": "plm.export.config",
    "Embedder": "plm.export.model",
    "LoadedModel": "plm.export.model",
    "load_checkpoint": "plm.export.model",
    "quantize_int8": "plm.export.model",
    "embedding_schema": "plm.export.run",
    "read_identity": "plm.export.run",
    "run_export": "plm.export.run",
    "UserEmbedder": "plm.export.service",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'plm.export' has no attribute {name!r}")
