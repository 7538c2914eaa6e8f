"""Unit tests of the pre-training losses (plm.train.objectives) on hand-made batches."""

from __future__ import annotations

import torch

from plm.model import ModelConfig, PLMDecoder, PLMEncoder
from plm.model.batch import MASK, N_SPECIALS, PAD, pack_sequences, sequence_index, value_key
from plm.model.config import EmbeddingConfig
from plm.model.testing import TOY_NUMERIC, TOY_VOCAB, random_batch, take
from plm.train.module import lr_lambda
from plm.train.objectives import (
    ContrastiveObjective,
    MaskedEventObjective,
    NextEventObjective,
    crop_views,
    field_losses,
    info_nce,
    next_event_targets,
    sequence_spans,
)

torch.set_num_threads(1)


def tiny_cfg(**kw) -> ModelConfig:
    c = ModelConfig(d_model=32, n_layers=1)
    c.attention.n_heads = 2
    for k, v in kw.items():
        setattr(c, k, v)
    return c.validate()


def padded_batch(B=3, T=10, seed=0):
    b = random_batch(B=B, T=T, seed=seed)
    lens = torch.tensor([T, T - 4, 3])[:B]
    m = torch.arange(T)[None] < lens[:, None]
    for k in list(b):
        b[k] = torch.where(m, b[k], torch.zeros_like(b[k]))
    b["attention_mask"] = m
    return b


def packed_batch(seed=0):
    src = random_batch(B=4, T=6, seed=seed)
    seqs = [take(src, 0, 0, 5), take(src, 1, 0, 3), take(src, 2, 0, 6), take(src, 3, 0, 2)]
    return pack_sequences(seqs, 8)


def test_masking_never_touches_padding_and_masks_ids_and_values():
    b = padded_batch()
    obj = MaskedEventObjective(event_prob=0.5, field_prob=0.3)
    g = torch.Generator().manual_seed(0)
    masks = obj.make_masks(b, list(TOY_VOCAB), g)
    for f, m in masks.items():
        assert not (m & ~b["attention_mask"]).any(), f
        assert m.any()
    masked = obj.apply_masks(b, masks)
    for f, m in masks.items():
        assert (masked[f][m] == MASK).all()
        assert (masked[f][~m] == b[f][~m]).all()
        assert (masked[f][~b["attention_mask"]] == PAD).all()
        if value_key(f) in b:
            assert (masked[value_key(f)][m] == 0).all()
    # whole-event masking: with field_prob 0 every field shares the event mask
    masks = MaskedEventObjective(0.5, 0.0).make_masks(b, list(TOY_VOCAB), torch.Generator().manual_seed(1))
    ms = list(masks.values())
    assert all(torch.equal(ms[0], m) for m in ms)


def test_masks_depend_only_on_generator():
    b = padded_batch()
    obj = MaskedEventObjective(0.3, 0.1)
    a = obj.make_masks(b, list(TOY_VOCAB), torch.Generator().manual_seed(5))
    c = obj.make_masks(b, list(TOY_VOCAB), torch.Generator().manual_seed(5))
    assert all(torch.equal(a[f], c[f]) for f in a)


def test_perfect_logits_give_near_zero_loss_and_full_accuracy():
    b = padded_batch()
    where = {f: b["attention_mask"] for f in TOY_VOCAB}
    logits = {f: torch.nn.functional.one_hot(b[f].long(), v).float() * 100.0 for f, v in TOY_VOCAB.items()}
    res = field_losses(logits, {}, {f: b[f] for f in TOY_VOCAB}, {}, where, "m", 0.0)
    assert res.loss.item() < 1e-6
    for f in TOY_VOCAB:
        assert res.metrics[f"m/acc_{f}"].item() == 1.0
    # uniform logits: loss = log V averaged over fields
    logits = {f: torch.zeros(*b[f].shape, v) for f, v in TOY_VOCAB.items()}
    res = field_losses(logits, {}, {f: b[f] for f in TOY_VOCAB}, {}, where, "m", 0.0)
    expect = torch.tensor([float(torch.log(torch.tensor(float(v)))) for v in TOY_VOCAB.values()]).mean()
    assert abs(res.loss.item() - expect.item()) < 1e-5
    # perfect regression values add ~0
    vals = {f: b[value_key(f)] for f in TOY_NUMERIC}
    logits = {f: torch.nn.functional.one_hot(b[f].long(), v).float() * 100.0 for f, v in TOY_VOCAB.items()}
    res = field_losses(logits, vals, {f: b[f] for f in TOY_VOCAB}, vals, where, "m", 1.0)
    assert res.loss.item() < 1e-6


def test_padding_targets_are_ignored():
    b = padded_batch()
    where = {f: torch.ones_like(b["attention_mask"]) for f in TOY_VOCAB}  # even padding selected
    logits = {f: torch.nn.functional.one_hot(b[f].long(), v).float() * 100.0 for f, v in TOY_VOCAB.items()}
    for f in logits:  # make padding positions wrong: must not matter
        logits[f][~b["attention_mask"]] = 0.0
    res = field_losses(logits, {}, {f: b[f] for f in TOY_VOCAB}, {}, where, "m", 0.0)
    assert res.loss.item() < 1e-6


def test_masked_objective_runs_and_backprops():
    torch.manual_seed(0)
    model = PLMEncoder(tiny_cfg(), TOY_VOCAB, list(TOY_NUMERIC))
    for b in (padded_batch(), packed_batch()):
        res = MaskedEventObjective(0.3, 0.1)(model, b, torch.Generator().manual_seed(0))
        assert torch.isfinite(res.loss)
        res.loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        assert set(res.ce_sums) <= set(TOY_VOCAB)


def test_last_event_query_masks_each_sequence_end_and_censors_its_time():
    """last_prob=1 masks exactly the last event of every sequence (packed and padded batches);
    last_jitter moves only those events' ts, into (previous event, own time]; targets unchanged."""
    fields = list(TOY_VOCAB)
    for b in (padded_batch(), packed_batch()):
        b["ts"] = torch.cumsum(torch.randint(1, 10**9, b["ts"].shape), 1) * (_valid_of(b)).long()
        obj = MaskedEventObjective(event_prob=0.0, field_prob=0.0, last_prob=1.0, last_jitter=True)
        g = torch.Generator().manual_seed(0)
        last, r, c = obj.last_events(b, g)
        row, first, length = sequence_spans(b)
        want = torch.zeros_like(last)
        want[row, first + length - 1] = True
        assert torch.equal(last, want)
        masks = obj.make_masks(b, fields, g, last)
        assert all(torch.equal(m, want) for m in masks.values())
        moved = obj.jitter_times(b, r, c, g)["ts"]
        assert torch.equal(moved[~want], b["ts"][~want])
        for rr, cc, n in zip(row, first + length - 1, length):
            if n > 1:
                assert b["ts"][rr, cc - 1] <= moved[rr, cc] <= b["ts"][rr, cc]
            else:
                assert moved[rr, cc] == b["ts"][rr, cc]
        assert (moved[want] < b["ts"][want]).any()
    half = MaskedEventObjective(event_prob=0.0, last_prob=0.5)
    n = [int(half.last_events(packed_batch(), torch.Generator().manual_seed(s))[0].sum()) for s in range(40)]
    assert 1.5 < sum(n) / len(n) < 2.5  # 4 sequences, half of their ends on average
    model = PLMEncoder(tiny_cfg(), TOY_VOCAB, TOY_NUMERIC)
    res = MaskedEventObjective(0.0, 0.0, last_prob=1.0, last_jitter=True)(model, padded_batch(), torch.Generator())
    res.loss.backward()
    assert torch.isfinite(res.loss)


def test_replaced_events_come_from_other_sequences_and_train_the_detector():
    """replace_prob swaps only real, eligible events, each for an eligible event of another
    sequence (every field but the kept ones, never ts); the head learns to spot them; the objective
    refuses a model without the head."""
    from plm.model.batch import sequence_index

    fields = list(TOY_VOCAB)
    keep = (fields[0],)
    obj = MaskedEventObjective(0.15, 0.0, replace_prob=0.5, replace_keep=keep)
    for b in (padded_batch(), packed_batch()):
        valid = _valid_of(b)
        eligible = torch.rand(valid.shape, generator=torch.Generator().manual_seed(1)) < 0.7
        out, swapped = obj.replace_events(b, fields, eligible, torch.Generator().manual_seed(0))
        assert swapped.any() and not (swapped & ~(eligible & valid)).any()
        assert torch.equal(out["ts"], b["ts"]) and torch.equal(out[keep[0]], b[keep[0]])
        seq = sequence_index(b, b.get("attention_mask"))[0]
        others = [f for f in fields if f != keep[0]]
        for r, c in swapped.nonzero().tolist():
            # the swapped-in event is a real event of another sequence, all its fields at once
            same = torch.ones_like(valid)
            for f in others:
                same &= b[f] == out[f][r, c]
                vk = value_key(f)
                if vk in b:
                    same &= b[vk] == out[vk][r, c]
            # ... and an eligible (unmasked) one: an event masked in this pass is never copied
            assert (same & valid & eligible & (seq != seq[r, c])).any()
        for f in others:  # untouched events keep their content
            assert torch.equal(out[f][~swapped], b[f][~swapped])
    cfg = tiny_cfg()
    cfg.heads.replaced = True
    torch.manual_seed(0)
    model = PLMEncoder(cfg, TOY_VOCAB, list(TOY_NUMERIC))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    learn = MaskedEventObjective(0.15, 0.0, replace_prob=0.25)  # keeps log_dt, hour, dow
    losses = []
    for step in range(100):
        b = random_batch(B=8, T=12, seed=step % 4)
        for f in ("merchant", "event_type", "hour", "dow"):  # a profile per user (hour, dow: kept)
            b[f] = N_SPECIALS + torch.arange(8)[:, None].expand(8, 12) % (TOY_VOCAB[f] - N_SPECIALS)
        res = learn(model, b, torch.Generator().manual_seed(step))
        opt.zero_grad()
        res.loss.backward()
        opt.step()
        losses.append(float(res.metrics["masked/replaced_loss"]))
    assert 0.1 < float(res.metrics["masked/replaced_fraction"]) < 0.9
    assert sum(losses[:10]) / 10 > 0.45 and sum(losses[-10:]) / 10 < 0.2  # the detector learns
    import pytest

    with pytest.raises(ValueError, match="model.heads.replaced=true"):
        obj(PLMEncoder(tiny_cfg(), TOY_VOCAB, list(TOY_NUMERIC)), padded_batch(), torch.Generator())


def test_membership_matches_masked_events_to_their_own_user():
    """objective.masked.membership_weight: each event masked whole is scored against every
    sequence's pooled vector and must find its own; with a per-user profile the head learns it
    (accuracy far above chance); packed batches score against segments, not rows; without the
    head the objective says which setting is missing."""
    import pytest

    cfg = tiny_cfg()
    cfg.heads.membership_dim = 16
    cfg.heads.membership_bank = 8
    torch.manual_seed(0)
    model = PLMEncoder(cfg, TOY_VOCAB, list(TOY_NUMERIC))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    obj = MaskedEventObjective(0.3, 0.0, membership_weight=1.0)
    accs, losses = [], []
    for step in range(80):
        b = random_batch(B=8, T=12, seed=step % 4)
        # a profile per user: its merchant and MCC (the masked event's own key must meet its user)
        for f in ("merchant", "event_type"):
            b[f] = N_SPECIALS + (torch.arange(8)[:, None] + step) % (TOY_VOCAB[f] - N_SPECIALS)
            b[f] = b[f].expand(8, 12).clone()
        res = obj(model, b, torch.Generator().manual_seed(step))
        opt.zero_grad()
        res.loss.backward()
        opt.step()
        accs.append(float(res.metrics["masked/membership_acc"]))
        losses.append(float(res.metrics["masked/membership_loss"]))
    assert sum(accs[:5]) / 5 < 0.5 and sum(accs[-10:]) / 10 > 0.9, (accs[:5], accs[-10:])
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    # packed: one candidate per segment (4 sequences in 2 rows), the loss finite
    pb = packed_batch()
    res = obj(model, pb, torch.Generator().manual_seed(0))
    assert torch.isfinite(res.loss) and float(res.metrics["masked/membership_loss"]) > 0
    q, k = run_net_membership(model, obj, pb)
    assert q.shape[0] == 4
    with pytest.raises(ValueError, match="model.heads.membership_dim > 0"):
        obj(PLMEncoder(tiny_cfg(), TOY_VOCAB, list(TOY_NUMERIC)), padded_batch(), torch.Generator())


def test_membership_bank_counts_events_and_is_exported():
    """heads.membership_bank: per-user log1p sums of ReLU detectors of the final states, the same
    for a packed batch and for its rows; they feed the membership query (gradients reach the
    bank), and plm-export's `bank` part (in `model`) returns them; a model without a bank refuses
    `bank`, and a bank without the head is a config error."""
    import pytest

    from plm.export.model import Embedder
    from plm.model.batch import sequence_index

    cfg = tiny_cfg()
    cfg.heads.membership_dim, cfg.heads.membership_bank = 16, 6
    torch.manual_seed(0)
    model = PLMEncoder(cfg, TOY_VOCAB, list(TOY_NUMERIC)).eval()
    head = model.membership
    assert head.bank.out_features == 6
    b = padded_batch()
    with torch.no_grad():
        out = model(b)
        seq, n = sequence_index(b, out.valid)
        counts = head.counts(out.hidden, seq, n)
        rows = head.counts_rows(out.hidden, b["attention_mask"].bool())
        f = torch.relu(head.bank(out.hidden)) * b["attention_mask"][..., None]
    torch.testing.assert_close(counts, rows)
    torch.testing.assert_close(counts, torch.log1p(f.sum(1)))  # a sum over real events, not a mean
    emb = Embedder(model, "model")
    assert emb.pooling == "mean+bank" and emb.dim == cfg.d_model + 6
    with torch.no_grad():
        torch.testing.assert_close(emb(b)[:, cfg.d_model:], rows)
    model.train()
    res = MaskedEventObjective(0.3, 0.0, membership_weight=1.0)(model, b, torch.Generator().manual_seed(0))
    res.loss.backward()
    assert head.bank.weight.grad is not None and head.bank.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="membership bank"):
        Embedder(PLMEncoder(tiny_cfg(), TOY_VOCAB, list(TOY_NUMERIC)), "mean+bank")
    bad = tiny_cfg()
    bad.heads.membership_bank = 4
    with pytest.raises(ValueError, match="membership_bank=4 needs heads.membership_dim > 0"):
        bad.validate()


def test_membership_config_is_checked_and_the_unused_head_frozen():
    """membership_weight needs the head; the head without the weight is frozen; a decoder builds
    no head (plm-train prints that it has no effect); a bad temperature is named."""
    from dataclasses import asdict

    import pytest

    from plm.train.config import ObjectiveConfig
    from plm.train.module import PretrainModule

    def module(dim: int, objective: str = "masked", **masked):
        cfg = tiny_cfg()
        cfg.heads.membership_dim = dim
        obj = ObjectiveConfig()
        getattr(obj, objective).weight = 1.0
        for k, v in masked.items():
            setattr(obj.masked, k, v)
        return PretrainModule(asdict(cfg), TOY_VOCAB, list(TOY_NUMERIC), asdict(obj), {})

    with pytest.raises(ValueError, match="model.heads.membership_dim > 0"):
        module(0, membership_weight=0.5)
    assert getattr(module(16, objective="next").model, "membership", None) is None  # plm-train says so
    with pytest.raises(ValueError, match="membership_temperature > 0"):
        module(16, membership_weight=0.5, membership_temperature=0.0)
    on, off = module(16, membership_weight=0.5), module(16)
    assert on.model.membership.query.weight.requires_grad and "membership.query.weight" not in on.frozen
    assert not off.model.membership.query.weight.requires_grad and "membership.key.0.weight" in off.frozen


def run_net_membership(model, obj, b):
    from plm.train.objectives import run_net

    sel = _valid_of(b).clone()
    out, _, _ = run_net(model, b, member_events=b, member_sel=sel)
    q, k = out.membership
    assert k.shape[0] == int(sel.sum())
    assert torch.allclose(q.norm(dim=-1), torch.ones(q.shape[0]), atol=1e-5)
    return q, k


def _valid_of(b):
    return b["attention_mask"] if "attention_mask" in b else b["segment_ids"] != 0


def test_next_event_targets_shift_within_segments():
    b = packed_batch()
    has_next, idx = next_event_targets(b)
    seg = b["segment_ids"]
    B, T = seg.shape
    for r in range(B):
        for t in range(T):
            expect = t + 1 < T and seg[r, t] != 0 and seg[r, t + 1] == seg[r, t]
            assert bool(has_next[r, t]) == bool(expect), (r, t)
    # the last event of every segment has no target; never crosses into the next segment
    assert not has_next[:, -1].any()
    # padded (unpacked) rows: the last real event has no next
    p = padded_batch()
    hn, _ = next_event_targets(p)
    lens = p["attention_mask"].sum(1)
    for r in range(3):
        assert hn[r].sum() == lens[r] - 1
        assert not hn[r, lens[r] - 1]


def test_next_event_objective_perfect_prediction_and_time():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = PLMDecoder(cfg, TOY_VOCAB, list(TOY_NUMERIC))
    b = packed_batch()
    res = NextEventObjective(time_weight=1.0)(model, b)
    assert torch.isfinite(res.loss) and "next/loss_time" in res.metrics
    res.loss.backward()
    # the targets fed to the loss are the next event's ids of the same segment
    from plm.train.objectives import shift_left

    f = "merchant"
    hn, _ = next_event_targets(b)
    tgt = shift_left(b[f])
    r, t = hn.nonzero()[0].tolist()
    assert tgt[r, t] == b[f][r, t + 1]


def test_sequence_spans_and_crops_stay_inside_each_sequence():
    b = packed_batch()
    row, col, length = sequence_spans(b)
    assert length.tolist() == [5, 3, 6, 2] or sorted(length.tolist()) == [2, 3, 5, 6]
    g = torch.Generator().manual_seed(0)
    v = crop_views(b, list(TOY_VOCAB), 2, 0.5, 1.0, 1, g)
    N = len(length)
    n = v["attention_mask"].sum(1)
    assert v["attention_mask"].shape[0] == 2 * N
    for i in range(2 * N):
        s = i % N
        assert 1 <= n[i] <= length[s]
        # every cropped ts lies inside the source sequence, in order
        src_ts = b["ts"][row[s], col[s] : col[s] + length[s]]
        got = v["ts"][i, : n[i]]
        assert all(x in src_ts.tolist() for x in got.tolist())
        assert (got[1:] >= got[:-1]).all()
        assert (v["merchant"][i, n[i]:] == PAD).all()


def test_packed_views_are_the_padded_views():
    """crop_views_packed lays out exactly crop_views' sub-sequences (same draws), in fewer padded
    slots, and after `order` the model pools every view to the same vector as unpacked."""
    from plm.train.objectives import crop_views_packed

    cfg = tiny_cfg()
    cfg.position.rope = "time"
    cfg.embedding.time_gap = "periodic"
    cfg = cfg.validate()
    torch.manual_seed(0)
    model = PLMEncoder(cfg, TOY_VOCAB, list(TOY_NUMERIC)).eval()
    fields = list(TOY_VOCAB)
    for b in (padded_batch(T=16), packed_batch(), random_batch(B=5, T=20, seed=3)):
        pad = crop_views(b, fields, 2, 0.3, 1.0, 2, torch.Generator().manual_seed(7))
        packed, order = crop_views_packed(b, fields, 2, 0.3, 1.0, 2, torch.Generator().manual_seed(7))
        assert packed["ts"].shape[1] == b["ts"].shape[1]
        assert int(packed["attention_mask"].sum()) == int(pad["attention_mask"].sum())
        assert packed["ts"].numel() <= pad["ts"].numel() or pad["ts"].shape[0] == 1
        assert sorted(order.tolist()) == list(range(len(order)))
        seq = sequence_index(packed, None)[0]
        for v, i in enumerate(order.tolist()):  # view v's events, in order, with its positions
            m = seq == i
            n = int(pad["attention_mask"][v].sum())
            for k in fields + ["ts"]:
                assert torch.equal(packed[k][m], pad[k][v, :n])
            assert torch.equal(packed["positions"][m], torch.arange(n))
        with torch.no_grad():
            zp = model(pad).pooled
            zk = model(packed).pooled[order]
        torch.testing.assert_close(zk, zp, rtol=1e-4, atol=1e-5)


def test_info_nce_identical_views_beat_shuffled():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 8, generator=g)
    same, acc = info_nce(z, z.clone(), 0.1, gather=False)
    shuffled, _ = info_nce(z, z[torch.randperm(16, generator=g)], 0.1, gather=False)
    assert same.item() < shuffled.item()
    assert acc.item() == 1.0


def test_contrastive_objective_runs():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    cfg.heads.projection_dim = 16
    model = PLMEncoder(cfg, TOY_VOCAB, list(TOY_NUMERIC))
    res = ContrastiveObjective(0.1, 0.5, 1.0, 1)(model, packed_batch(), torch.Generator().manual_seed(0))
    assert torch.isfinite(res.loss)
    res.loss.backward()
    assert model.projection.net[0].weight.grad is not None


def test_specials_are_not_regression_targets():
    b = padded_batch()
    where = {f: b["attention_mask"] for f in TOY_VOCAB}
    logits = {f: torch.nn.functional.one_hot(b[f].long(), v).float() * 100.0 for f, v in TOY_VOCAB.items()}
    vals = {f: torch.where(b[f] >= N_SPECIALS, b[value_key(f)], torch.full_like(b[value_key(f)], 1e3))
            for f in TOY_NUMERIC}
    res = field_losses(logits, {f: b[value_key(f)] for f in TOY_NUMERIC}, {f: b[f] for f in TOY_VOCAB}, vals,
                       where, "m", 1.0)
    assert res.loss.item() < 1e-6


def test_lr_schedule_warmup_then_cosine():
    assert lr_lambda(0, 10, 100, 0.1) == 0.1
    assert lr_lambda(9, 10, 100, 0.1) == 1.0
    assert abs(lr_lambda(100, 10, 100, 0.1) - 0.1) < 1e-9
    assert 0.1 < lr_lambda(55, 10, 100, 0.1) < 1.0


def test_weight_decay_on_linear_matrices_only():
    """Decay on every linear map's matrix (the event embedding's projection and field mixer
    included), never on embedding tables (fields, learned positions, T5 biases), norms or biases."""
    from dataclasses import asdict

    from plm.train.module import PretrainModule

    c = tiny_cfg()
    c.embedding.combine, c.embedding.field_mixer_layers = "concat", 1
    c.position.absolute, c.position.bias = "learned", "t5"
    mod = PretrainModule(asdict(c.validate()), TOY_VOCAB, list(TOY_NUMERIC), {"masked": {"weight": 1.0}},
                         {"weight_decay": 0.1}, {"max_steps": 10})
    decay, no_decay = (g["params"] for g in mod.configure_optimizers()["optimizer"].param_groups)
    name = {id(p): n.removeprefix("model.") for n, p in mod.net.named_parameters()}
    decayed = {name[id(p)] for p in decay}
    assert "embed.proj.weight" in decayed and any(n.startswith("embed.mixer.") for n in decayed)
    assert "blocks.0.attn.qkv.weight" in decayed
    kept = {name[id(p)] for p in no_decay}
    assert "positions.absolute.weight" in kept and "positions.t5_table" in kept
    assert all(not (n.endswith(".bias") or "norm" in n) for n in decayed)
    assert all(not n.startswith("embed.table") for n in decayed)


def test_replaced_event_config_is_checked_and_the_unused_head_frozen(tmp_path):
    """The module refuses replace_prob without the head and an unknown kept field; with the
    head but no swapping, the head is frozen (no unused trainable parameters under DDP)."""
    from dataclasses import asdict

    import pytest

    from plm.train.config import ObjectiveConfig
    from plm.train.module import PretrainModule

    def module(replaced: bool, **masked):
        cfg = tiny_cfg()
        cfg.heads.replaced = replaced
        obj = ObjectiveConfig()
        obj.masked.weight = 1.0
        for k, v in masked.items():
            setattr(obj.masked, k, v)
        return PretrainModule(asdict(cfg), TOY_VOCAB, list(TOY_NUMERIC), asdict(obj), {})

    with pytest.raises(ValueError, match="model.heads.replaced=true"):
        module(False, replace_prob=0.1)
    with pytest.raises(ValueError, match="last_jitter=true .* last_prob=0 never masks"):
        module(False, last_jitter=True)
    with pytest.raises(ValueError, match="replace_keep.*'hour_of_day'"):
        module(True, replace_prob=0.1, replace_keep="log_dt,hour_of_day")
    with pytest.raises(ValueError, match="model.heads.membership_dim > 0"):
        module(False, membership_weight=1.0)
    on = module(True, replace_prob=0.1)
    assert on.model.heads.replaced.weight.requires_grad
    off = module(True)
    assert not off.model.heads.replaced.weight.requires_grad
    assert "heads.replaced.weight" in off.frozen and "heads.replaced.weight" not in on.frozen  # named from the model
    # options with no effect are refused when training starts (checkpoints that have them still load)
    from plm.export.model import load_checkpoint

    masked = ObjectiveConfig()
    masked.masked.weight = 1.0
    with pytest.raises(ValueError, match="model.embedding.field_dim=16 applies to combine=concat only"):
        PretrainModule(asdict(tiny_cfg(embedding=EmbeddingConfig(combine="sum", field_dim=16))), TOY_VOCAB,
                       list(TOY_NUMERIC), asdict(masked), {})
    bad = tiny_cfg()
    bad.heads.exclude_fields = "merchnt"
    with pytest.raises(ValueError, match=r"model.heads.exclude_fields names fields \['merchnt'\]"):
        PretrainModule(asdict(bad), TOY_VOCAB, list(TOY_NUMERIC), asdict(masked), {})
    old = tiny_cfg(embedding=EmbeddingConfig(combine="sum", field_dim=16))
    old.heads.exclude_fields = "merchnt"
    enc = PLMEncoder(old, TOY_VOCAB, list(TOY_NUMERIC))
    torch.save({"model": enc.state_dict(), "model_config": asdict(old), "vocab_sizes": TOY_VOCAB,
                "numeric_fields": list(TOY_NUMERIC), "arch": "encoder"}, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt").arch == "encoder"
    # a decoder has no pooling of its own: model.pooling is refused, not ignored
    cfg, obj = tiny_cfg(), ObjectiveConfig()
    cfg.pooling, obj.masked.weight, obj.next.weight = "attention", 0.0, 1.0
    with pytest.raises(ValueError, match="model.pooling=attention is an encoder option"):
        PretrainModule(asdict(cfg), TOY_VOCAB, list(TOY_NUMERIC), asdict(obj), {})


def test_trainer_options_act_or_fail():
    """save_top_k other than -1/0/1 is refused (periodic checkpoints have no metric to rank);
    strategy=auto on several devices builds the DDP strategy itself so process_group_backend acts."""
    import pytest
    from lightning.pytorch.strategies import DDPStrategy

    from plm.data.config import DataConfig
    from plm.train.config import TrainConfig
    from plm.train.run import check_config, strategy

    cfg = TrainConfig(data=DataConfig(path="x"))
    cfg.trainer.save_top_k = 3
    with pytest.raises(ValueError, match="trainer.save_top_k=3: -1 keeps every periodic checkpoint"):
        check_config(cfg)
    cfg.trainer.devices, cfg.trainer.process_group_backend = 2, "gloo"
    s = strategy(cfg.trainer)
    assert isinstance(s, DDPStrategy) and s._process_group_backend == "gloo"
    cfg.trainer.devices = 1
    assert strategy(cfg.trainer) == "auto"


def test_each_accumulated_micro_batch_draws_its_own_masks(monkeypatch):
    """Under trainer.accumulate_grad_batches=k the k micro-batches of one optimizer step used to
    be masked at the same positions (the draws were seeded by the optimizer step only)."""
    from dataclasses import asdict

    import lightning.pytorch as pl

    from plm.train.module import PretrainModule

    seen = []
    make = MaskedEventObjective.make_masks

    def spy(self, batch, fields, generator, last=None):
        m = make(self, batch, fields, generator, last)
        seen.append(m["event_type"].clone())
        return m

    monkeypatch.setattr(MaskedEventObjective, "make_masks", spy)
    batches = [random_batch(B=4, T=16, seed=i) for i in range(4)]
    for b in batches:
        b["attention_mask"] = torch.ones(4, 16, dtype=torch.bool)

    def run(k):
        seen.clear()
        mod = PretrainModule(asdict(tiny_cfg()), TOY_VOCAB, list(TOY_NUMERIC),
                             {"masked": {"weight": 1.0, "event_prob": 0.3}}, {"warmup_steps": 0}, {"max_steps": 4 // k})
        pl.Trainer(max_steps=4 // k, accumulate_grad_batches=k, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                   accelerator="cpu").fit(mod, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
        return list(seen)

    two = run(2)
    assert len(two) == 4 and not torch.equal(two[0], two[1]) and not torch.equal(two[2], two[3])
    assert all(not torch.equal(two[i], two[j]) for i in range(4) for j in range(i))
    one = run(1)  # without accumulation the draws are as before: a function of the step
    assert len(one) == 4 and torch.equal(one[0], two[0]) and not torch.equal(one[1], one[0])
