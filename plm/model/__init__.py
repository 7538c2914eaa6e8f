"""PLM model package: plain `nn.Module`s that run on one CPU (no Lightning, device or distributed
code here).

Public API
----------
- config: `ModelConfig` (+ `EmbeddingConfig`, `AttentionConfig`, `PositionConfig`, `FFNConfig`,
  `HeadsConfig`), `load_model_config(name_or_path)`, `model_config_from_dict(d)`.
- models: `PLMEncoder(cfg, field_vocab_sizes, numeric_fields=None)` and
  `PLMDecoder(cfg, field_vocab_sizes, numeric_fields=None)`;
  `forward(batch) -> ModelOutput(hidden (B,T,d), pooled (N,d)|None, aux_loss, valid)`,
  decoder `forward(batch, cache=None)` with `cache = decoder.new_cache(B, max_len)`;
  predictions: `model.heads(hidden) -> EventPredictions(logits, values, time)`.
- generation: `generate(decoder, prompt, n_events, temperature, top_k, top_p, ...)`.
- building blocks: `EventEmbedding`, `Attention`, `AttnContext`, `KVCache`, `Block`,
  `PositionEncoding` and the position functions in `plm.model.positions`.
- sizes: `python -m plm.model.flops` prints parameters and FLOPs per event of every named size.

The batch contract (keys, dtypes, padding and packing rules) is documented in `plm.model.batch`.
"""

from plm.model.attention import Attention, AttnContext, KVCache
from plm.model.batch import pack_sequences
from plm.model.config import (
    AttentionConfig,
    EmbeddingConfig,
    FFNConfig,
    HeadsConfig,
    ModelConfig,
    PositionConfig,
    load_model_config,
    model_config_from_dict,
)
from plm.model.embedding import EventEmbedding
from plm.model.generate import generate
from plm.model.heads import EventHeads, EventPredictions, ProjectionHead
from plm.model.layers import Block
from plm.model.model import EventTransformer, ModelOutput, PLMDecoder, PLMEncoder
from plm.model.positions import PositionEncoding

__all__ = [
    "Attention",
    "AttentionConfig",
    "AttnContext",
    "Block",
    "EmbeddingConfig",
    "EventEmbedding",
    "EventHeads",
    "EventPredictions",
    "EventTransformer",
    "FFNConfig",
    "HeadsConfig",
    "KVCache",
    "ModelConfig",
    "ModelOutput",
    "PLMDecoder",
    "PLMEncoder",
    "PositionConfig",
    "PositionEncoding",
    "ProjectionHead",
    "generate",
    "load_model_config",
    "model_config_from_dict",
    "pack_sequences",
]
