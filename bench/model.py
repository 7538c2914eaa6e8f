"""Model benchmark (issue #3): our encoder/decoder against Hugging Face models of identical shape.

    .venv/bin/python bench/model.py            # full run (a few minutes on 2 cores)
    .venv/bin/python bench/model.py --quick    # small shapes, few steps (smoke test)
    .venv/bin/python bench/model.py --only encoder_fixed_len,kv_cache_decode

Everything runs in one process with the same thread count and the same batches; each figure is
the median of many timed steps after warm-up, and the models of one comparison are timed
interleaved (A, B, A, B, ...) so that load from other processes hits both alike. Each comparison
prints a human-readable line and one JSON line:
    {"bench": ..., "ours": ..., "reference": ..., "unit": ..., "ratio": ours/reference, "target": ...}
(higher ratio is better; target = least acceptable ratio).

Comparisons (training = forward + backward, dropout off in both, random init, no hub download):
- encoder_fixed_len: PLMEncoder vs BertModel (SDPA) of identical layers/width/heads/FFN, fixed-length batch;
- encoder_time_rope / encoder_time_alibi / encoder_time_bucket: time-aware position schemes vs
  our plain encoder (cost of time awareness, target 0.9 = at most 10% slower);
- encoder_packed: long-tailed length mix, our packed rows vs BertModel padded to the batch
  maximum, real events per second;
- decoder_fixed_len / decoder_gqa: PLMDecoder (MHA / 4x fewer KV heads) vs GPT2Model;
- kv_cache_decode: generating one event with the KV cache vs recomputing the whole 512-event
  context (per generated event, heads and sampling included).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch

from plm.model import (
    AttentionConfig,
    EmbeddingConfig,
    FFNConfig,
    HeadsConfig,
    ModelConfig,
    PLMDecoder,
    PLMEncoder,
    PositionConfig,
)
from plm.model.batch import pack_sequences
from plm.model.flops import REFERENCE_NUMERIC, REFERENCE_VOCAB
from plm.model.generate import sample_event
from plm.model.testing import random_batch, take

RESULTS: list[dict] = []


# ----------------------------------------------------------------------------- helpers


def timed_interleaved(fns: dict[str, callable], steps: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each fn, calls interleaved round-robin."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(steps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def report(bench: str, ours: float, reference: float, unit: str, target: float, note: str = "") -> None:
    ratio = ours / reference
    ok = "ok" if ratio >= target else "MISSED"
    print(f"{bench:22s} ours {ours:12.1f} {unit}  reference {reference:12.1f} {unit}  "
          f"ratio {ratio:5.2f} (target >= {target}) {ok} {note}")
    line = {"bench": bench, "ours": round(ours, 1), "reference": round(reference, 1), "unit": unit,
            "ratio": round(ratio, 3), "target": target}
    RESULTS.append(line)
    print(json.dumps(line), flush=True)


def our_cfg(a, pos: PositionConfig, n_heads: int, n_kv_heads: int = 0) -> ModelConfig:
    """Shape-identical to the HF reference: LayerNorm, GELU FFN of 4*d, biases, no dropout."""
    return ModelConfig(
        d_model=a.d_model, n_layers=a.n_layers, norm="layernorm", norm_eps=1e-12, dropout=0.0,
        embedding=EmbeddingConfig(numeric="both", combine="sum"),
        attention=AttentionConfig(n_heads=n_heads, n_kv_heads=n_kv_heads, bias=True),
        position=pos, ffn=FFNConfig(kind="gelu", hidden=4 * a.d_model, bias=True),
        heads=HeadsConfig(),
    )


def bert(a, n_heads: int):
    from transformers import BertConfig, BertModel

    c = BertConfig(vocab_size=sum(REFERENCE_VOCAB.values()), hidden_size=a.d_model, num_hidden_layers=a.n_layers,
                   num_attention_heads=n_heads, intermediate_size=4 * a.d_model, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0, max_position_embeddings=max(512, a.max_len))
    c._attn_implementation = "sdpa"
    return BertModel(c, add_pooling_layer=False).train()


def gpt2(a, n_heads: int):
    from transformers import GPT2Config, GPT2Model

    c = GPT2Config(vocab_size=sum(REFERENCE_VOCAB.values()), n_embd=a.d_model, n_layer=a.n_layers, n_head=n_heads,
                   n_inner=4 * a.d_model, n_positions=max(1024, a.max_len), resid_pdrop=0.0, embd_pdrop=0.0,
                   attn_pdrop=0.0)
    c._attn_implementation = "sdpa"
    return GPT2Model(c).train()


def train_step(model, inputs):
    def step():
        model.zero_grad(set_to_none=True)
        out = model(**inputs) if isinstance(inputs, dict) and "input_ids" in inputs else model(inputs)
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out.hidden
        h.float().pow(2).mean().backward()

    return step


def events_batch(B: int, T: int, seed: int = 0):
    return random_batch(REFERENCE_VOCAB, REFERENCE_NUMERIC, B=B, T=T, seed=seed)


# ----------------------------------------------------------------------------- benches


def bench_encoder_fixed(a):
    B, T = a.batch, a.seq_len
    batch = events_batch(B, T)
    ids = torch.randint(0, 20_000, (B, T))
    torch.manual_seed(0)
    ours = PLMEncoder(our_cfg(a, PositionConfig(rope="none", absolute="learned"), a.heads), REFERENCE_VOCAB,
                      REFERENCE_NUMERIC).train()
    fns = {"ours": train_step(ours, batch), "bert": train_step(bert(a, a.heads), {"input_ids": ids})}
    variants = {
        "encoder_time_rope": PositionConfig(rope="time"),
        "encoder_time_alibi": PositionConfig(rope="time", bias="time_alibi"),
        "encoder_time_bucket": PositionConfig(rope="time", bias="time_bucket"),
    }
    selected = [k for k in variants if want(a, k)]
    for k in selected:
        m = PLMEncoder(our_cfg(a, variants[k], a.heads), REFERENCE_VOCAB, REFERENCE_NUMERIC).train()
        fns[k] = train_step(m, batch)
    t = timed_interleaved(fns, a.steps, a.warmup)
    ev = B * T
    if want(a, "encoder_fixed_len"):
        report("encoder_fixed_len", ev / t["ours"], ev / t["bert"], "events/s", 0.9,
               f"(B={B}, T={T}, fwd+bwd)")
    for k in selected:
        report(k, ev / t[k], ev / t["ours"], "events/s", 0.9, "(vs our learned-absolute encoder)")


def length_mix(n: int, max_len: int, seed: int) -> list[int]:
    """Long-tailed user history lengths: log-normal (median 64 events, sigma 1), clipped to [4, max_len]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(math.log(64 * max_len / 512) + torch.randn(n, generator=g))
    return x.round().clamp(4, max_len).long().tolist()


def bench_encoder_packed(a):
    max_len, n_seq = a.max_len, a.packed_seqs
    batches = []
    for i in range(a.packed_batches):
        lens = sorted(length_mix(n_seq, max_len, seed=i), reverse=True)
        src = events_batch(1, sum(lens), seed=100 + i)
        seqs, s = [], 0
        for n in lens:
            seqs.append(take(src, 0, s, s + n))
            s += n
        packed = pack_sequences(seqs, max_len)  # first-fit decreasing
        T = max(lens)
        ids = torch.randint(0, 20_000, (n_seq, T))
        mask = torch.zeros(n_seq, T, dtype=torch.long)
        for j, n in enumerate(lens):
            mask[j, :n] = 1
        batches.append((packed, {"input_ids": ids, "attention_mask": mask}, sum(lens)))
    torch.manual_seed(0)
    ours = PLMEncoder(our_cfg(a, PositionConfig(rope="none", absolute="learned"), a.heads), REFERENCE_VOCAB,
                      REFERENCE_NUMERIC).train()
    ref = bert(a, a.heads)
    real = sum(b[2] for b in batches)
    rows = sum(b[0]["ts"].shape[0] for b in batches)
    padded = sum(b[1]["input_ids"].numel() for b in batches)

    def run(model, k):
        def f():
            for b in batches:
                train_step(model, b[k])()
        return f

    t = timed_interleaved({"ours": run(ours, 0), "bert": run(ref, 1)}, max(3, a.steps // 3), 1)
    report("encoder_packed", real / t["ours"], real / t["bert"], "events/s", 1.5,
           f"(real events; ours {rows} rows x {max_len}, bert {padded} padded slots for {real} events)")


def bench_decoder(a):
    B, T = a.batch, a.seq_len
    batch = events_batch(B, T)
    ids = torch.randint(0, 20_000, (B, T))
    H = a.dec_heads
    torch.manual_seed(0)
    pos = PositionConfig(rope="none", absolute="learned")
    mha = PLMDecoder(our_cfg(a, pos, H), REFERENCE_VOCAB, REFERENCE_NUMERIC).train()
    gqa = PLMDecoder(our_cfg(a, pos, H, n_kv_heads=H // 4), REFERENCE_VOCAB, REFERENCE_NUMERIC).train()
    fns = {"ref": train_step(gpt2(a, H), {"input_ids": ids})}
    if want(a, "decoder_fixed_len"):
        fns["mha"] = train_step(mha, batch)
    if want(a, "decoder_gqa"):
        fns["gqa"] = train_step(gqa, batch)
    t = timed_interleaved(fns, a.steps, a.warmup)
    ev = B * T
    if "mha" in fns:
        report("decoder_fixed_len", ev / t["mha"], ev / t["ref"], "events/s", 0.9, f"(B={B}, T={T}, fwd+bwd)")
    if "gqa" in fns:
        report("decoder_gqa", ev / t["gqa"], ev / t["ref"], "events/s", 1.0, f"(n_kv_heads={H // 4} of {H})")


@torch.no_grad()
def bench_kv_cache(a):
    ctx = a.max_len
    B = a.decode_batch
    torch.manual_seed(0)
    dec = PLMDecoder(our_cfg(a, PositionConfig(rope="index"), a.dec_heads), REFERENCE_VOCAB,
                     REFERENCE_NUMERIC).eval()
    seq = events_batch(B, ctx, seed=5)
    n_cached = a.decode_steps
    start = ctx - n_cached
    g = torch.Generator().manual_seed(0)

    def next_event(h):
        ev = sample_event(dec.heads(h), dec, 1.0, 0, 1.0, g)
        ev.pop("dt_seconds")
        return ev

    # cached: prefill `start` events (timed separately), then one event at a time up to ctx
    cached_times, prefill = [], []
    for _ in range(max(1, a.steps // 10)):
        cache = dec.new_cache(B, ctx)
        t = time.perf_counter()
        h = dec({k: v[:, :start] for k, v in seq.items()}, cache).hidden[:, -1:]
        prefill.append(time.perf_counter() - t)
        for i in range(start, ctx):
            t = time.perf_counter()
            next_event(h)
            h = dec({k: v[:, i : i + 1] for k, v in seq.items()}, cache).hidden  # teacher-forced step
            cached_times.append(time.perf_counter() - t)
    # recompute: the whole context (ctx events) for every new event
    full_times = []
    for _ in range(a.recompute_steps + 1):
        t = time.perf_counter()
        h = dec(seq).hidden[:, -1:]
        next_event(h)
        full_times.append(time.perf_counter() - t)
    cached, full = statistics.median(cached_times), statistics.median(full_times[1:])
    report("kv_cache_decode", B / cached, B / full, "events/s", 10.0,
           f"(batch {B}, context {ctx}; prefill of {start} events {statistics.median(prefill) * 1e3:.0f} ms)")


# ----------------------------------------------------------------------------- main

BENCHES = {
    "encoder": (bench_encoder_fixed, ("encoder_fixed_len", "encoder_time_rope", "encoder_time_alibi",
                                      "encoder_time_bucket")),
    "packed": (bench_encoder_packed, ("encoder_packed",)),
    "decoder": (bench_decoder, ("decoder_fixed_len", "decoder_gqa")),
    "kv": (bench_kv_cache, ("kv_cache_decode",)),
}


def want(a, name: str) -> bool:
    return not a.only or name in a.only


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes and few steps (about a minute)")
    ap.add_argument("--only", default="", help="comma-separated bench names (see the JSON 'bench' keys)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    ap.add_argument("--steps", type=int, default=None, help="timed steps per model (median)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--d-model", type=int, default=None)
    ap.add_argument("--n-layers", type=int, default=None)
    ap.add_argument("--json-out", default="", help="also write all JSON lines to this file")
    a = ap.parse_args(argv)
    q = a.quick
    a.only = {s for s in a.only.split(",") if s}
    a.d_model = a.d_model or (128 if q else 256)
    a.n_layers = a.n_layers or (2 if q else 6)
    a.heads, a.dec_heads = 4, 8
    a.steps = a.steps or (4 if q else 15)
    a.batch, a.seq_len = (4, 128) if q else (8, 256)
    a.max_len = 256 if q else 512
    a.packed_seqs, a.packed_batches = (16, 2) if q else (32, 3)
    a.decode_batch, a.decode_steps, a.recompute_steps = (2, 16, 3) if q else (4, 64, 8)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
          f"d_model {a.d_model}, layers {a.n_layers}, heads enc {a.heads} / dec {a.dec_heads}, "
          f"steps {a.steps} (median), warmup {a.warmup}", flush=True)
    for fn, names in BENCHES.values():
        if any(want(a, n) for n in names):
            fn(a)
    if a.json_out:
        with open(a.json_out, "w") as f:
            for r in RESULTS:
                f.write(json.dumps(r) + "\n")
    missed = [r["bench"] for r in RESULTS if r["ratio"] < r["target"]]
    print(f"{len(RESULTS) - len(missed)}/{len(RESULTS)} targets met" + (f"; missed: {', '.join(missed)}" if missed else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
