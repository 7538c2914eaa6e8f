"""Position and time schemes against their direct formulas."""

from __future__ import annotations

import math

import pytest
import torch

from plm.model.positions import (
    alibi_bias,
    alibi_slopes,
    apply_rope,
    bucket_lookup,
    index_frequencies,
    rope,
    rope_cis,
    sinusoidal,
    t5_bias,
    t5_bucket,
    time_alibi_bias,
    time_bucket,
    time_bucket_bias,
    time_frequencies,
)


def test_rope_matches_direct_rotation_formula():
    torch.manual_seed(0)
    B, T, H, D = 2, 5, 3, 8
    q, k = torch.randn(B, T, H, D), torch.randn(B, T, H, D)
    pos = torch.tensor([[0, 1, 2, 7, 100], [3, 3, 4, 5, 6]])
    freqs = index_frequencies(D // 2, 10000.0)
    rq, rk = rope(q, k, pos, freqs)
    for x, rx in ((q, rq), (k, rk)):
        for b in range(B):
            for t in range(T):
                for i in range(D // 2):  # pair (x[2i], x[2i+1]) rotated by pos * theta^(-2i/D)
                    a = pos[b, t].item() * 10000.0 ** (-2 * i / D)
                    x0, x1 = x[b, t, :, 2 * i].double(), x[b, t, :, 2 * i + 1].double()
                    want = torch.stack([x0 * math.cos(a) - x1 * math.sin(a), x0 * math.sin(a) + x1 * math.cos(a)], -1)
                    torch.testing.assert_close(rx[b, t, :, 2 * i : 2 * i + 2].double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["index", "time"])
def test_rope_scores_depend_only_on_relative_position(kind):
    torch.manual_seed(1)
    D = 16
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)
    if kind == "index":
        freqs = index_frequencies(D // 2)
        shifts, pairs = [0, 5, 117], [(3, 10), (10, 3), (0, 0)]
    else:
        freqs = time_frequencies(D // 2, 60.0, 3.15e7)
        shifts, pairs = [0.0, 86_400.0 * 3, 1e6 + 0.5], [(0.0, 3600.0), (7200.0, 60.0), (5.0, 5.0)]

    def score(pq, pk):
        cq = rope_cis(torch.tensor([[float(pq)]], dtype=torch.float64)[..., None] * freqs)
        ck = rope_cis(torch.tensor([[float(pk)]], dtype=torch.float64)[..., None] * freqs)
        return (apply_rope(q, cq) * apply_rope(k, ck)).sum().item()

    for pq, pk in pairs:
        base = score(pq, pk)
        for s in shifts:
            assert score(pq + s, pk + s) == pytest.approx(base, abs=1e-4)
    assert score(*pairs[0]) != pytest.approx(score(*pairs[1]), abs=1e-3)  # not position-blind


def test_time_frequencies_span_minutes_to_a_year():
    w = time_frequencies(8, 60.0, 3.15e7)
    periods = (2 * math.pi / w).tolist()
    assert periods[0] == pytest.approx(60.0) and periods[-1] == pytest.approx(3.15e7)
    ratios = [b / a for a, b in zip(periods, periods[1:])]
    assert max(ratios) == pytest.approx(min(ratios))  # log-spaced


def test_bucket_lookup_gradient_matches_indexing():
    torch.manual_seed(0)
    table = torch.randn(6, 3, requires_grad=True)
    bucket = torch.randint(0, 6, (2, 4, 5))
    g = torch.randn(2, 3, 4, 5)
    want = table[bucket].permute(0, 3, 1, 2)
    (want * g).sum().backward()
    ref = table.grad.clone()
    table.grad = None
    got = bucket_lookup(table, bucket)
    torch.testing.assert_close(got, want)
    (got * g).sum().backward()
    torch.testing.assert_close(table.grad, ref)


def test_sinusoidal_direct_formula():
    pos = torch.tensor([[0, 1, 5, 300]])
    dim = 8
    got = sinusoidal(pos, dim)
    for t, p in enumerate(pos[0].tolist()):
        for i in range(dim // 2):
            w = 10000.0 ** (-i / (dim // 2))
            assert got[0, t, i].item() == pytest.approx(math.sin(p * w), abs=1e-6)
            assert got[0, t, dim // 2 + i].item() == pytest.approx(math.cos(p * w), abs=1e-6)


def test_alibi_slopes_and_bias_direct_formula():
    assert alibi_slopes(8).tolist() == pytest.approx([2.0 ** -(i + 1) for i in range(8)])
    assert alibi_slopes(4).tolist() == pytest.approx([2.0 ** (-2 * (i + 1)) for i in range(4)])
    s6 = alibi_slopes(6).tolist()  # 4 from the power of two below, then every other slope of 8
    assert s6 == pytest.approx([2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3])
    pos = torch.tensor([[0, 1, 2, 5]])
    b = alibi_bias(pos, pos, alibi_slopes(4))
    assert b.shape == (1, 4, 4, 4)
    for h, m in enumerate(alibi_slopes(4).tolist()):
        for i in range(4):
            for j in range(4):
                assert b[0, h, i, j].item() == pytest.approx(-m * abs(pos[0, i].item() - pos[0, j].item()))


def _t5_bucket_scalar(rel: int, bidirectional: bool, n: int, max_distance: int) -> int:
    """Mesh-TensorFlow's _relative_position_bucket, written out for one integer."""
    ret = 0
    if bidirectional:
        n //= 2
        if rel > 0:
            ret += n
        d = abs(rel)
    else:
        d = max(-rel, 0)
    max_exact = n // 2
    if d < max_exact:
        return ret + d
    v = max_exact + int(math.log(d / max_exact) / math.log(max_distance / max_exact) * (n - max_exact))
    return ret + min(v, n - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_buckets_and_bias_direct_formula(bidirectional):
    rel = torch.arange(-300, 301)
    got = t5_bucket(rel, bidirectional, 32, 128).tolist()
    want = [_t5_bucket_scalar(r, bidirectional, 32, 128) for r in rel.tolist()]
    assert got == want
    table = torch.randn(32, 3)
    pos = torch.tensor([[0, 4, 9, 200]])
    b = t5_bias(pos, pos, table, bidirectional, 128)
    for i in range(4):
        for j in range(4):
            r = pos[0, j].item() - pos[0, i].item()
            torch.testing.assert_close(b[0, :, i, j], table[_t5_bucket_scalar(r, bidirectional, 32, 128)])


def test_time_alibi_direct_formula():
    t = torch.tensor([[0.0, 30.0, 3600.0, 86_400.0 * 10]], dtype=torch.float64)
    slopes = alibi_slopes(4)
    b = time_alibi_bias(t, t, slopes, 3600.0)
    for h, m in enumerate(slopes.tolist()):
        for i in range(4):
            for j in range(4):
                want = -m * math.log1p(abs(t[0, j].item() - t[0, i].item()) / 3600.0)
                assert b[0, h, i, j].item() == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_time_buckets_direct_formula(bidirectional):
    n, max_gap = 16, 1e6
    dts = [0.0, 0.5, 1.0, 59.0, 3600.0, -3600.0, 86_400.0, -86_400.0 * 3, 1e6, -1e9]
    got = time_bucket(torch.tensor(dts, dtype=torch.float64), n, max_gap, bidirectional).tolist()
    half = n // 2 if bidirectional else n
    want = []
    for dt in dts:
        m = min(max(int(math.floor(math.log1p(abs(dt)) * (half - 1) / math.log1p(max_gap))), 0), half - 1)
        m = half - 1 if abs(dt) >= max_gap else m
        want.append(m + (half if bidirectional and dt > 0 else 0))
    assert got == want
    g = torch.Generator().manual_seed(0)
    many = torch.exp(torch.rand(2000, generator=g, dtype=torch.float64) * 25) * torch.sign(torch.randn(2000, generator=g))
    got = time_bucket(many, n, max_gap, bidirectional).tolist()
    for dt, b in zip(many.tolist(), got):
        m = min(max(int(math.floor(math.log1p(abs(dt)) * (half - 1) / math.log1p(max_gap))), 0), half - 1)
        assert b == m + (half if bidirectional and dt > 0 else 0), dt
    table = torch.randn(n, 2)
    t = torch.tensor([[0.0, 10.0, 5000.0]], dtype=torch.float64)
    b = time_bucket_bias(t, t, table, bidirectional, max_gap)
    for i in range(3):
        for j in range(3):
            k = time_bucket((t[0, j] - t[0, i]).reshape(1), n, max_gap, bidirectional).item()
            torch.testing.assert_close(b[0, :, i, j], table[k])
