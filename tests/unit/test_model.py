"""Encoder/decoder behaviour: padding and packing invariance, causality, KV cache, time shift
invariance, gradients, overfitting, generation, named configs."""

from __future__ import annotations

import copy
import glob
import os

import pytest
import torch
import torch.nn.functional as F

from plm.model import (
    AttentionConfig,
    EmbeddingConfig,
    FFNConfig,
    HeadsConfig,
    ModelConfig,
    PLMDecoder,
    PLMEncoder,
    PositionConfig,
    generate,
    load_model_config,
    pack_sequences,
)
from plm.model.batch import MISSING, N_SPECIALS, NA, OOV, PAD
from plm.model.embedding import EventEmbedding
from plm.model.flops import count_params, flops_per_event
from plm.model.flops import main as flops_main
from plm.model.heads import BinnedTime, LogNormalMixtureTime, sample_logits
from plm.model.testing import T0_US, TOY_NUMERIC, TOY_VOCAB, pad_right, random_batch, stack, take

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIME_AWARE = PositionConfig(rope="time", bias="time_alibi+time_bucket")
SCHEMES = {
    "rope": PositionConfig(rope="index"),
    "learned+t5": PositionConfig(rope="none", absolute="learned", bias="t5"),
    "alibi": PositionConfig(rope="none", bias="alibi"),
    "time": TIME_AWARE,
    "both+sinusoidal": PositionConfig(rope="both", absolute="sinusoidal", bias="time_bucket"),
}


def cfg(pos: PositionConfig | None = None, **kw) -> ModelConfig:
    c = ModelConfig(d_model=32, n_layers=2, attention=AttentionConfig(n_heads=4), position=pos or PositionConfig())
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def randomize(model) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("t5_table", "time_table")):
                p.normal_(0, 0.5)


def close(a, b, atol=2e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)


# ----------------------------------------------------------------------------- encoder invariances


@pytest.mark.parametrize("pooling", ["mean", "cls", "last", "attention"])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_encoder_unchanged_by_padding_and_packing(pooling, scheme):
    torch.manual_seed(0)
    enc = PLMEncoder(cfg(SCHEMES[scheme], pooling=pooling), TOY_VOCAB, TOY_NUMERIC).eval()
    randomize(enc)
    src = random_batch(B=3, T=9, seed=1)
    seqs = [take(src, 0, 0, 5), take(src, 1, 0, 9), take(src, 2, 0, 3), take(src, 0, 5, 9)]
    alone = [enc(stack([s])) for s in seqs]
    # right padding
    for s, a in zip(seqs, alone):
        n = len(s["ts"])
        out = enc(pad_right(s, 12))
        close(out.hidden[0, :n], a.hidden[0])
        close(out.pooled, a.pooled)
    # left padding
    s, a = seqs[2], alone[2]
    left = {k: torch.cat([torch.zeros(4, dtype=v.dtype), v])[None] for k, v in s.items()}
    left["attention_mask"] = (torch.arange(7) >= 4)[None]
    out = enc(left)
    close(out.hidden[0, 4:], a.hidden[0])
    close(out.pooled, a.pooled)
    # packed beside other sequences (rows of 12: [9], [5, 3, 4] by first fit)
    packed = pack_sequences(seqs, 12)
    assert int(packed["segment_ids"].max()) > 1
    out = enc(packed)
    pooled = {}
    r_i = 0
    for r in range(packed["ts"].shape[0]):
        for sid in range(1, int(packed["segment_ids"][r].max()) + 1):
            sel = packed["segment_ids"][r] == sid
            pooled[(r, sid)] = (out.hidden[r, sel], out.pooled[r_i])
            r_i += 1
    assert r_i == out.pooled.shape[0] == len(seqs)
    matched = 0
    for a in alone:
        for h, p in pooled.values():
            if h.shape[0] == a.hidden.shape[1] and torch.allclose(h, a.hidden[0], atol=2e-5, rtol=1e-4):
                close(p, a.pooled[0])
                matched += 1
                break
    assert matched == len(seqs)


# ----------------------------------------------------------------------------- decoder


@pytest.mark.parametrize("cls", [PLMEncoder, PLMDecoder])
def test_garbage_in_padded_slots_never_reaches_real_events(cls):
    """A padded slot holding a fitted id and a NaN value (an outside caller's batch) made every
    real event NaN: 0 x NaN in the masking product."""
    torch.manual_seed(0)
    model = cls(cfg(TIME_AWARE), TOY_VOCAB, TOY_NUMERIC).eval()
    b = random_batch(B=2, T=8, seed=3)
    b["attention_mask"] = torch.arange(8)[None] < torch.tensor([8, 5])[:, None]
    dirty = dict(b)
    for k, v in b.items():
        if k in ("ts", "attention_mask"):
            continue
        fill = float("nan") if v.dtype.is_floating_point else N_SPECIALS + 1
        dirty[k] = torch.where(b["attention_mask"], v, torch.full_like(v, fill))
    clean, got = model(b).hidden, model(dirty).hidden
    m = b["attention_mask"]
    assert torch.isfinite(got[m]).all()
    close(got[m], clean[m])


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_causal_output_never_changes_when_future_changes(scheme):
    torch.manual_seed(0)
    dec = PLMDecoder(cfg(SCHEMES[scheme]), TOY_VOCAB, TOY_NUMERIC).eval()
    randomize(dec)
    a = random_batch(B=2, T=10, seed=2)
    b = copy.deepcopy(a)
    t = 6
    for k in TOY_VOCAB:
        b[k][:, t:] = random_batch(B=2, T=10, seed=9)[k][:, t:]
    b["amount_value"][:, t:] += 3.0
    b["ts"][:, t:] += 10**9  # later future events
    ha, hb = dec(a).hidden, dec(b).hidden
    close(ha[:, :t], hb[:, :t])
    assert not torch.allclose(ha[:, t:], hb[:, t:], atol=1e-3)
    pa, pb = dec.heads(ha), dec.heads(hb)
    close(pa.logits["merchant"][:, :t], pb.logits["merchant"][:, :t])


@pytest.mark.parametrize("n_kv", [4, 2, 1])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_kv_cache_decoding_matches_full_forward_step_by_step(scheme, n_kv):
    torch.manual_seed(0)
    c = cfg(SCHEMES[scheme])
    c.attention.n_kv_heads = n_kv
    dec = PLMDecoder(c, TOY_VOCAB, TOY_NUMERIC).eval()
    randomize(dec)
    batch = random_batch(B=2, T=9, seed=4)
    full = dec.heads(dec(batch).hidden)
    cache = dec.new_cache(2, 9)
    prefix = 3  # a prompt chunk, then one event at a time
    steps = [(0, prefix)] + [(t, t + 1) for t in range(prefix, 9)]
    for s, e in steps:
        out = dec({k: v[:, s:e] for k, v in batch.items()}, cache)
        pred = dec.heads(out.hidden)
        for f in ("merchant", "amount"):
            close(pred.logits[f], full.logits[f][:, s:e])
        close(pred.time["mu"], full.time["mu"][:, s:e])
    assert cache.length == 9


def test_kv_cache_with_left_padded_prompt():
    torch.manual_seed(0)
    dec = PLMDecoder(cfg(SCHEMES["both+sinusoidal"]), TOY_VOCAB, TOY_NUMERIC).eval()
    randomize(dec)
    seq = take(random_batch(B=1, T=7, seed=6), 0)
    alone = dec(stack([seq])).hidden
    left = {k: torch.cat([torch.zeros(3, dtype=v.dtype), v])[None] for k, v in seq.items()}
    left["attention_mask"] = (torch.arange(10) >= 3)[None]
    close(dec(left).hidden[0, 3:], alone[0])
    cache = dec.new_cache(1, 10)
    dec({k: v[:, :6] for k, v in left.items()}, cache)
    for t in range(6, 10):
        h = dec({k: v[:, t : t + 1] for k, v in left.items()}, cache).hidden
        close(h[0, 0], alone[0, t - 3])


def test_greedy_generation_with_cache_equals_recompute():
    torch.manual_seed(0)
    dec = PLMDecoder(cfg(TIME_AWARE), TOY_VOCAB, TOY_NUMERIC)
    randomize(dec)
    prompt = random_batch(B=2, T=5, seed=7)
    a = generate(dec, prompt, 6, temperature=0.0)
    b = generate(dec, prompt, 6, temperature=0.0, use_cache=False)
    for k in a:
        if a[k].dtype.is_floating_point:
            close(a[k], b[k])
        else:
            assert torch.equal(a[k], b[k]), k
    assert a["merchant"].shape == (2, 6)
    assert (a["ts"][:, :1] >= prompt["ts"][:, -1:]).all() and (a["ts"].diff(dim=1) >= 0).all()
    assert (a["merchant"] > 1).all()  # never PAD or MASK
    g = torch.Generator().manual_seed(0)
    s = generate(dec, prompt, 4, temperature=1.0, top_k=5, top_p=0.9, generator=g)
    assert s["ts"].shape == (2, 4) and dec.training  # mode restored
    # a prompt masked with `padding` (the batch contract's other form) generates without the cache too
    padded = {**prompt, "padding": torch.zeros(2, 5, dtype=torch.bool)}
    c = generate(dec, padded, 3, temperature=0.0, use_cache=False)
    assert torch.equal(c["merchant"], a["merchant"][:, :3])


def test_sampler_truncation():
    logits = torch.tensor([[0.0, 0.0, 5.0, 4.0, 1.0, -1.0]])
    assert sample_logits(logits, temperature=0).item() == 2
    assert sample_logits(torch.tensor([[9.0, 9.0, 1.0, 0.5]]), temperature=0).item() == 2  # no PAD/MASK
    g = torch.Generator().manual_seed(0)
    draws = {sample_logits(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {2, 3}
    draws = {sample_logits(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(100)}
    assert draws == {2}
    draws = {sample_logits(logits, 5.0, generator=g).item() for _ in range(300)}
    assert draws == {2, 3, 4, 5}


def test_time_heads():
    torch.manual_seed(0)
    h = torch.randn(3, 16)
    head = LogNormalMixtureTime(16, 4)
    with torch.no_grad():
        params = head(h)
    params["mu"] = params["mu"] + 2.0  # typical gaps of a few seconds
    p0 = {k: v[:1] for k, v in params.items()}
    y = torch.linspace(0, 30, 300_001, dtype=torch.float64)
    dens = torch.exp(-LogNormalMixtureTime.nll({k: v[:, None] for k, v in p0.items()}, torch.expm1(y)[None]))
    mass_pos = torch.trapezoid(dens[0].double(), y).item()
    w = p0["logits"].softmax(-1)[0]
    normal = torch.distributions.Normal(p0["mu"][0], p0["log_sigma"][0].exp())
    mass_zero = (w * normal.cdf(torch.zeros(4))).sum().item()  # y < 0: simultaneous events
    assert mass_pos + mass_zero == pytest.approx(1.0, abs=1e-3)
    s = LogNormalMixtureTime.sample({k: v[:1].expand(20_000, -1) for k, v in p0.items()}, 1.0,
                                    torch.Generator().manual_seed(0))
    assert (s >= 0).all()
    assert (s == 0).double().mean().item() == pytest.approx(mass_zero, abs=0.02)
    med = torch.quantile(torch.log1p(s), 0.5).item()
    ys = torch.linspace(-10, 30, 100_001)
    cdf = (w[:, None] * normal.cdf(ys[:, None]).T).sum(0)
    assert med == pytest.approx(ys[(cdf >= 0.5).nonzero()[0]].item(), abs=0.1)  # samples follow the mixture
    binned = BinnedTime(16, 10, 1e6)
    p = binned(h)
    s = binned.sample(p, 1.0, torch.Generator().manual_seed(0))
    assert (binned.bin_of(s) == binned.bin_of(s)).all() and (s >= 0).all()
    b = torch.tensor([0, 3, 9])
    lo = torch.expm1(b.double() * binned.y_max / 10)
    assert (binned.bin_of(lo + 1e-3) == b).all()


# ----------------------------------------------------------------------------- time awareness


def test_time_shift_invariance_and_gap_sensitivity():
    torch.manual_seed(0)
    for cls in (PLMEncoder, PLMDecoder):
        model = cls(cfg(TIME_AWARE), TOY_VOCAB, TOY_NUMERIC).eval()
        randomize(model)
        b = random_batch(B=2, T=8, seed=8)
        ref = model(b).hidden
        shifted = dict(b)
        shifted["ts"] = b["ts"] + 123_456_789_012_345  # ~4 years, per sequence constant
        torch.testing.assert_close(model(shifted).hidden, ref, atol=0, rtol=0)  # bit-identical
        row_only = dict(b)
        row_only["ts"] = b["ts"].clone()
        row_only["ts"][1] -= 10**12
        torch.testing.assert_close(model(row_only).hidden, ref, atol=0, rtol=0)
        gap = dict(b)
        gap["ts"] = b["ts"].clone()
        gap["ts"][0, 4:] += 7_200 * 10**6  # one gap two hours longer
        out = model(gap).hidden
        assert not torch.allclose(out[0], ref[0], atol=1e-4)
        close(out[1], ref[1])
    # an index-only model ignores ts entirely
    plain = PLMEncoder(cfg(PositionConfig(rope="index")), TOY_VOCAB, TOY_NUMERIC).eval()
    close(plain(gap).hidden, plain(b).hidden, atol=0)


def test_time_gap_embedding_reads_gaps_within_each_sequence():
    """embedding.time_gap=periodic: the gap since the previous event of the same sequence enters the
    event vector (an index-only model then sees time); padding, packing and a constant shift of a
    sequence's times change nothing; decoders refuse it."""
    from plm.model.batch import previous_gap_seconds

    ts = torch.tensor([[0, 5_000_000, 7_000_000, 0], [10, 10, 3_000_010, 4_000_010]])
    valid = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    seg = torch.tensor([[1, 1, 1, 0], [1, 1, 2, 2]])
    assert previous_gap_seconds(ts, valid, None).tolist() == [[0, 5, 2, 0], [0, 0, 3, 1]]
    assert previous_gap_seconds(ts, valid, seg).tolist() == [[0, 5, 2, 0], [0, 0, 0, 1]]
    torch.manual_seed(0)
    c = cfg(PositionConfig(rope="index"))
    c.embedding.time_gap = "periodic"
    enc = PLMEncoder(c, TOY_VOCAB, TOY_NUMERIC).eval()
    src = random_batch(B=3, T=9, seed=1)
    seqs = [take(src, 0, 0, 5), take(src, 1, 0, 9), take(src, 2, 0, 3)]
    alone = [enc(stack([s])).hidden[0] for s in seqs]
    for s, a in zip(seqs, alone):
        close(enc(pad_right(s, 12)).hidden[0, : len(s["ts"])], a)
        shifted = dict(s)
        shifted["ts"] = s["ts"] + 10**15
        close(enc(stack([shifted])).hidden[0], a)
    packed = pack_sequences(seqs, 12)
    out = enc(packed).hidden
    for r in range(out.shape[0]):
        for sid in range(1, int(packed["segment_ids"][r].max()) + 1):
            h = out[r, packed["segment_ids"][r] == sid]
            assert any(h.shape == a.shape and torch.allclose(h, a, atol=2e-5, rtol=1e-4) for a in alone)
    b = random_batch(B=2, T=8, seed=8)
    gap = dict(b)
    gap["ts"] = b["ts"].clone()
    gap["ts"][0, 4:] += 7_200 * 10**6
    ref, got = enc(b).hidden, enc(gap).hidden
    assert not torch.allclose(got[0], ref[0], atol=1e-4)
    close(got[1], ref[1])
    with pytest.raises(ValueError, match="time_gap is an encoder option"):
        PLMDecoder(c, TOY_VOCAB, TOY_NUMERIC)
    c.embedding.time_gap = "linear"
    with pytest.raises(ValueError, match="unknown embedding.time_gap"):
        c.validate()


def test_time_shift_invariance_in_packed_rows():
    torch.manual_seed(0)
    enc = PLMEncoder(cfg(TIME_AWARE), TOY_VOCAB, TOY_NUMERIC).eval()
    randomize(enc)
    src = random_batch(B=2, T=6, seed=10)
    packed = pack_sequences([take(src, 0), take(src, 1)], 14)
    ref = enc(packed)
    shifted = dict(packed)
    shifted["ts"] = torch.where(packed["segment_ids"] == 2, packed["ts"] + 5 * 10**13, packed["ts"])
    out = enc(shifted)
    torch.testing.assert_close(out.hidden, ref.hidden, atol=0, rtol=0)


# ----------------------------------------------------------------------------- embedding


def test_embedding_specials_padding_and_numeric_modes():
    torch.manual_seed(0)
    for mode in ("bin", "linear", "periodic", "both"):
        for combine in ("sum", "concat"):
            e = EventEmbedding(TOY_VOCAB, list(TOY_NUMERIC), 16,
                               EmbeddingConfig(numeric=mode, combine=combine, field_dim=8, norm=False))
            b = random_batch(B=1, T=6, seed=1, specials=False)
            for k in TOY_VOCAB:
                b[k][0, 1] = PAD
            b["merchant"][0, 2], b["merchant"][0, 3], b["merchant"][0, 4] = MISSING, NA, OOV
            b["amount"][0, 5] = NA
            if combine == "sum":
                # a fully padded event embeds to exactly zero; PAD rows get no gradient
                assert torch.equal(e(b)[0, 1], torch.zeros(16))
            vec = e.field_vectors(b)[list(e.fields).index("merchant")][0]
            assert not torch.allclose(vec[2], vec[3]) and not torch.allclose(vec[3], vec[4])
            base = e(b)
            b2 = copy.deepcopy(b)
            b2["amount_value"][0, 5] = 42.0  # value of an N/A amount is never read
            b2["amount_value"][0, 0] += 1.0  # value of a real amount
            out = e(b2)
            close(out[0, 5], base[0, 5], atol=0)
            assert torch.allclose(out[0, 0], base[0, 0]) == (mode == "bin")
            nan = copy.deepcopy(b)
            nan["amount_value"][0, 5] = float("nan")
            assert torch.isfinite(e(nan)).all()
    e = EventEmbedding(TOY_VOCAB, list(TOY_NUMERIC), 16, EmbeddingConfig(exclude_fields="merchant,dow"))
    assert "merchant" not in e.fields and "merchant" not in e.offsets
    with pytest.raises(ValueError, match="not in field_vocab_sizes"):
        EventEmbedding(TOY_VOCAB, ["nope"], 16, EmbeddingConfig())
    with pytest.raises(ValueError, match=r"exclude_fields names fields \['merchnt'\] that are not in the data \(fields: "):
        EventEmbedding(TOY_VOCAB, list(TOY_NUMERIC), 16, EmbeddingConfig(exclude_fields="merchnt"))


# ----------------------------------------------------------------------------- gradients, MoE, overfit


def _everything_on(pooling: str) -> ModelConfig:
    return ModelConfig(
        d_model=32, n_layers=2, norm="layernorm", dropout=0.1, pooling=pooling,
        embedding=EmbeddingConfig(numeric="periodic", combine="concat", field_dim=8, field_mixer_layers=1, dropout=0.1),
        attention=AttentionConfig(n_heads=4, n_kv_heads=2, bias=True),
        position=PositionConfig(absolute="learned", rope="both", bias="alibi+t5+time_alibi+time_bucket"),
        ffn=FFNConfig(kind="swiglu", n_experts=3, top_k=2, moe_every=2, bias=True),
        heads=HeadsConfig(time="binned", projection_dim=8),
    )


@pytest.mark.parametrize("cls,pooling", [(PLMEncoder, "cls"), (PLMEncoder, "attention"), (PLMDecoder, "mean"),
                                         (PLMEncoder, "last")])
def test_gradients_reach_every_parameter(cls, pooling):
    torch.manual_seed(0)
    c = _everything_on(pooling)
    if cls is PLMDecoder:
        c.heads.time, c.embedding.numeric, c.ffn.kind = "lognormal", "both", "gelu"
    model = cls(c, TOY_VOCAB, TOY_NUMERIC).train()
    b = random_batch(B=3, T=10, seed=11)
    b["attention_mask"] = torch.ones(3, 10, dtype=torch.bool)
    b["attention_mask"][2, 7:] = False
    for k in TOY_VOCAB:  # use every special id somewhere
        b[k][0, :5] = torch.arange(5)
    out = model(b)
    pred = model.heads(out.hidden)
    loss = out.hidden.pow(2).mean() + out.aux_loss
    loss = loss + sum(v.float().pow(2).mean() for v in pred.logits.values())
    loss = loss + sum(v.pow(2).mean() for v in pred.values.values()) + sum(v.pow(2).mean() for v in pred.time.values())
    if out.pooled is not None:
        loss = loss + out.pooled.pow(2).mean()
        if model.projection is not None:
            loss = loss + model.projection(out.pooled).pow(2).mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing
    assert out.aux_loss.item() >= 1.0 - 1e-4  # Switch loss is >= 1, = 1 when balanced


def test_moe_load_balancing_loss_formula():
    from plm.model.layers import MoE

    torch.manual_seed(0)
    moe = MoE(8, 16, FFNConfig(n_experts=4, top_k=1))
    x = torch.randn(2, 5, 8)
    moe(x)
    probs = torch.softmax(moe.router(x.reshape(-1, 8)), -1)
    top = probs.argmax(-1)
    frac = torch.bincount(top, minlength=4).float() / 10
    want = 4 * (frac * probs.mean(0)).sum()
    close(moe.aux_loss, want)
    with torch.no_grad():  # all to one expert: loss n_experts-ish
        moe.router.weight.zero_()
        moe.router.weight[0] = 10.0
    moe(x.abs())
    assert moe.aux_loss.item() > 3.0


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_router_learns_from_the_task_loss(top_k):
    """Top-1 (Switch) routing scales each expert's output by the router's probability: renormalised
    over one choice the weight was exactly 1 and the router got no gradient from the task loss."""
    from plm.model.layers import MoE

    torch.manual_seed(0)
    moe = MoE(8, 16, FFNConfig(n_experts=4, top_k=top_k))
    moe(torch.randn(3, 5, 8)).pow(2).sum().backward()
    assert moe.router.weight.grad.abs().max() > 1e-4


def test_tiny_model_overfits_a_handful_of_sequences():
    torch.manual_seed(0)
    c = load_model_config("tiny")
    dec = PLMDecoder(c, TOY_VOCAB, TOY_NUMERIC).train()
    b = random_batch(B=4, T=16, seed=12, specials=False)
    opt = torch.optim.AdamW(dec.parameters(), lr=3e-3)
    fields = list(TOY_VOCAB)

    def loss_fn():
        pred = dec.heads(dec(b).hidden[:, :-1])
        return sum(F.cross_entropy(pred.logits[f].reshape(-1, TOY_VOCAB[f]), b[f][:, 1:].reshape(-1))
                   for f in fields) / len(fields)

    first = loss_fn().item()
    for _ in range(150):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    dec.eval()
    with torch.no_grad():
        final = loss_fn().item()
        pred = dec.heads(dec(b).hidden[:, :-1])
        acc = (pred.logits["merchant"].argmax(-1) == b["merchant"][:, 1:]).float().mean().item()
    assert final < 0.1 * first and acc > 0.95, (first, final, acc)


# ----------------------------------------------------------------------------- configs and sizes


def test_every_named_config_builds_within_its_size():
    paths = sorted(glob.glob(os.path.join(ROOT, "conf", "model", "*.yaml")))
    names = {os.path.basename(p)[:-5] for p in paths}
    assert {"tiny", "small", "base", "large"} <= names
    limits = {"tiny": (1e5, 1e6), "small": (7e6, 14e6), "base": (80e6, 130e6), "large": (240e6, 360e6)}
    for p in paths:
        c = load_model_config(p)
        n = count_params(c)["total"]
        lo, hi = limits.get(os.path.basename(p)[:-5], (0, 1e12))
        assert lo <= n <= hi, (p, n)
        assert flops_per_event(c)["train"] > 3 * 2 * count_params(c)["trunk"] * 0.9
    # the tiny model really runs, on made-up vocab sizes as well as on the reference ones
    tiny = load_model_config("tiny")
    enc = PLMEncoder(tiny, TOY_VOCAB, TOY_NUMERIC)
    assert sum(p.numel() for p in enc.parameters()) < 1e6
    assert enc(random_batch()).pooled.shape == (2, tiny.d_model)


def test_meta_count_matches_real_build():
    c = load_model_config("tiny")
    real = PLMDecoder(c, TOY_VOCAB, TOY_NUMERIC)
    assert count_params(c, TOY_VOCAB, TOY_NUMERIC, decoder=True)["total"] == sum(p.numel() for p in real.parameters())


def test_config_validation_and_unknown_keys():
    from plm.model.config import model_config_from_dict

    mixed = PLMEncoder(ModelConfig(d_model=32, embedding=EmbeddingConfig(field_mixer_layers=1),
                                   attention=AttentionConfig(n_heads=4, backend="eager", dropout=0.3, bias=True)),
                       TOY_VOCAB, TOY_NUMERIC)
    a = mixed.embed.mixer[0].attn  # the field mixer follows the model's backend and dropout, with its own heads
    assert (a.backend, a.dropout, a.n_heads) == ("eager", 0.3, 2)
    assert not any("bias" in n for n, _ in mixed.embed.mixer[0].attn.named_parameters())  # as before: checkpoints load

    with pytest.raises(ValueError, match="position.bias"):
        model_config_from_dict({"position": {"bias": "alibi+nope"}})
    # bucket settings that built and then divided by zero in the first forward pass
    with pytest.raises(ValueError, match="t5_max_distance=8 > t5_buckets / 2"):
        model_config_from_dict({"position": {"bias": "t5", "t5_buckets": 32, "t5_max_distance": 8}})
    with pytest.raises(ValueError, match="time_buckets=2 needs >= 4"):
        model_config_from_dict({"position": {"bias": "time_bucket", "time_buckets": 2}})
    with pytest.raises(ValueError, match="unknown keys"):
        model_config_from_dict({"attention": {"heads": 4}})
    c = model_config_from_dict({"d_model": 48, "attention": {"n_heads": 6, "n_kv_heads": 2}})
    assert c.head_dim == 8 and c.kv_heads == 2


def test_flops_cli_prints_every_size(capsys):
    flops_main([])
    out = capsys.readouterr().out
    for name in ("tiny", "small", "base", "large"):
        assert name in out


def test_specials_constant_layout():
    assert (PAD, MISSING, NA, OOV, N_SPECIALS) == (0, 3, 4, 2, 5)
    assert T0_US > 0


def test_yaml_configs_merge_into_the_structured_schema():
    """What hydra will do once the lead registers ModelConfig: typed merge of each YAML plus CLI overrides."""
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(ModelConfig)
    for p in sorted(glob.glob(os.path.join(ROOT, "conf", "model", "*.yaml"))):
        merged = OmegaConf.merge(schema, OmegaConf.load(p))
        c = OmegaConf.to_object(merged)
        assert isinstance(c, ModelConfig) and c.validate() is c
        assert c == load_model_config(p)
    over = OmegaConf.merge(schema, OmegaConf.from_dotlist(["position.bias=alibi+time_bucket", "attention.n_kv_heads=1"]))
    c = OmegaConf.to_object(over)
    assert c.position.bias == "alibi+time_bucket" and c.kv_heads == 1


def test_head_switches():
    torch.manual_seed(0)
    c = cfg()
    c.heads = HeadsConfig(tie=False, numeric_regression=False, time="none", exclude_fields="merchant")
    dec = PLMDecoder(c, TOY_VOCAB, TOY_NUMERIC)
    tied = PLMDecoder(cfg(), TOY_VOCAB, TOY_NUMERIC)
    assert not dec.heads.tied and tied.heads.tied == {"event_type", "hour", "dow", "merchant", "amount", "log_dt"}
    n_untied = sum(p.numel() for p in dec.heads.parameters())
    assert n_untied > sum(p.numel() for p in tied.heads.parameters())
    pred = dec.heads(dec(random_batch()).hidden)
    assert "merchant" not in pred.logits and pred.values == {} and pred.time == {}
    assert pred.logits["hour"].shape == (2, 12, TOY_VOCAB["hour"])
    prompt = random_batch(B=2, T=4)
    out = generate(dec, prompt, 3, temperature=0.0)
    assert (out["merchant"] == 1).all()  # no head: MASK is fed back
    assert (out["ts"] == prompt["ts"][:, -1:]).all()  # no time head: dt = 0
    # tied logits really use the embedding rows
    t = tied.heads.logits["merchant"]
    g = torch.randn(3, tied.embed.width)
    close(t(g), g @ tied.embed.field_table("merchant").T + t.bias)


def test_a_field_with_only_special_tokens_is_embedded():
    """A source absent from the data leaves its fields with no fitted value (vocab = specials):
    the model still builds, trains and predicts them."""
    from plm.model.testing import TOY_NUMERIC, TOY_VOCAB, random_batch

    vocab = {**TOY_VOCAB, "category": 5}
    b = random_batch(vocab={k: v for k, v in vocab.items() if k != "category"}, B=2, T=6)
    b["category"] = torch.full_like(b["event_type"], 4)  # NA everywhere
    m = PLMEncoder(load_model_config("tiny"), vocab, list(TOY_NUMERIC))
    out = m(b)
    assert torch.isfinite(out.pooled).all()
    assert m.heads(out.hidden).logits["category"].shape[-1] == 5
    with pytest.raises(ValueError, match="smaller than the 5 special tokens"):
        PLMEncoder(load_model_config("tiny"), {**TOY_VOCAB, "category": 3}, list(TOY_NUMERIC))


def test_rmsnorm_under_cpu_autocast_runs_in_fp32_without_the_fallback_warning():
    """bf16-mixed on CPU hands RMSNorm bf16 activations with its fp32 weight: torch.rms_norm's
    composite fallback warned on every call; the norm now runs in fp32 (CUDA autocast's policy)."""
    import warnings

    from plm.model.layers import make_norm

    norm = make_norm("rmsnorm", 16, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 16))
    x = torch.randn(4, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = norm(x.to(torch.bfloat16))
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, norm(x.to(torch.bfloat16).float()))


def test_a_bf16_model_runs_on_float32_value_columns():
    """trainer.precision=bf16-true casts the weights to bf16: the numeric value columns (float32
    in the batch) are cast to the weights' dtype, not to float32 (a dtype error before)."""
    cfg = ModelConfig(d_model=32, n_layers=1)
    cfg.attention.n_heads = 2
    model = PLMEncoder(cfg.validate(), TOY_VOCAB, TOY_NUMERIC).to(torch.bfloat16)
    out = model(random_batch(B=2, T=6))
    assert out.pooled.dtype == torch.bfloat16 and torch.isfinite(out.pooled.float()).all()
