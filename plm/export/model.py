"""Load a trained checkpoint for inference and turn it into a user-embedding function.

- `load_checkpoint(path) -> LoadedModel`: `final.pt` written by `plm-train` (or a Lightning
  `.ckpt` file of a single-process/DDP run), always with `torch.load(..., weights_only=True)`.
- `Embedder(model, pooling)`: `forward(batch) -> (N, d) float32` user embeddings from an encoder
  or a decoder, with the pooling chosen at export time (`POOLINGS`).
- `OnnxEmbedder` / `onnx_input_names`: the same with positional tensor inputs (for ONNX).
- `quantize_int8(embedder)`: dynamic int8 quantisation of every `nn.Linear` (torch).

Pooling (`pooling=`): one part or several joined by `+` (their vectors concatenated, in that
order, from one forward pass), e.g. `model+recent` (the default), `mean+max`, `mean+asof+recent`.
Parts: `model` = what the model was trained with (encoder: its `pooling` config, i.e. mean / last
/ cls / attention, and `mean+asof` for a mean-pooled encoder trained with the as-of query;
decoder: `last`, the causal state that has read the whole history); `mean`, `last`, `max` over
the real events of each sequence (masked, padding never counts); `cls` / `attention` only for
encoders trained with that pooling (they need its weights); `recent` (= `recent14d`) or
`recent<N>d`: the events' states averaged with weights exp(-age / N days), age counted back from
the user's last event, i.e. an exponentially time-decayed mean that follows what the user did in
the last weeks (trend, fading activity), which the plain mean averages away over the whole window.
`bank` (encoders trained with `model.heads.membership_bank > 0`, which `model` then includes):
log1p of the summed ReLU detectors of the membership head over the user's events, a count of
each learned kind of event (a sum, so a rare burst is not divided by the history's length).
`mean_asof` is the older spelling of `mean+asof`.

As-of poolings (encoders with time-aware positions): one query event is appended to every
sequence at the as-of time (the cut-off), every field MASK, only its time known; `asof` = the
encoder's state at that event (what the model expects to happen next, given the history and the
time elapsed since its last event: recency and hazard, which mean pooling cannot see); with
other parts (`mean+asof`) they come from the same forward pass (bidirectional: the history's
states also see the query). The query is what `objective.masked.last_prob` trains
(`last_jitter` makes its time a censored gap, as at a cut-off).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from plm.data.collate import ID_COLUMNS, VALUE_COLUMNS
from plm.model import PLMDecoder, PLMEncoder, model_config_from_dict
from plm.model.batch import MASK, value_key
from plm.train.config import trains_as_of_query

POOLING_PARTS = ("model", "mean", "last", "max", "cls", "attention", "asof", "recent", "bank")
POOLING_ALIASES = {"mean_asof": "mean+asof"}
DEFAULT_POOLING = "model+recent"
RECENT_DAYS = 14.0  # time constant of `recent` without a suffix
_RECENT = re.compile(r"recent(?:(\d+(?:\.\d+)?)d)?")
DAY_US = 86_400_000_000


@dataclass
class LoadedModel:
    model: nn.Module  # PLMEncoder or PLMDecoder, eval mode, fp32, CPU
    arch: str  # "encoder" | "decoder"
    model_config: dict
    vocab_sizes: dict[str, int]
    numeric_fields: list[str]
    path: str
    sha256: str  # of the checkpoint file: which weights made an embedding
    max_len: int = 0  # sequence length it was trained / evaluated with (0 = not recorded)
    as_of_query: bool = False  # trained with the as-of query (objective.masked.last_prob > 0)
    tokenizer_sha256: str | None = None  # of the training data's tokenizer.json (None: not recorded)


def check_tokenizer(loaded: LoadedModel, tokenizer_sha256: str, where: str) -> None:
    """The token ids of `where` must mean what the model learnt: same tokenizer.json bytes as the
    training data's (when the checkpoint records it; plm-prep tokenizer=PATH copies it unchanged)."""
    if loaded.tokenizer_sha256 and loaded.tokenizer_sha256 != tokenizer_sha256:
        raise ValueError(
            f"checkpoint {loaded.path} was trained on another tokenizer.json than {where} (sha256 "
            f"{loaded.tokenizer_sha256[:12]}... vs {tokenizer_sha256[:12]}...): its token ids would not mean what "
            "the model learnt. Use the prepared folder the model was trained on, or prepare this data with its "
            "tokenizer: plm-prep raw=... out=... tokenizer=<the training prepared folder>")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def load_checkpoint(path: str | Path) -> LoadedModel:
    """A `final.pt` of `plm-train` (keys model, model_config, vocab_sizes, numeric_fields, arch) or
    a Lightning checkpoint file (`checkpoints/*.ckpt`, hyper-parameters + `net.model.*` weights).
    A run folder is accepted too (its `final.pt`)."""
    p = Path(path)
    if p.is_dir():
        if (p / "final.pt").exists():
            p = p / "final.pt"
        else:
            raise FileNotFoundError(f"{path} is a folder without final.pt: pass ckpt=RUN_DIR/final.pt or a .ckpt file")
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if p.is_dir():  # pragma: no cover - handled above
        raise ValueError(f"{p} is a folder")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - rewrap with the path
        raise ValueError(f"cannot load checkpoint {p} with weights_only=True: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {p} is not a dict")
    if "model" in obj and "model_config" in obj:
        sd, mcfg, vocab, numeric, arch = (obj["model"], obj["model_config"], obj["vocab_sizes"],
                                          obj["numeric_fields"], obj.get("arch", "encoder"))
        max_len = int(obj.get("max_len", 0) or 0)
        as_of_query = bool(obj.get("as_of_query", False))
        tok_sha = obj.get("tokenizer_sha256")
    elif "state_dict" in obj and "hyper_parameters" in obj:
        hp = obj["hyper_parameters"]
        missing = [k for k in ("model_cfg", "vocab_sizes", "numeric_fields") if k not in hp]
        if missing:
            raise ValueError(f"Lightning checkpoint {p} lacks hyper-parameters {missing}: not a plm-train checkpoint")
        prefix = "net.model."
        sd = {k[len(prefix):]: v for k, v in obj["state_dict"].items() if k.startswith(prefix)}
        if not sd:
            raise ValueError(f"Lightning checkpoint {p} has no '{prefix}*' weights")
        mcfg, vocab, numeric = hp["model_cfg"], hp["vocab_sizes"], hp["numeric_fields"]
        dm = obj.get("datamodule_hyper_parameters") or {}
        max_len = int(dm.get("eval_max_len", 0) or dm.get("max_len", 0) or 0)
        arch = hp.get("arch", "auto")
        tok_sha = hp.get("tokenizer_sha256")
        masked = (hp.get("objective") or {}).get("masked") or {}
        as_of_query = trains_as_of_query(masked)
        if arch == "auto":  # checkpoints before the resolved arch was saved: the weights decide, as in training
            arch = "decoder" if float(((hp.get("objective") or {}).get("next") or {}).get("weight", 0) or 0) > 0 else "encoder"
    else:
        raise ValueError(f"checkpoint {p} is neither a plm-train final.pt nor a Lightning checkpoint "
                         f"(keys: {sorted(obj)[:8]})")
    if arch not in ("encoder", "decoder"):
        raise ValueError(f"checkpoint {p}: unknown arch {arch!r}")
    mcfg = _inference_backend(dict(mcfg), p)
    cfg = model_config_from_dict(dict(mcfg))
    cls = PLMDecoder if arch == "decoder" else PLMEncoder
    model = cls(cfg, dict(vocab), list(numeric))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {p} does not fit the model it describes: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.eval()
    return LoadedModel(model, arch, dict(mcfg), {k: int(v) for k, v in vocab.items()}, list(numeric), str(p),
                       file_sha256(p), max_len, as_of_query, tok_sha)


def _inference_backend(mcfg: dict, path: Path) -> dict:
    """A model trained with attention.backend=xformers (CUDA kernels only) is embedded with SDPA
    where xformers cannot run (no CUDA device, or the package missing): the backend is how
    attention is computed, not what, so the weights give the same vectors. Said once, on stderr."""
    att = dict(mcfg.get("attention") or {})
    if att.get("backend") != "xformers":
        return mcfg
    try:
        import xformers.ops  # noqa: F401, PLC0415

        usable = torch.cuda.is_available()
    except ImportError:
        usable = False
    if usable:
        return mcfg
    print(f"plm: {path} was trained with attention.backend=xformers, which needs CUDA and the xformers "
          "package; this process computes the same attention with sdpa", file=sys.stderr)
    return {**mcfg, "attention": {**att, "backend": "sdpa"}}


def split_pooling(pooling: str) -> list[str]:
    """`pooling=` -> its parts (aliases expanded, `recent` written `recent<N>d`); a ValueError
    naming the bad part. Model-independent (config checks)."""
    parts = []
    for raw in pooling.split("+"):
        for p in POOLING_ALIASES.get(raw.strip(), raw.strip()).split("+"):
            days = recent_days(p)
            if days is not None:
                if days <= 0:
                    raise ValueError(f"pooling={pooling!r}: {p} needs a time constant > 0 days")
                p = f"recent{days:g}d"
            elif p not in POOLING_PARTS:
                raise ValueError(f"pooling={pooling!r}: {p!r} is not one of {POOLING_PARTS} "
                                 "(or recent<N>d); join several with '+', e.g. model+recent")
            parts.append(p)
    return parts


def recent_days(part: str) -> float | None:
    """The time constant (days) of a `recent` / `recent<N>d` part, None for other parts."""
    m = _RECENT.fullmatch(part)
    if not m:
        return None
    return float(m.group(1)) if m.group(1) else RECENT_DAYS


def resolve_pooling(model: nn.Module, pooling: str, as_of_query: bool = False) -> str:
    """The concrete pooling for `model`, parts joined by `+` (see the module docstring); a clear
    error if impossible. `as_of_query`: the encoder was trained with the as-of query, so `model`
    means `mean+asof`."""
    decoder = isinstance(model, PLMDecoder)
    if decoder:
        trained = "last"
    elif as_of_query and model.cfg.pooling == "mean" and model.positions.needs_time:
        trained = "mean+asof"
    else:
        trained = model.cfg.pooling
    if not decoder and has_bank(model):
        trained += "+bank"
    asked = split_pooling(pooling)
    parts: list[str] = []
    for p in (q for part in asked for q in (trained.split("+") if part == "model" else [part])):
        if p in parts:
            raise ValueError(f"pooling={pooling!r} gives {p} twice" + (f" (model means {trained})" if "model" in asked else ""))
        parts.append(p)
    for p in parts:
        what = f"pooling={pooling}" if pooling == p else f"pooling={pooling}: {p}"
        if p == "asof":
            if decoder:
                raise ValueError(f"{what} needs an encoder (its as-of query is a masked event); "
                                 "a decoder's `last` state already reads the whole history")
            if not model.positions.needs_time:
                raise ValueError(f"{what} needs time-aware positions (model.position.rope=time|both or "
                                 f"a time_* bias): with position.rope={model.cfg.position.rope}, "
                                 f"bias={model.cfg.position.bias!r} the query event would not know the as-of time")
        if p == "bank" and (decoder or not has_bank(model)):
            raise ValueError(f"{what} needs an encoder trained with a membership bank "
                             "(model.heads.membership_bank > 0 and objective.masked.membership_weight > 0)")
        if p in ("cls", "attention"):
            if decoder or model.cfg.pooling != p:
                raise ValueError(f"{what} needs an encoder trained with pooling={p} "
                                 f"(this {'decoder' if decoder else 'encoder'} was trained with "
                                 f"{'none' if decoder else model.cfg.pooling}); use mean, last, max, recent<N>d, asof and bank "
                                 "(encoders that have them) or model")
            if "asof" in parts:
                raise ValueError(f"pooling={pooling}: the model's {p} pooling would also read the as-of query "
                                 f"event; export asof and {p} separately")
    return "+".join(parts)


def check_positions(model: nn.Module, pooling: str, max_len: int) -> None:
    """The as-of query is one more event after a history of up to `max_len`: a model with learned
    absolute positions needs a row for it (else a ValueError naming the fix, before any batch)."""
    pos = model.cfg.position
    if "asof" in pooling.split("+") and pos.absolute == "learned" and max_len >= pos.max_len:
        raise ValueError(f"pooling={pooling}: the as-of query comes after up to max_len={max_len} events, at position "
                         f"{max_len}, and the model's learned absolute positions stop at position.max_len="
                         f"{pos.max_len}: export with max_len={pos.max_len - 1} (the most recent "
                         f"{pos.max_len - 1} events), or without asof")


def has_bank(model: nn.Module) -> bool:
    """The encoder has the membership head's event-count detectors (`bank` pooling)."""
    head = getattr(model, "membership", None)
    return head is not None and head.bank is not None


def masked_pool(h: Tensor, mask: Tensor, kind: str, ts: Tensor | None = None) -> Tensor:
    """(B, T, d) hidden states, (B, T) bool mask of real events -> (B, d) pooled over real events.
    `recent<N>d` also needs `ts` ((B, T) epoch µs). Written with masks only (no data-dependent
    indexing) so it exports to ONNX."""
    m = mask.to(h.dtype)[..., None]  # (B, T, 1)
    if kind == "mean":
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)
    if kind == "max":
        return h.masked_fill(~mask[..., None], float("-inf")).amax(1)
    if kind == "last":
        T = h.shape[1]
        pos = torch.arange(T, device=h.device)[None].expand_as(mask)
        last = torch.where(mask, pos, torch.zeros_like(pos)).amax(1)  # (B,) index of the last real event
        return h.gather(1, last[:, None, None].expand(-1, 1, h.shape[-1]))[:, 0]
    days = recent_days(kind)
    if days is not None:
        if ts is None:
            raise ValueError(f"masked_pool: {kind} needs the events' ts")
        # float64 holds epoch µs exactly; the age is counted from the row's last real event, so
        # the newest event weighs 1 and the sum of weights is >= 1 (no underflow to 0/0)
        t = ts.double()
        last = t.masked_fill(~mask, float("-inf")).amax(1, keepdim=True)
        w = torch.where(mask, torch.exp((t - last) / (days * DAY_US)), torch.zeros_like(t)).to(h.dtype)[..., None]
        return (h * w).sum(1) / w.sum(1).clamp(min=1e-30)
    raise ValueError(f"masked_pool: unknown kind {kind!r}")


def append_as_of(batch: dict[str, Tensor], as_of: Tensor, fields: list[str]) -> tuple[dict[str, Tensor], Tensor]:
    """Right-padded (B, T) batch -> (B, T + 1) batch with a query event right after each row's
    last real event: every field in `fields` MASK (values 0), `ts` = `as_of` (B,) epoch µs,
    position = the row's length; and the (B,) column of that event. Masks and scatters only (no
    data-dependent shapes), so it exports to ONNX."""
    mask = batch["attention_mask"].bool()
    n = mask.long().sum(1)  # (B,) real events; rows are right-padded
    idx = n[:, None]
    out = {}
    for k, v in batch.items():
        if isinstance(v, Tensor) and v.dim() == 2:
            out[k] = torch.cat([v, torch.zeros_like(v[:, :1])], dim=1)
    for f in fields:
        out[f] = out[f].scatter(1, idx, torch.full_like(idx, MASK).to(out[f].dtype))
        vk = value_key(f)
        if vk in out:
            out[vk] = out[vk].scatter(1, idx, torch.zeros_like(idx).to(out[vk].dtype))
    out["ts"] = out["ts"].scatter(1, idx, as_of.to(out["ts"].dtype)[:, None])
    out["attention_mask"] = out["attention_mask"].scatter(1, idx, torch.ones_like(idx, dtype=torch.bool))
    if "positions" in out:
        out["positions"] = out["positions"].scatter(1, idx, idx.to(out["positions"].dtype))
    return out, n


class Embedder(nn.Module):
    """`Embedder(model, pooling, as_of_us)(batch) -> (N, d)` float32 user embeddings.

    `batch` follows `plm.model.batch` and must be unpacked (one sequence per row, `attention_mask`
    marks real events, right padding), which is what the export loaders produce (bucketed batches).
    The as-of poolings read the as-of time from `batch["as_of"]` ((B,) epoch µs) if present, else
    from `as_of_us` (the export's cut-off)."""

    def __init__(self, model: nn.Module, pooling: str = DEFAULT_POOLING, as_of_us: int | None = None,
                 as_of_query: bool = False):
        super().__init__()
        self.model = model
        self.pooling = resolve_pooling(model, pooling, as_of_query)
        self.parts = self.pooling.split("+")
        self.as_of_us = None if as_of_us is None else int(as_of_us)
        self.fields = [f for f in getattr(model, "field_vocab_sizes", {})]

    @property
    def needs_as_of(self) -> bool:
        return "asof" in self.parts

    @property
    def dim(self) -> int:
        d = int(self.model.cfg.d_model)
        return sum(self.model.membership.bank.out_features if p == "bank" else d for p in self.parts)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        if "segment_ids" in batch:
            raise ValueError("Embedder takes unpacked batches (batch_mode=bucketed)")
        mask = batch["attention_mask"].bool()
        state = None
        if self.needs_as_of:
            out, state = self._as_of_forward(batch)
            h = out.hidden[:, :-1]  # the query sits right after each row's events, outside `mask`
        else:
            out = self.model(batch)
            h = out.hidden
        vecs = []
        for p in self.parts:
            if p == "asof":
                vecs.append(state)
            elif p in ("cls", "attention"):
                vecs.append(out.pooled)
            elif p == "bank":
                vecs.append(self.model.membership.counts_rows(h, mask).to(h.dtype))
            else:
                vecs.append(masked_pool(h, mask, p, batch["ts"]))
        return (vecs[0] if len(vecs) == 1 else torch.cat(vecs, dim=-1)).float()

    def _as_of_forward(self, batch: dict[str, Tensor]):
        """The model's output on the batch with the as-of query appended, and the query's state."""
        mask = batch["attention_mask"].bool()
        if "as_of" in batch:
            as_of = batch["as_of"].long().reshape(-1)
        elif self.as_of_us is not None:
            as_of = torch.full((mask.shape[0],), self.as_of_us, dtype=torch.long, device=mask.device)
        else:
            raise ValueError(f"pooling={self.pooling} needs the as-of time: Embedder(as_of_us=...) or batch['as_of']")
        fields = [f for f in self.fields if f in batch]
        query, n = append_as_of({k: v for k, v in batch.items() if k != "as_of"}, as_of, fields)
        out = self.model(query)
        h = out.hidden  # (B, T + 1, d)
        return out, h.gather(1, n[:, None, None].expand(-1, 1, h.shape[-1]))[:, 0]


# ------------------------------------------------------------------------------------ ONNX

TENSOR_INPUTS_TAIL = ("ts", "positions", "attention_mask")


def onnx_input_names(vocab_sizes: dict[str, int], numeric_fields: list[str], as_of: bool = False) -> list[str]:
    """The ONNX graph's inputs, in order: every id column the model embeds, the value columns of
    its numeric fields, then ts (int64 us), positions (int64) and attention_mask (bool), all (B, T);
    with an as-of pooling, last `as_of` (B,) int64 epoch µs."""
    ids = [c for c in ID_COLUMNS if c in vocab_sizes]
    vals = [c for c in VALUE_COLUMNS if c.removesuffix("_value") in numeric_fields]
    return ids + vals + list(TENSOR_INPUTS_TAIL) + (["as_of"] if as_of else [])


class OnnxEmbedder(nn.Module):
    """`Embedder` with positional (B, T) tensor inputs named by `onnx_input_names`."""

    def __init__(self, embedder: Embedder, names: list[str], normalize: bool = False):
        super().__init__()
        self.embedder = embedder
        self.names = list(names)
        self.normalize = normalize

    def forward(self, *tensors: Tensor) -> Tensor:
        e = self.embedder(dict(zip(self.names, tensors)))
        return torch.nn.functional.normalize(e, dim=-1) if self.normalize else e


ONNX_MIN_OPSET = 18  # the oldest opset torch.onnx's (dynamo) exporter writes
ONNX_FUSED_ATTENTION_OPSET = 23  # ONNX `Attention` and `RMSNormalization`: fused kernels in ONNX Runtime


def check_onnx_opset(opset: int) -> None:
    """A ValueError for an opset torch.onnx's exporter cannot write (plm-export checks it before
    anything loads; `export_onnx` for library callers)."""
    if opset < ONNX_MIN_OPSET:
        raise ValueError(f"opset={opset}: ONNX export needs opset >= {ONNX_MIN_OPSET} (torch.onnx's exporter); "
                         f"{ONNX_FUSED_ATTENTION_OPSET} (the default) gives ONNX Runtime (>= 1.23) a fused "
                         "attention kernel")


def export_onnx(embedder: Embedder, sample: dict[str, Tensor], names: list[str], path: str | Path,
                opset: int = ONNX_FUSED_ATTENTION_OPSET, normalize: bool = False) -> None:
    """Write `embedder` as an ONNX graph with dynamic batch and sequence axes (`normalize`: the
    graph L2-normalises its output, like `plm-export normalize=true`). `sample` must have
    padding (some attention_mask False) so that the traced graph is the masked path, valid for
    any batch.

    torch.onnx's exporter (`torch.export`, then onnxscript). From opset 23 attention is one ONNX
    `Attention` node per block, which ONNX Runtime (>= 1.23) runs as a fused kernel: on the demo
    checkpoint 1.12x eager PyTorch, against 0.81x for the opset-17 graph of the TorchScript
    exporter with attention spelled out as MatMul/Softmax (README, export bench). Opsets 18-22
    spell attention out, for runtimes older than opset 23."""
    check_onnx_opset(opset)
    if bool(sample["attention_mask"].all()):
        raise ValueError("export_onnx: the sample batch needs at least one padded position")
    wrapped = OnnxEmbedder(embedder, names, normalize).eval()
    args = tuple(sample[n] for n in names)
    batch, events = torch.export.Dim("batch"), torch.export.Dim("events")
    shapes = tuple({0: batch} if n == "as_of" else {0: batch, 1: events} for n in names)
    with torch.no_grad(), _quiet_onnx_exporter():
        program = torch.onnx.export(wrapped, args, input_names=names, output_names=["embedding"],
                                    dynamic_shapes=(shapes,), opset_version=opset, dynamo=True, verbose=False)
    graph = program.model.graph
    out = graph.outputs[0]
    for node in graph.all_nodes():  # an inner value named after `F.embedding` would clash with the output
        for v in node.outputs:
            if v is not out and v.name == out.name:
                v.name = f"{v.name}_inner"
    program.save(str(path))


@contextlib.contextmanager
def _quiet_onnx_exporter():
    """torch.onnx's exporter prints its steps and warns about torchvision and deprecated pytree
    calls inside torch; none of it is for a user of plm-export (failures still raise)."""
    import logging

    # onnx_ir's graph passes log one INFO line per deduplicated constant (hundreds), which hydra's
    # INFO root handler printed
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.onnx._internal.exporter._registration",
                                              "onnxscript", "onnx_ir", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.(onnx|export|_export)")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def int8_engine() -> str:
    """The quantized engine for dynamic int8 on this CPU: oneDNN on x86 CPUs with VNNI (int8 dot
    products; AMX tiles on recent Xeons), where its int8 GEMMs ran 1.5x faster than x86's and a
    whole export 8-12% faster, and with AVX2 or AVX-512 (an AMD EPYC with AVX2 only: `small`
    exported 9-12% faster than with x86 in three interleaved rounds, same agreement; README,
    export bench); else x86 / fbgemm, else qnnpack."""
    engines = torch.backends.quantized.supported_engines
    vnni = getattr(torch.cpu, "_is_vnni_supported", lambda: False)()
    simd = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    for name, ok in (("onednn", vnni or simd), ("x86", True), ("fbgemm", True), ("qnnpack", True)):
        if ok and name in engines:
            return name
    raise RuntimeError(f"quantize=int8: this torch build has no quantized engine ({engines})")


def quantize_int8(embedder: Embedder) -> Embedder:
    """Dynamic int8 quantisation (weights int8 per output channel, activations quantised per
    batch) of the `nn.Linear` layers of the transformer blocks; embedding tables, value encoders,
    norms and attention products stay fp32. Returns a new module."""
    import copy

    from torch.ao.quantization import quantize_dynamic

    torch.backends.quantized.engine = int8_engine()
    from torch.ao.quantization import per_channel_dynamic_qconfig

    # Only the transformer blocks' projections (where the FLOPs are), with per-output-channel
    # weight scales; the small value encoders of the event embedding and the heads stay fp32.
    spec = {name: per_channel_dynamic_qconfig for name, m in embedder.named_modules()
            if isinstance(m, nn.Linear) and ".blocks." in f".{name}"}
    with warnings.catch_warnings():
        # torch 2.13 deprecates the quantized tensor type that torch.ao's dynamic int8 stores its
        # weights in (pytorch#184982; torchao replaces it). It works, and a user of plm-export
        # cannot act on the warning; moving to torchao is a decision for the project.
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*deprecated")
        return quantize_dynamic(copy.deepcopy(embedder), spec, dtype=torch.qint8)


def compile_embedder(embedder: nn.Module) -> nn.Module:
    """`torch.compile` (inductor, dynamic batch and sequence sizes) of an `Embedder`, fp32 or int8
    (`trainer.compile=true` in plm-export). Compilation happens at the first call (tens of seconds on
    CPU, a C++ compiler is needed; Triton on CUDA); it fuses the element-wise tail (RoPE, SwiGLU,
    norms, pooling) around the matrix products, which is what int8 leaves in fp32: `small` on 1,077
    users here, eager fp32 87 users/s, eager int8 134, compiled fp32 120, compiled int8 172 (README)."""
    return torch.compile(embedder, dynamic=True)


def first_call(what: str, fn):
    """Run `fn()` (the first call of a compiled model), turning a compiler failure into one clear
    error that says how to run without it."""
    try:
        return fn()
    except Exception as e:  # inductor/dynamo raise many types; all mean "this machine cannot compile"
        if not type(e).__module__.startswith("torch._"):
            raise
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise RuntimeError(f"{what}: torch.compile failed ({type(e).__name__}: {first}); it needs a working "
                           "C++ compiler on CPU (Triton on CUDA); run with trainer.compile=false") from e


def cosine_agreement(a: Tensor, b: Tensor) -> dict[str, float]:
    """Row-wise cosine similarity of two (N, d) embedding matrices: min / mean / p01."""
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)
    return {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
            "cosine_p01": float(torch.quantile(cos, 0.01)), "n": int(len(cos))}


def _in_blocks(node) -> bool:
    """Whether an ONNX node of `export_onnx`'s graph comes from a transformer block: the module
    path torch.onnx's exporter records in the node's metadata (`pkg.torch.onnx.name_scopes`)."""
    scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
    return ".blocks." in scopes


def quantize_onnx_int8(src: str | Path, dst: str | Path) -> None:
    """onnxruntime dynamic int8 of an exported graph, as `quantize_int8`: only the projections of
    the transformer blocks (MatMul/Gemm with a weight initializer), per-channel weight scales.

    Weights use 7 bits (`reduce_range`). ONNX Runtime's u8 x s8 kernels on x86 CPUs without VNNI
    (AVX2, AVX-512 before VNNI) add pairs of products in int16, which saturates at full 8-bit
    range. On an AMD EPYC (AVX2), the demo checkpoint's int8 graph agreed with fp32 at cosine min
    0.963 over 1,077 users with 8 bits and 0.99996 with 7 bits. A graph is quantised once and may
    run on other CPUs, so it is always 7 bits, not chosen by the CPU it was exported on."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(src)).graph
    weights = {w.name for w in graph.initializer}
    nodes = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and _in_blocks(n)
             and any(i in weights for i in n.input)]
    if not nodes:
        raise RuntimeError(f"{src}: no block projection found to quantise (unexpected node names)")
    import logging

    root = logging.getLogger()
    level = root.level
    # ORT logs one INFO line per fp32 tensor, and advice to pre-process the graph (shape inference
    # for convolutional nets), on the root logger
    root.setLevel(max(level, logging.ERROR))
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                         nodes_to_quantize=nodes)
    finally:
        root.setLevel(level)
