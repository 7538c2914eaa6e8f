"""Embedding export (`plm-export`): checkpoint -> user embeddings (Parquet per spec/outputs.md),
ONNX / int8 models, FAISS index, and the Spark-free `UserEmbedder` for raw events.

- `run_export(cfg: ExportConfig) -> dict` (the CLI's function), `read_identity(path)`.
- `UserEmbedder.from_files(ckpt, prepared_dir)`: raw events of a few users -> embeddings,
  identical to the batch path (`plm.export.service`).
- building blocks: `load_checkpoint`, `Embedder`, `quantize_int8`, `export_onnx` (`plm.export.model`).
"""

from plm.export.config import ExportConfig
from plm.export.model import Embedder, LoadedModel, load_checkpoint, quantize_int8
from plm.export.run import embedding_schema, read_identity, run_export
from plm.export.service import UserEmbedder

__all__ = [
    "Embedder",
    "ExportConfig",
    "LoadedModel",
    "UserEmbedder",
    "embedding_schema",
    "load_checkpoint",
    "quantize_int8",
    "read_identity",
    "run_export",
]
