"""Decoder next-event metrics (plm.eval.next_event) on tiny models and hand-made batches."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from plm.eval.next_event import _tvd, generated_vs_real, next_event_metrics
from plm.model import PLMDecoder, load_model_config
from plm.model.testing import TOY_NUMERIC, TOY_VOCAB, random_batch


def decoder() -> PLMDecoder:
    torch.manual_seed(0)
    return PLMDecoder(load_model_config("tiny"), TOY_VOCAB, list(TOY_NUMERIC)).eval()


def padded_batch(B: int = 4, T: int = 20, seed: int = 0) -> dict:
    b = random_batch(B=B, T=T, seed=seed)
    lens = torch.tensor([T, T - 3, 12, 7][:B])
    mask = torch.arange(T)[None] < lens[:, None]
    b = {k: torch.where(mask, v, torch.zeros_like(v)) for k, v in b.items()}
    b["attention_mask"] = mask
    b["positions"] = torch.arange(T)[None].expand(B, T).clone()
    b["lengths"] = lens
    return b


def test_metrics_match_a_direct_computation_on_one_field():
    model = decoder()
    b = padded_batch()
    res = next_event_metrics(model, [b])
    pf = res["per_field"]["merchant"]
    # direct: targets are event t+1 of the same row where both t and t+1 are real
    with torch.no_grad():
        logits = model.heads(model(b).hidden[:, :-1]).logits["merchant"]
    sel = b["attention_mask"][:, 1:] & b["attention_mask"][:, :-1]
    tgt = b["merchant"][:, 1:][sel].long()
    ce = F.cross_entropy(logits[sel].float(), tgt)
    assert pf["n"] == int(sel.sum()) == (20 - 1) + (17 - 1) + (12 - 1) + (7 - 1)
    assert math.isclose(pf["perplexity"], math.exp(float(ce)), rel_tol=1e-5)
    assert math.isclose(pf["accuracy"], float((logits[sel].argmax(-1) == tgt).float().mean()), rel_tol=1e-6)
    assert res["time"]["n"] == pf["n"] and res["time"]["mae_hours"] > 0 and res["time"]["mae_log1p_s"] > 0


def test_repeat_previous_baseline():
    b = padded_batch()
    b["hour"] = torch.where(b["attention_mask"], torch.full_like(b["hour"], 7), torch.zeros_like(b["hour"]))
    res = next_event_metrics(decoder(), [b])
    assert res["per_field"]["hour"]["repeat_previous_accuracy"] == 1.0
    assert res["per_field"]["merchant"]["repeat_previous_accuracy"] < 0.5


def test_generated_vs_real_reports_every_key_field():
    res = generated_vs_real(decoder(), [padded_batch()], horizon=4, n_users=3, seed=1)
    assert res["users"] == 3 and res["horizon"] == 4
    for f, v in res["per_field"].items():
        for k in ("tvd_generated_vs_real", "tvd_history_vs_real"):
            assert math.isnan(v[k]) or 0.0 <= v[k] <= 1.0, (f, k, v)
    assert set(res["per_field"]) == {"event_type", "merchant", "amount", "log_dt"}
    assert res["median_gap_hours"]["real"] > 0
    again = generated_vs_real(decoder(), [padded_batch()], horizon=4, n_users=3, seed=1)
    assert again == res  # seeded


def test_tvd():
    import numpy as np

    assert _tvd(np.array([1, 1, 2]), np.array([1, 1, 2]), 4) == 0.0
    assert _tvd(np.array([1, 1]), np.array([2, 2]), 4) == 1.0


def test_fields_without_a_head_are_neither_scored_nor_generated():
    """A decoder trained with model.heads.exclude_fields has no logits for them: the metrics
    raised KeyError (after training, in plm-pipeline's eval stage)."""
    torch.manual_seed(0)
    cfg = load_model_config("tiny")
    cfg.heads.exclude_fields = "merchant"
    dec = PLMDecoder(cfg, TOY_VOCAB, TOY_NUMERIC).eval()
    m = next_event_metrics(dec, [padded_batch()])
    assert "merchant" not in m["per_field"] and "event_type" in m["per_field"]
    g = generated_vs_real(dec, [padded_batch(T=20)], horizon=3, n_users=2)
    assert "merchant" not in g["per_field"] and g["users"] == 2
