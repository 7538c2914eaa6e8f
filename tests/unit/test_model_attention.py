"""Attention: backends agree, masks, grouped-query attention, clear errors for unusable backends."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

from plm.model import AttentionConfig, ModelConfig, PLMDecoder, PLMEncoder, PositionConfig
from plm.model.attention import Attention, AttnContext, KVCache, eager_attention, sdpa_attention
from plm.model.batch import pack_sequences
from plm.model.testing import TOY_NUMERIC, TOY_VOCAB, pad_right, random_batch, take

POSITION_SCHEMES = {
    "none": PositionConfig(rope="none"),
    "learned": PositionConfig(rope="none", absolute="learned"),
    "sinusoidal": PositionConfig(rope="none", absolute="sinusoidal"),
    "rope": PositionConfig(rope="index"),
    "time_rope": PositionConfig(rope="time"),
    "rope_both": PositionConfig(rope="both"),
    "alibi": PositionConfig(rope="none", bias="alibi"),
    "t5": PositionConfig(rope="none", bias="t5"),
    "time_alibi": PositionConfig(rope="none", bias="time_alibi"),
    "time_bucket": PositionConfig(rope="none", bias="time_bucket"),
    "rope+time_bias": PositionConfig(rope="index", bias="time_alibi+time_bucket"),
}


def _cfg(pos: PositionConfig, backend: str = "sdpa", n_kv_heads: int = 0) -> ModelConfig:
    return ModelConfig(d_model=32, n_layers=2, attention=AttentionConfig(n_heads=4, n_kv_heads=n_kv_heads,
                                                                         backend=backend), position=pos)


def _randomize_tables(model: nn.Module) -> None:
    """Learned bias tables start at zero; give them values so the comparison means something."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("t5_table", "time_table")):
                p.normal_(0, 0.5)


def _batches():
    b = random_batch(B=3, T=10, seed=3)
    padded = dict(b)
    padded["attention_mask"] = torch.ones(3, 10, dtype=torch.bool)
    padded["attention_mask"][0, 6:] = False
    padded["attention_mask"][2, :3] = False  # left padding too
    packed = pack_sequences([take(b, 0, 0, 4), take(b, 1, 0, 7), take(b, 2, 0, 5), take(b, 0, 4, 9)], 12)
    return {"none": b, "padding": padded, "packed": packed}


@pytest.mark.parametrize("scheme", list(POSITION_SCHEMES))
@pytest.mark.parametrize("cls", [PLMEncoder, PLMDecoder])
def test_sdpa_equals_eager_for_every_mask_and_position_scheme(scheme, cls):
    torch.manual_seed(0)
    ref = cls(_cfg(POSITION_SCHEMES[scheme], "eager"), TOY_VOCAB, TOY_NUMERIC)
    _randomize_tables(ref)
    fast = cls(_cfg(POSITION_SCHEMES[scheme], "sdpa"), TOY_VOCAB, TOY_NUMERIC)
    fast.load_state_dict(ref.state_dict())
    for name, batch in _batches().items():
        a, b = ref(batch), fast(batch)
        valid = a.valid if a.valid is not None else torch.ones(a.hidden.shape[:2], dtype=torch.bool)
        torch.testing.assert_close(a.hidden[valid], b.hidden[valid], atol=2e-5, rtol=1e-4, msg=name)
        assert torch.isfinite(b.hidden).all()  # padding rows are finite too


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("scheme", ["rope", "time_bucket", "rope+time_bias"])
def test_flex_equals_eager_forward_only(scheme):
    torch.manual_seed(0)
    ref = PLMEncoder(_cfg(POSITION_SCHEMES[scheme], "eager", n_kv_heads=2), TOY_VOCAB, TOY_NUMERIC)
    _randomize_tables(ref)
    flex = PLMEncoder(_cfg(POSITION_SCHEMES[scheme], "flex", n_kv_heads=2), TOY_VOCAB, TOY_NUMERIC)
    flex.load_state_dict(ref.state_dict())
    batches = _batches()
    with torch.no_grad():
        for name in ("padding", "packed"):
            a, b = ref(batches[name]), flex(batches[name])
            v = a.valid
            torch.testing.assert_close(a.hidden[v], b.hidden[v], atol=2e-5, rtol=1e-4, msg=name)
    with pytest.raises(RuntimeError, match="forward-only on CPU"):
        flex(batches["none"])  # gradients enabled on CPU: clear error, no fallback


def test_xformers_backend_raises_clear_error_here():
    if importlib.util.find_spec("xformers") is None:
        with pytest.raises(ImportError, match="xformers"):
            Attention(32, AttentionConfig(n_heads=4, backend="xformers"))
    else:  # installed, but there are no CPU kernels
        att = Attention(32, AttentionConfig(n_heads=4, backend="xformers"))
        with pytest.raises(RuntimeError, match="CUDA"):
            att(torch.randn(1, 3, 32), AttnContext())


def test_unknown_backend_and_bad_heads_raise():
    with pytest.raises(ValueError, match="backend"):
        Attention(32, AttentionConfig(n_heads=4, backend="magic"))
    with pytest.raises(ValueError, match="n_kv_heads"):
        _cfg(PositionConfig(), n_kv_heads=3).validate()


def test_mha_equals_torch_multihead_attention_weights_for_weights():
    torch.manual_seed(0)
    d, H = 32, 4
    ours = Attention(d, AttentionConfig(n_heads=H, n_kv_heads=H, bias=True))
    ref = nn.MultiheadAttention(d, H, bias=True, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.qkv.weight)  # rows [q; k; v], heads contiguous in each
        ref.in_proj_bias.copy_(ours.qkv.bias)
        ref.out_proj.weight.copy_(ours.proj.weight)
        ref.out_proj.bias.copy_(ours.proj.bias)
    x = torch.randn(2, 7, d)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    want, _ = ref(x, x, x, key_padding_mask=pad, need_weights=False)
    got = ours(x, AttnContext(mask=~pad[:, None, None, :]))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1)
    want, _ = ref(x, x, x, attn_mask=causal, need_weights=False)
    torch.testing.assert_close(ours(x, AttnContext(is_causal=True)), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_kv", [2, 1])
def test_gqa_equals_mha_with_shared_kv_weights(n_kv):
    """GQA/MQA == MHA whose k/v projections repeat each kv head for its query group."""
    torch.manual_seed(0)
    d, H = 32, 4
    D = d // H
    g = H // n_kv
    gqa = Attention(d, AttentionConfig(n_heads=H, n_kv_heads=n_kv))
    mha = Attention(d, AttentionConfig(n_heads=H, n_kv_heads=H))
    assert gqa.qkv.weight.shape[0] == (H + 2 * n_kv) * D  # smaller projection
    with torch.no_grad():
        wq, wk, wv = gqa.qkv.weight.split([H * D, n_kv * D, n_kv * D])
        rep = lambda w: w.view(n_kv, D, d).repeat_interleave(g, 0).reshape(H * D, d)  # noqa: E731
        mha.qkv.weight.copy_(torch.cat([wq, rep(wk), rep(wv)]))
        mha.proj.weight.copy_(gqa.proj.weight)
    x = torch.randn(2, 6, d)
    for backend in ("sdpa", "eager"):
        gqa.backend = mha.backend = backend
        for ctx in (AttnContext(), AttnContext(is_causal=True), AttnContext(bias=torch.randn(1, H, 6, 6))):
            torch.testing.assert_close(gqa(x, ctx), mha(x, ctx), atol=1e-5, rtol=1e-5)
    y = gqa(x, AttnContext(is_causal=True))
    y.sum().backward()
    assert gqa.qkv.weight.grad.abs().sum() > 0


def test_sdpa_decode_step_gqa_matches_eager():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 1, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    mask = torch.rand(2, 1, 1, 9) > 0.3
    mask[..., -1] = True
    bias = torch.randn(2, 8, 1, 9)
    for ctx in (AttnContext(), AttnContext(mask=mask), AttnContext(mask=mask, bias=bias)):
        torch.testing.assert_close(sdpa_attention(q, k, v, ctx), eager_attention(q, k, v, ctx), atol=1e-5, rtol=1e-5)


def test_kv_cache_memory_scales_with_kv_heads():
    full = KVCache(2, 3, 8, 16, 64)
    mqa = KVCache(2, 3, 1, 16, 64)
    assert full.nbytes == 8 * mqa.nbytes
    cfg = _cfg(PositionConfig(), n_kv_heads=1)
    dec = PLMDecoder(cfg, TOY_VOCAB, TOY_NUMERIC)
    assert dec.new_cache(3, 64).k.shape == (2, 3, 1, 64, 8)


def test_mqa_model_runs_and_learns():
    torch.manual_seed(0)
    dec = PLMDecoder(_cfg(POSITION_SCHEMES["rope"], n_kv_heads=1), TOY_VOCAB, TOY_NUMERIC)
    b = random_batch(B=2, T=8)
    out = dec(b)
    out.hidden.pow(2).mean().backward()
    assert all(p.grad is not None for p in dec.blocks.parameters())


def test_padding_is_never_attended():
    """Garbage in padded events (any ids, values, times) does not reach real events."""
    torch.manual_seed(0)
    enc = PLMEncoder(_cfg(POSITION_SCHEMES["rope+time_bias"]), TOY_VOCAB, TOY_NUMERIC)
    seq = take(random_batch(B=1, T=6, seed=5), 0)
    a = pad_right(seq, 9)
    b = copy.deepcopy(a)
    for k in TOY_VOCAB:
        b[k][0, 6:] = 7
    b["ts"][0, 6:] = 123
    b["amount_value"][0, 6:] = 99.0
    ha, hb = enc(a).hidden[0, :6], enc(b).hidden[0, :6]
    torch.testing.assert_close(ha, hb)
