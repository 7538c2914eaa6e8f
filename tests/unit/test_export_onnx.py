"""ONNX export of the encoder's time inputs (seconds since the sequence start, gap since the
previous event) and of tiny untrained encoders (and decoders) of every model option and export
pooling: ONNX Runtime must agree with eager on batches whose shapes, padding and gaps differ from
the export example, including gaps of 2**31 to 2**32 µs (36 to 72 minutes), which ONNX Runtime's
int64 Clip zeroed. Weights are drawn larger than the init (zero bias tables, 0.02-std
projections) so that every option moves the embedding."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from plm.data.schema import CATEGORICAL_FIELDS, NUMERIC_FIELDS
from plm.export.model import Embedder, cosine_agreement, export_onnx, onnx_input_names
from plm.model import (
    AttentionConfig,
    ModelConfig,
    PLMDecoder,
    PLMEncoder,
    PositionConfig,
    model_config_from_dict,
)
from plm.model.batch import previous_gap_seconds, relative_seconds
from plm.model.positions import time_bucket, time_bucket_edges
from plm.model.testing import T0_US, random_batch

ort = pytest.importorskip("onnxruntime")

VOCAB = {f.name: 9 for f in CATEGORICAL_FIELDS} | {f.name: 11 for f in NUMERIC_FIELDS}
NUMERIC = [f.name for f in NUMERIC_FIELDS]
MIN_US = 60 * 10**6


def padded(batch: dict[str, torch.Tensor], lengths: list[int]) -> dict[str, torch.Tensor]:
    """Right padding: events past each row's length are zeroed (ids PAD, ts 0) and masked."""
    T = batch["ts"].shape[1]
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    out = {k: torch.where(mask, v, torch.zeros_like(v)) for k, v in batch.items()}
    out["attention_mask"] = mask
    out["positions"] = torch.where(mask, torch.arange(T)[None], 0)
    return out


def with_gaps(batch: dict[str, torch.Tensor], gaps_us: torch.Tensor) -> dict[str, torch.Tensor]:
    """`batch` with ts = T0_US + cumulative (B, T) gaps in µs (gaps[:, 0] is the start offset)."""
    out = dict(batch)
    out["ts"] = T0_US + gaps_us.long().cumsum(1)
    return out


def hard_batch(B: int = 6, T: int = 17, seed: int = 3, empty: bool = True) -> dict[str, torch.Tensor]:
    """Gaps the export example never had: half of them in [2**31, 2**32) µs, ties (0), a
    minute, months; rows of every length (one full row, one single event, one empty row unless
    `empty` is False)."""
    g = torch.Generator().manual_seed(seed)
    gaps = torch.randint(2**31, 2**32, (B, T), generator=g)
    other = torch.tensor([0, MIN_US, 90 * 86_400 * 10**6, 5 * 10**6])[torch.randint(0, 4, (B, T), generator=g)]
    gaps = torch.where(torch.rand(B, T, generator=g) < 0.5, gaps, other)
    gaps[:, 0] = torch.randint(0, 10**12, (B,), generator=g)  # rows start at different times
    lengths = [T, 1, 9, 0 if empty else 2, 12, 16][:B]
    return padded(with_gaps(random_batch(VOCAB, NUMERIC, B=B, T=T, seed=seed), gaps), lengths)


def example_batch() -> dict[str, torch.Tensor]:
    """The 4-row export example: short, one padded row, gaps of a few minutes only."""
    b = random_batch(VOCAB, NUMERIC, B=4, T=6, seed=0)
    return padded(with_gaps(b, torch.full((4, 6), 5 * MIN_US)), [6, 6, 4, 6])


def session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_embed(sess, names: list[str], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The graph's output on `batch`, fed the inputs it declares (a graph drops unused ones)."""
    wanted = {i.name for i in sess.get_inputs()}
    return torch.from_numpy(sess.run(None, {n: batch[n].numpy() for n in names if n in wanted})[0])


class TimeInputs(torch.nn.Module):
    def forward(self, ts, mask):
        valid = mask.bool()
        return previous_gap_seconds(ts, valid, None), relative_seconds(ts, valid, None)


def test_onnx_time_inputs_are_exact(tmp_path):
    """The gap and the relative seconds come out of ONNX Runtime bit-identical to eager (both are
    int64 µs differences): no int64 Clip (ONNX Runtime's CPU kernel returned 0 for any gap in
    [2**31, 2**32) µs) and no INT64_MAX padding fill (exported as INT64_MIN, which shifted every
    padded row's seconds by -2**63 µs)."""
    ex = example_batch()
    path = tmp_path / "time.onnx"
    dims = {0: torch.export.Dim("b"), 1: torch.export.Dim("t")}
    torch.onnx.export(TimeInputs(), (ex["ts"], ex["attention_mask"]), input_names=["ts", "mask"],
                      output_names=["gap", "seconds"], dynamic_shapes=(dims, dims), dynamo=True).save(str(path))
    sess = session(path)
    hard = hard_batch()
    gaps = TimeInputs()(hard["ts"], hard["attention_mask"])[0]
    assert ((gaps >= 2**31 / 1e6) & (gaps < 2**32 / 1e6)).sum() > 10  # the gaps ONNX Runtime's Clip zeroed
    for b in (hard, ex, hard_batch(B=3, T=40, seed=5)):
        gap, sec = sess.run(None, {"ts": b["ts"].numpy(), "mask": b["attention_mask"].numpy()})
        want_gap, want_sec = TimeInputs()(b["ts"], b["attention_mask"])
        np.testing.assert_array_equal(gap, want_gap.numpy())
        np.testing.assert_array_equal(sec, want_sec.numpy())


@pytest.mark.slow
def test_onnx_time_gap_encoder_agrees_with_eager(tmp_path):
    """A tiny untrained encoder with time_gap=periodic and time RoPE, exported from the 4-row
    example, agrees with eager on other shapes, padding and gaps (with the int64 Clip the rows'
    36-72 minute gaps read as 0 and the cosine fell to 0.14 here)."""
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, attention=AttentionConfig(n_heads=4), position=PositionConfig(rope="both"))
    cfg.embedding.time_gap = "periodic"
    enc = PLMEncoder(cfg, VOCAB, NUMERIC).eval()
    with torch.no_grad():  # a gap term as large as a trained model's, not the 0.02-std init
        enc.time_gap.linear.weight.normal_(0.0, 1.0)
    emb = Embedder(enc, "mean").eval()
    names = onnx_input_names(VOCAB, NUMERIC)
    # normalize=true is part of the graph (plm-export format=onnx normalize=true); one export (each
    # takes ~20 s): the direction is held to eager, the norm to 1
    export_onnx(emb, example_batch(), names, tmp_path / "unit.onnx", normalize=True)
    sess = session(tmp_path / "unit.onnx")
    assert "ts" in {i.name for i in sess.get_inputs()}
    for b in (hard_batch(empty=False), hard_batch(B=3, T=40, seed=5)):
        got = ort_embed(sess, names, b)
        with torch.no_grad():
            ref = emb(b)
        agr = cosine_agreement(ref, got)
        assert agr["cosine_min"] >= 0.9999, agr
        torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(got)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, torch.nn.functional.normalize(ref, dim=-1), rtol=1e-4, atol=1e-4)


class TimeBuckets(torch.nn.Module):
    def __init__(self, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.edges = time_bucket_edges(32, 31_536_000.0, bidirectional)  # computed outside the trace

    def forward(self, dt):
        return time_bucket(dt, 32, 31_536_000.0, self.bidirectional, self.edges)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_onnx_time_bucket_is_exact(tmp_path, bidirectional):
    """position.bias=time_bucket: the exported bucket ids (float64 comparisons, as neither
    `searchsorted` nor the edges' `expm1` export) equal eager's, also on and next to every edge."""
    m = TimeBuckets(bidirectional)
    edges = m.edges[0]
    near = torch.cat([edges, torch.nextafter(edges, edges + 1), torch.nextafter(edges, edges - 1)])
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(4000, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-3, 9, (4000,), generator=g)
    dt = torch.cat([near, torch.tensor([0.0, -0.0, 3.2e7, -1e9]), wide])[:4000]  # every edge kept
    path = tmp_path / "tb.onnx"
    dims = {0: torch.export.Dim("b"), 1: torch.export.Dim("t")}
    torch.onnx.export(m, (dt[:14].reshape(2, 7),), input_names=["dt"], output_names=["bucket"],
                      dynamic_shapes=(dims,), dynamo=True).save(str(path))
    got = session(path).run(None, {"dt": dt.reshape(2, -1).numpy()})[0]
    np.testing.assert_array_equal(got, m(dt.reshape(2, -1)).numpy())


# ------------------------------------------------------------------ every option and pooling

BIG = {"amount": 2**31 + 5 * 10**8, "month": 30 * 86_400 * 10**6, "sec": 5 * 10**6}


def tiny_model(over: dict, arch: str = "encoder", seed: int = 0):
    """A d_model 32, 2-layer model with the dotted config keys of `over`, weights drawn at a trained
    model's scale: every projection ~ N(0, 1/fan_in) (x2 for attention logits that matter), every
    vector parameter (biases, value encoders, frequencies, CLS) ~ N(0, 1), bias tables ~ N(0, 2),
    norm weights 1 + N(0, 0.1); the PAD row of the embedding table stays 0 (as in training)."""
    d: dict = {"d_model": 32, "n_layers": 2, "attention": {"n_heads": 4}}
    for key, v in over.items():
        node = d
        *path, leaf = key.split(".")
        for k in path:
            node = node.setdefault(k, {})
        node[leaf] = v
    cfg = model_config_from_dict(d)
    torch.manual_seed(seed)
    model = (PLMDecoder if arch == "decoder" else PLMEncoder)(cfg, VOCAB, NUMERIC).eval()
    norms = {id(p) for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm))
             for p in m.parameters()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if id(p) in norms:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(("t5_table", "time_table")):
                p.normal_(0.0, 2.0)
            elif p.dim() == 2 and not name.endswith("table.weight"):
                p.normal_(0.0, 2.0 / p.shape[1] ** 0.5)
            else:
                p.normal_(0.0, 1.0)
        model.embed.table.weight[0].zero_()
    return model


def as_of_for(b: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
    """(B,) as-of times after each row's last real event by 5 s, 2**31 µs + 0.5e9 or a month."""
    last = torch.where(b["attention_mask"], b["ts"], torch.zeros_like(b["ts"])).amax(1)
    pick = torch.randint(0, 3, last.shape, generator=torch.Generator().manual_seed(seed))
    return last + torch.tensor(list(BIG.values()))[pick]


# Every model option and export pooling appears in at least one case. Options are combined (one
# export takes 15-30 s here, and each case is one export); when a case fails, split it to find the
# option. Each case's id names what it holds.
CASES = {  # id: (model config keys, export pooling, arch)
    "rope_time-mqa-asof_max_recent3d": (
        {"position.rope": "time", "attention.n_kv_heads": 1}, "asof+max+recent3d", "encoder"),
    "rope_both-all_biases-gqa-time_gap-mean_asof_recent": (
        {"position.rope": "both", "position.bias": "alibi+t5+time_alibi+time_bucket", "attention.n_kv_heads": 2,
         "embedding.time_gap": "periodic"}, "mean+asof+recent", "encoder"),
    "rope_none-sinusoidal-alibi-numeric_periodic-last": (
        {"position.rope": "none", "position.absolute": "sinusoidal", "position.bias": "alibi",
         "embedding.numeric": "periodic", "embedding.norm": False}, "last", "encoder"),
    "rope_index-learned-eager-gelu_layernorm_biases-numeric_bin-mean": (
        {"position.absolute": "learned", "position.max_len": 64, "attention.backend": "eager", "ffn.kind": "gelu",
         "norm": "layernorm", "attention.bias": True, "ffn.bias": True, "embedding.numeric": "bin"}, "mean", "encoder"),
    # 8 experts, top-1: the 4-row example leaves some expert without events
    "flex-t5-moe-concat-field_mixer-numeric_linear-mean": (
        {"attention.backend": "flex", "position.bias": "t5", "ffn.n_experts": 8, "ffn.top_k": 1,
         "embedding.combine": "concat", "embedding.field_dim": 8, "embedding.field_mixer_layers": 1,
         "embedding.numeric": "linear"}, "mean", "encoder"),
    "rope_none-time_alibi-moe_every2_top2-mean_asof": (
        {"position.rope": "none", "position.bias": "time_alibi", "ffn.n_experts": 4, "ffn.top_k": 2,
         "ffn.moe_every": 2, "ffn.kind": "gelu"}, "mean_asof", "encoder"),
    "cls-rope_both-time_bucket-cls": (
        {"pooling": "cls", "position.rope": "both", "position.bias": "time_bucket"}, "cls", "encoder"),
    "cls-time_bucket-asof": ({"pooling": "cls", "position.bias": "time_bucket"}, "asof", "encoder"),
    # the membership bank's event counts: `model` = attention + bank
    "attention_pool-gqa-bank-model_recent": (
        {"pooling": "attention", "attention.n_kv_heads": 2, "heads.membership_dim": 8, "heads.membership_bank": 16},
        "model+recent", "encoder"),
    "bank-mean-model_recent": (
        {"heads.membership_dim": 8, "heads.membership_bank": 16}, "model+recent", "encoder"),
    "decoder-rope_both-alibi_time_bucket-gqa-model_recent": (
        {"position.rope": "both", "position.bias": "alibi+time_bucket", "attention.n_kv_heads": 2},
        "model+recent", "decoder"),
    "decoder-t5_time_alibi-moe-mean": (
        {"position.bias": "t5+time_alibi", "ffn.n_experts": 4, "ffn.top_k": 1}, "mean", "decoder"),
}


@pytest.mark.slow  # one torch.onnx export each (15-35 s here)
@pytest.mark.parametrize("over,pooling,arch", list(CASES.values()), ids=list(CASES))
def test_onnx_agrees_with_eager_for_every_option(tmp_path, over, pooling, arch):
    """Every option (and the poolings `plm-export` accepts for it): the graph exported from the
    4-row example agrees with eager on batches of other shapes, lengths and gaps, down to one
    user with one event. Before the
    fixes: time_bucket failed to export (expm1, searchsorted), GQA/MQA failed (SDPA enable_gqa),
    flex failed (no export), attention pooling (cosine 0.06: the pooled batch size was frozen to
    the example's), MoE (cosine 0.95: experts the example did not route to were dropped) and the
    decoder (bool EyeLike, not in ONNX Runtime) disagreed."""
    model = tiny_model(over, arch)
    emb = Embedder(model, pooling).eval()
    names = onnx_input_names(VOCAB, NUMERIC, as_of=emb.needs_as_of)
    ex = example_batch()
    batches = [hard_batch(empty=False), hard_batch(B=3, T=40, seed=5), hard_batch(B=2, T=3, seed=7),
               hard_batch(B=1, T=1, seed=9, empty=False)]
    if emb.needs_as_of:
        for i, b in enumerate([ex, *batches]):
            b["as_of"] = as_of_for(b, i)
    export_onnx(emb, ex, names, tmp_path / "model.onnx")
    sess = session(tmp_path / "model.onnx")
    for b in batches:
        got = ort_embed(sess, names, b)
        with torch.no_grad():
            ref = emb(b)
        assert ref.shape == (b["ts"].shape[0], emb.dim) and ref.std() > 0.1
        agr = cosine_agreement(ref, got)
        assert agr["cosine_min"] >= 0.9999, agr
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- int8 engines


@pytest.mark.parametrize("vnni,capability,onednn", [
    (True, "AVX512", True), (True, "AVX2", True), (False, "AVX2", True), (False, "AVX512", True),
    (False, "DEFAULT", False), (False, "NEON", False),
])
def test_int8_engine_choice(monkeypatch, vnni, capability, onednn):
    """oneDNN on x86 CPUs with VNNI (1.3-1.5x faster than x86 there) or AVX2 / AVX-512 (~10%
    faster on an AMD EPYC with AVX2), else x86."""
    from plm.export.model import int8_engine

    engines = torch.backends.quantized.supported_engines
    if "onednn" not in engines:
        pytest.skip(reason="this torch build has no onednn engine")
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: vnni, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert (int8_engine() == "onednn") == onednn and int8_engine() in engines


@pytest.mark.parametrize("engine", ["onednn", "x86", "fbgemm"])
def test_int8_engines_agree_with_fp32(monkeypatch, engine):
    """Whichever engine quantize_int8 uses, the quantised embedder agrees with fp32 on batches
    of other shapes."""
    from plm.export import model as export_model

    if engine not in torch.backends.quantized.supported_engines:
        pytest.skip(reason=f"this torch build has no {engine} engine")
    monkeypatch.setattr(export_model, "int8_engine", lambda: engine)
    emb = Embedder(tiny_model({"position.rope": "both"}), "mean+recent").eval()
    q = export_model.quantize_int8(emb)
    assert torch.backends.quantized.engine == engine
    for b in (hard_batch(empty=False), hard_batch(B=3, T=40, seed=5)):
        with torch.no_grad():
            agr = cosine_agreement(emb(b), q(b))
        assert agr["cosine_min"] >= 0.99, (engine, agr)


def test_int8_quantising_prints_no_torch_deprecation():
    """torch 2.13 warns (once per process, from C++) that the quantized tensor type torch.ao's
    dynamic int8 stores weights in is deprecated: not for plm-export's users, so quantize_int8
    silences it. A fresh process, since another test may have triggered the warning already."""
    import subprocess
    import sys

    code = ("import torch; from plm.export.model import Embedder, quantize_int8; "
            "from plm.model import PLMEncoder; from plm.model.config import load_model_config; "
            f"m = PLMEncoder(load_model_config('tiny'), {VOCAB!r}, {NUMERIC!r}); "
            "quantize_int8(Embedder(m.eval(), 'mean')); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
    assert "quantized tensor creation" not in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
def test_onnx_int8_weights_leave_headroom_and_agree(tmp_path, caplog):
    """The int8 graph's weights use 7 bits: ONNX Runtime's u8 x s8 kernels on CPUs without VNNI
    (AVX2) add pairs of products in int16 and saturate at full range (the demo checkpoint's int8
    graph fell to cosine min 0.963 on an AMD EPYC with 8 bits; 0.99996 with 7). The graph may run
    on any CPU, so this holds wherever it is exported."""
    import onnx
    from onnx import numpy_helper

    from plm.export.model import quantize_onnx_int8

    emb = Embedder(tiny_model({"position.rope": "both"}), "mean+recent").eval()
    names = onnx_input_names(VOCAB, NUMERIC)
    with caplog.at_level(logging.INFO):  # hydra's root logger is at INFO in plm-export
        export_onnx(emb, example_batch(), names, tmp_path / "model.onnx")
    # onnx_ir logged one "Replaced initializer ..." line per deduplicated constant (hundreds)
    assert not [r for r in caplog.records if r.name.startswith(("onnx_ir", "onnxscript", "torch.onnx"))]
    # opset 23: one fused Attention and two RMSNormalization per block (2 blocks) for ONNX Runtime
    ops = [n.op_type for n in onnx.load(str(tmp_path / "model.onnx")).graph.node]
    assert ops.count("Attention") == 2 and "Softmax" not in ops
    assert ops.count("RMSNormalization") >= 4
    quantize_onnx_int8(tmp_path / "model.onnx", tmp_path / "model.int8.onnx")
    # the blocks' four projections each, found by the module path the exporter records; the
    # event embedding's projection stays fp32
    qops = [n.op_type for n in onnx.load(str(tmp_path / "model.int8.onnx")).graph.node]
    assert sum(o in ("MatMulInteger", "DynamicQuantizeMatMul") for o in qops) == 8, qops
    q = [numpy_helper.to_array(w) for w in onnx.load(str(tmp_path / "model.int8.onnx")).graph.initializer]
    q = [w for w in q if w.dtype == np.int8 and w.size > 1]
    assert q, "no int8 weight in the quantised graph"
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in q) <= 64
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in q) >= 60  # 7 bits used, not fewer
    sess = session(tmp_path / "model.int8.onnx")
    for b in (hard_batch(empty=False), hard_batch(B=3, T=40, seed=5)):
        got = ort_embed(sess, names, b)
        with torch.no_grad():
            assert cosine_agreement(emb(b), got)["cosine_min"] >= 0.99


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("over,pooling", [
    ({"position.rope": "both", "embedding.time_gap": "periodic"}, "mean+asof+recent"),
    ({"pooling": "attention", "position.bias": "time_bucket"}, "attention+max"),
])
def test_compiled_embedder_is_one_graph(over, pooling):
    """`trainer.compile=true` of plm-export: the fp32 embedder traces into one graph, padded or
    not (the eager-only shortcuts `bool(valid.all())` and the model's flat pooling with its
    data-dependent shape split it in up to five pieces, each compiled apart)."""
    emb = Embedder(tiny_model(over), pooling, as_of_us=T0_US + 10**15).eval()
    full = hard_batch(B=3, T=5, seed=2, empty=False)
    full["attention_mask"] = torch.ones_like(full["attention_mask"])  # nothing padded
    for b in (hard_batch(empty=False), full):
        torch._dynamo.reset()
        with torch.no_grad():
            ex = torch._dynamo.explain(emb)(b)
        assert ex.graph_break_count == 0, [str(r.reason)[:200] for r in ex.break_reasons]
        assert ex.graph_count == 1


def test_a_model_trained_with_xformers_embeds_with_sdpa_where_xformers_cannot_run(tmp_path, capsys):
    """xformers has no CPU kernels: a checkpoint trained with it loads here with sdpa, says so,
    and gives the vectors of the same weights computed with sdpa."""
    from dataclasses import asdict

    from plm.export.model import load_checkpoint

    cfg = ModelConfig(d_model=32, n_layers=1)
    cfg.attention.n_heads = 2
    model = PLMEncoder(cfg.validate(), VOCAB, NUMERIC).eval()
    mcfg = asdict(cfg)
    mcfg["attention"]["backend"] = "xformers"
    path = tmp_path / "final.pt"
    torch.save({"model": model.state_dict(), "model_config": mcfg, "vocab_sizes": VOCAB,
                "numeric_fields": NUMERIC, "arch": "encoder"}, path)
    loaded = load_checkpoint(path)
    assert "trained with attention.backend=xformers" in capsys.readouterr().err
    assert loaded.model_config["attention"]["backend"] == "sdpa"
    b = padded(random_batch(VOCAB, NUMERIC, B=3, T=9, seed=1), [9, 5, 2])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(b).pooled, model(b).pooled)


def test_asof_with_learned_positions_needs_a_row_for_the_query():
    """The as-of query is one more event after the history: with learned absolute positions and a
    history as long as the table, the export failed deep in a batch ("position 16 >=
    position.max_len=16"); it is refused up front, naming the max_len that fits."""
    from plm.export.model import check_positions

    cfg = ModelConfig(d_model=32, n_layers=1, attention=AttentionConfig(n_heads=2),
                      position=PositionConfig(absolute="learned", max_len=16, rope="both"))
    enc = PLMEncoder(cfg.validate(), VOCAB, NUMERIC).eval()
    emb = Embedder(enc, "mean+asof", as_of_us=T0_US + 10**12)
    check_positions(enc, emb.pooling, 15)  # room for the query at position 15
    with pytest.raises(ValueError, match=r"position.max_len=16: export with max_len=15"):
        check_positions(enc, emb.pooling, 16)
    check_positions(enc, "mean", 16)  # no query, no extra position
    b = random_batch(B=2, T=15, seed=0, vocab=VOCAB, numeric=NUMERIC)
    b["attention_mask"] = torch.ones(2, 15, dtype=torch.bool)
    assert torch.isfinite(emb(b)).all()  # and 15 events + the query do run
