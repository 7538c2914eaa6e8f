"""Parameter counts and a FLOPs-per-event estimate for model configs.

`python -m plm.model.flops [--context 512] [--vocab tokenizer.json]` prints a table for every
named size in conf/model/. Parameters are counted exactly by building the model on the `meta`
device (no memory is allocated); FLOPs are an analytic estimate (multiply-add = 2 FLOPs):

  forward FLOPs per event = 2 x (matmul weights an event passes through: q/k/v/o projections,
  feed-forward (top_k of n_experts for MoE), router, concat projection, heads)
  + attention scores and weighted sum: 4 x d_model x context per layer (context/2 for the causal decoder)

and a training step (forward + backward) is 3x the forward. Embedding lookups, norms and
softmaxes are ignored (they are memory-bound and small).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from plm.model.config import ModelConfig, load_model_config

SIZES = ("tiny", "small", "base", "large")

# Vocabulary sizes (incl. the 5 special ids) of a representative fitted tokenizer with the prep
# defaults (merchant capped at 20,000 values, 32 quantile bins per numeric field). The real sizes
# come from tokenizer.json; they only change the embedding and head parameter counts.
REFERENCE_VOCAB: dict[str, int] = {
    "event_type": 8, "hour": 29, "dow": 12, "currency": 45, "mcc": 305, "channel": 11, "status": 10,
    "merchant": 20_005, "country": 255, "country_foreign": 7, "device_new": 7, "auth_method": 10,
    "login_success": 7, "category": 30, "amount": 37, "n_items": 37, "log_dt": 37,
}
REFERENCE_NUMERIC = ("amount", "n_items", "log_dt")


def count_params(cfg: ModelConfig, vocab: dict[str, int] | None = None, numeric=REFERENCE_NUMERIC,
                 decoder: bool = False) -> dict[str, int]:
    """Exact parameter counts {embedding, trunk, heads, total} via a meta-device build."""
    from plm.model.model import PLMDecoder, PLMEncoder

    vocab = vocab or REFERENCE_VOCAB
    cls = PLMDecoder if decoder else PLMEncoder
    with torch.device("meta"):
        m = cls(cfg, vocab, [f for f in numeric if f in vocab])
    emb = sum(p.numel() for p in m.embed.parameters())
    if m.positions.absolute is not None:
        emb += m.positions.absolute.weight.numel()
    heads = sum(p.numel() for p in m.heads.parameters())  # tied tables are not registered in heads
    total = sum(p.numel() for p in m.parameters())
    return {"embedding": emb, "trunk": total - emb - heads, "heads": heads, "total": total}


def flops_per_event(cfg: ModelConfig, context: int = 512, decoder: bool = False,
                    vocab: dict[str, int] | None = None, with_heads: bool = True) -> dict[str, float]:
    """Analytic forward / training FLOPs per event at a given context length."""
    vocab = vocab or REFERENCE_VOCAB
    d, L = cfg.d_model, cfg.n_layers
    H, Hkv, D = cfg.attention.n_heads, cfg.kv_heads, cfg.head_dim
    h = cfg.ffn_hidden
    ffn_mats = (3 if cfg.ffn.kind == "swiglu" else 2) * d * h
    f = cfg.ffn
    n_moe = sum(1 for i in range(L) if f.n_experts and i % f.moe_every == f.moe_every - 1)
    per_layer_dense = d * (H + 2 * Hkv) * D + H * D * d + ffn_mats
    mats = L * per_layer_dense + n_moe * ((f.top_k - 1) * ffn_mats + d * f.n_experts)
    e = cfg.embedding
    if e.combine == "concat":
        mats += len(vocab) * e.field_dim * d
    ctx = context / 2 if decoder else context
    attn = 4 * d * ctx * L
    if not with_heads:
        heads = 0
    elif cfg.heads.tie:  # shared projection to the field width, then dot with each table
        w = d if e.combine == "sum" else e.field_dim
        heads = d * w + sum(vocab.values()) * w
    else:
        heads = sum(vocab.values()) * d
    fwd = 2 * (mats + heads) + attn
    return {"forward": fwd, "train": 3 * fwd, "matmul_weights": mats}


def table(context: int = 512, vocab: dict[str, int] | None = None, root: str | None = None,
          numeric=REFERENCE_NUMERIC) -> list[dict]:
    rows = []
    for name in SIZES:
        path = os.path.join(root, f"{name}.yaml") if root else name
        cfg = load_model_config(path)
        p = count_params(cfg, vocab, numeric)
        fl = flops_per_event(cfg, context, vocab=vocab)
        fl_dec = flops_per_event(cfg, context, decoder=True, vocab=vocab)
        rows.append({
            "size": name, "d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.attention.n_heads,
            "n_kv_heads": cfg.kv_heads, "ffn": f"{cfg.ffn.kind}:{cfg.ffn_hidden}", **p,
            "fwd_mflops_enc": fl["forward"] / 1e6, "train_mflops_enc": fl["train"] / 1e6,
            "fwd_mflops_dec": fl_dec["forward"] / 1e6,
        })
    return rows


def _fmt(n: float) -> str:
    return f"{n / 1e6:.2f}M"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Parameter counts and FLOPs per event of the named model sizes")
    ap.add_argument("--context", type=int, default=512, help="events of context for the attention FLOPs")
    ap.add_argument("--vocab", default=None, help="tokenizer.json to read field vocab sizes from (default: reference)")
    ap.add_argument("--json", action="store_true", help="print one JSON line per size instead of a table")
    args = ap.parse_args(argv)
    vocab, numeric = None, REFERENCE_NUMERIC
    if args.vocab:
        with open(args.vocab) as f:
            tok = json.load(f)
        vocab = {k: int(v) for k, v in (tok.get("vocab_sizes") or {}).items()} or None
        if vocab is None:
            raise SystemExit(f"{args.vocab}: no 'vocab_sizes' mapping found")
        numeric = tuple(tok.get("numeric", {})) or REFERENCE_NUMERIC
    rows = table(args.context, vocab, numeric=numeric)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    head = (f"{'size':6} {'d':>5} {'L':>3} {'H':>3} {'Hkv':>3} {'ffn':>12} {'embedding':>10} {'trunk':>9} "
            f"{'heads':>9} {'total':>9} {'enc fwd MFLOP/ev':>17} {'enc train MFLOP/ev':>19} {'dec fwd MFLOP/ev':>17}")
    print(f"parameters (reference vocabulary{' from ' + args.vocab if args.vocab else ''}) and FLOPs per event "
          f"(context {args.context} events; train = forward + backward = 3 x forward)")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['size']:6} {r['d_model']:5d} {r['n_layers']:3d} {r['n_heads']:3d} {r['n_kv_heads']:3d} {r['ffn']:>12} "
              f"{_fmt(r['embedding']):>10} {_fmt(r['trunk']):>9} {_fmt(r['heads']):>9} {_fmt(r['total']):>9} "
              f"{r['fwd_mflops_enc']:17.1f} {r['train_mflops_enc']:19.1f} {r['fwd_mflops_dec']:17.1f}")


if __name__ == "__main__":
    main()
