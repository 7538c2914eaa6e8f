"""Pre-training objectives (losses) over the batch contract of `plm.model.batch`.

Each objective is a small `nn.Module`-free class with `__call__(model, batch, generator) ->
ObjectiveOutput`: a scalar `loss`, a dict of scalar `metrics` (per-field losses/accuracies) and
per-field `(sum of CE, count)` pairs (`ce_sums`) from which validation perplexity is computed
exactly over a whole epoch.

- `MaskedEventObjective` (encoder): mask whole events and/or single fields (never padding),
  predict every masked field: cross-entropy over categorical ids and numeric bin ids, optional
  regression of the standardised numeric value (on real values only).
- `ContrastiveObjective` (encoder, CoLES-style): two random sub-sequences of every sequence are
  positives, every other sequence's views (on every rank, gathered with a gradient-preserving
  all_gather) are negatives; symmetric InfoNCE with a temperature.
- `NextEventObjective` (decoder): hidden state t predicts every field of event t+1 of the same
  sequence (never across packed-segment boundaries) and the time to it via the model's time head.

Randomness comes from the `torch.Generator` passed in (the LightningModule seeds it from
(seed, rank, global step)), so masks do not depend on global RNG state and resume is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from plm.model.batch import MASK, N_SPECIALS, PAD, sequence_index, valid_mask, value_key


@dataclass
class ObjectiveOutput:
    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    ce_sums: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # field -> (sum CE, count)


class PretrainNet(torch.nn.Module):
    """The model plus its heads behind one `forward`, so FSDP2's root unit (this module) has the
    embedding tables (tied heads), heads and projection unsharded whenever they are used.
    `forward(batch, heads=True, project=False) -> (ModelOutput, EventPredictions | None, z | None)`;
    with `member_events` (the unmasked batch) and `member_sel` (B, T bool), `ModelOutput.membership`
    holds the membership head's queries of the pooled vectors and keys of the selected events."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    @property
    def field_vocab_sizes(self) -> dict[str, int]:
        return self.model.field_vocab_sizes

    def forward(self, batch, heads: bool = True, project: bool = False,
                member_events: dict[str, Tensor] | None = None, member_sel: Tensor | None = None):
        out = self.model(batch)
        pred = self.model.heads(out.hidden) if heads else None
        z = None
        if project:
            z = out.pooled
            proj = getattr(self.model, "projection", None)
            if proj is not None:
                z = proj(z)
        if member_sel is not None and getattr(self.model, "membership", None) is not None:
            # keys from the events' own input embeddings (fields only, not the model's context)
            events = self.model.embed(member_events)[member_sel]  # (n, d)
            head = self.model.membership
            counts = None
            if head.bank is not None:  # the user's event counts (sum over its real events)
                seq, n = sequence_index(batch, out.valid)
                counts = head.counts(out.hidden, seq, n)
            out.membership = head(out.pooled, events, counts)
        return out, pred, z


def run_net(model, batch, heads: bool = True, project: bool = False, member_events=None, member_sel=None):
    """Call a PretrainNet, or a bare PLMEncoder/PLMDecoder (tests, single process) the same way."""
    if isinstance(model, PretrainNet):
        return model(batch, heads=heads, project=project, member_events=member_events, member_sel=member_sel)
    return PretrainNet.forward(_Bare(model), batch, heads, project, member_events, member_sel)


class _Bare:
    def __init__(self, model):
        self.model = model


def inner(model):
    return model.model if isinstance(model, PretrainNet) else model


def _valid(batch: dict[str, Tensor]) -> Tensor:
    v = valid_mask(batch)
    if v is None:
        from plm.model.batch import batch_shape

        B, T = batch_shape(batch)
        dev = next(x.device for x in batch.values() if isinstance(x, Tensor))
        v = torch.ones(B, T, dtype=torch.bool, device=dev)
    return v


def _rand(shape, generator: torch.Generator | None, device) -> Tensor:
    # draw on the generator's device (CPU) and move: identical masks on every accelerator
    return torch.rand(shape, generator=generator).to(device)


def field_losses(
    pred_logits: dict[str, Tensor],
    pred_values: dict[str, Tensor],
    targets: dict[str, Tensor],
    target_values: dict[str, Tensor],
    where: dict[str, Tensor],
    prefix: str,
    regression_weight: float,
) -> ObjectiveOutput:
    """Mean over fields of the mean CE at the selected positions (+ weighted value MSE)."""
    metrics: dict[str, Tensor] = {}
    ce_sums: dict[str, tuple[Tensor, Tensor]] = {}
    terms = []
    for f, logits in pred_logits.items():
        if f not in targets:
            continue
        sel = where[f] & (targets[f] != PAD) & (targets[f] != MASK)
        n = sel.sum()
        lg = logits[sel].float()  # (n, V)
        tg = targets[f][sel].long()
        if lg.shape[0] == 0:
            ce_sum = logits.sum() * 0.0  # keep the graph (DDP: every parameter gets a gradient)
            acc = torch.zeros((), device=logits.device)
        else:
            ce = F.cross_entropy(lg, tg, reduction="none")
            ce_sum = ce.sum()
            acc = (lg.argmax(-1) == tg).float().mean()
        mean = ce_sum / n.clamp(min=1)
        terms.append(mean)
        metrics[f"{prefix}/loss_{f}"] = mean.detach()
        metrics[f"{prefix}/acc_{f}"] = acc.detach()
        ce_sums[f] = (ce_sum.detach(), n.detach())
    loss = torch.stack(terms).mean() if terms else torch.zeros(())
    reg_terms = []
    if regression_weight > 0:
        for f, v in pred_values.items():
            if f not in target_values:
                continue
            sel = where[f] & (targets[f] >= N_SPECIALS)
            tv = torch.nan_to_num(target_values[f].float())
            se = ((v.float() - tv) ** 2) * sel
            mse = se.sum() / sel.sum().clamp(min=1)
            reg_terms.append(mse)
            metrics[f"{prefix}/mse_{f}"] = mse.detach()
    if reg_terms:
        loss = loss + regression_weight * torch.stack(reg_terms).mean()
    return ObjectiveOutput(loss=loss, metrics=metrics, ce_sums=ce_sums)


# ------------------------------------------------------------------------- masked events


class MaskedEventObjective:
    """Mask whole events with prob `event_prob` and single fields with prob `field_prob` (only real
    events); masked ids become MASK, masked numeric values 0; predict every masked field.

    `last_prob`: also mask the whole last event of each sequence with this probability, so the
    model learns the query `plm-export pooling=asof` asks at the cut-off (an all-MASK event at a
    known time after the history: what comes next?). `last_jitter`: that event's time is drawn
    uniformly between the previous event and its own (a censored gap, like the time since the
    last event at an as-of date) while its fields, the gap bin included, stay the targets.

    `replace_prob` (ELECTRA-style replaced-event detection, in the same forward pass): this
    fraction of the events that are not masked is swapped for an event of another sequence of the
    batch (every field and value except `replace_keep`, the fields derived from the event's own
    time, so the swap cannot be spotted from its clock), and the model's `heads.replaced` logit
    predicts, for every real unmasked event, whether it was swapped (binary cross-entropy,
    weight `replace_weight`). It asks each event's state to say how well the event fits its
    user's history: what a fraud team wants from an embedding (an out-of-profile burst)."""

    name = "masked"

    def __init__(self, event_prob: float = 0.15, field_prob: float = 0.0, regression_weight: float = 1.0,
                 last_prob: float = 0.0, last_jitter: bool = False, replace_prob: float = 0.0,
                 replace_weight: float = 1.0, replace_keep: tuple[str, ...] = ("log_dt", "hour", "dow"),
                 membership_weight: float = 0.0, membership_temperature: float = 0.1):
        if not all(0 <= p <= 1 for p in (event_prob, field_prob, last_prob)) or event_prob + field_prob + last_prob <= 0:
            raise ValueError(f"masked: need 0 <= event_prob, field_prob, last_prob <= 1, not all 0 "
                             f"(got {event_prob}, {field_prob}, {last_prob})")
        if last_jitter and last_prob == 0:
            raise ValueError("masked: last_jitter=true moves the time of the masked last event, which last_prob=0 "
                             "never masks: set objective.masked.last_prob > 0 or drop last_jitter")
        if not 0 <= replace_prob < 1 or replace_weight < 0:
            raise ValueError(f"masked: need 0 <= replace_prob < 1 and replace_weight >= 0 "
                             f"(got {replace_prob}, {replace_weight})")
        self.event_prob, self.field_prob, self.regression_weight = event_prob, field_prob, regression_weight
        self.last_prob, self.last_jitter = last_prob, last_jitter
        self.replace_prob, self.replace_weight, self.replace_keep = replace_prob, replace_weight, tuple(replace_keep)
        if membership_weight < 0 or membership_temperature <= 0:
            raise ValueError(f"masked: need membership_weight >= 0 and membership_temperature > 0 "
                             f"(got {membership_weight}, {membership_temperature})")
        self.membership_weight, self.membership_temperature = membership_weight, membership_temperature

    def last_events(self, batch: dict[str, Tensor], generator) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T) bool: the last event of each sequence, chosen with prob `last_prob`; and the
        (row, column) of the chosen ones (the as-of query of `plm.export`: what happens next, at
        a known time, after this history)."""
        valid = _valid(batch)
        row, first, length = sequence_spans(batch)
        pick = _rand(length.shape, generator, valid.device) < self.last_prob
        r, c = row[pick], (first + length - 1)[pick]
        m = torch.zeros_like(valid)
        m[r, c] = True
        return m, r, c

    def jitter_times(self, batch: dict[str, Tensor], r: Tensor, c: Tensor, generator) -> dict[str, Tensor]:
        """Move each chosen last event's `ts` to a uniform time between the previous event of its
        sequence and itself: "nothing happened until ts; what comes next?" (a censored gap, as at
        the export's as-of time). The first event of a sequence keeps its time."""
        out = dict(batch)
        ts = batch["ts"].clone()
        prev_c = (c - 1).clamp(min=0)
        has_prev = (c > 0) & (_valid(batch)[r, prev_c])
        if "segment_ids" in batch:
            has_prev &= batch["segment_ids"][r, prev_c] == batch["segment_ids"][r, c]
        u = _rand(c.shape, generator, ts.device).double()
        t_prev, t_last = ts[r, prev_c], ts[r, c]
        moved = t_prev + ((t_last - t_prev).double() * u).long()
        ts[r, c] = torch.where(has_prev, moved, t_last)
        out["ts"] = ts
        return out

    def make_masks(self, batch: dict[str, Tensor], fields: list[str], generator,
                   last: Tensor | None = None) -> dict[str, Tensor]:
        valid = _valid(batch)
        dev = valid.device
        ev = (_rand(valid.shape, generator, dev) < self.event_prob) & valid
        if last is not None:
            ev = ev | last
        masks = {}
        for f in fields:
            m = ev
            if self.field_prob > 0:
                m = m | ((_rand(valid.shape, generator, dev) < self.field_prob) & valid)
            masks[f] = m
        # at least one masked event per batch so the loss is defined
        if not any(bool(m.any()) for m in masks.values()) and bool(valid.any()):
            first = valid.reshape(-1).nonzero()[0, 0]
            for f in fields:
                masks[f] = masks[f].reshape(-1).clone().index_fill_(0, first, True).view_as(valid)
        return masks

    def replace_events(self, batch: dict[str, Tensor], fields: list[str], eligible: Tensor,
                       generator) -> tuple[dict[str, Tensor], Tensor]:
        """Swap each `eligible` event with prob `replace_prob` for a uniformly drawn `eligible`
        event of another sequence of the batch (fields and values, not `replace_keep`, not `ts`).
        Returns the new batch and the (B, T) bool map of swapped events (a draw from the event's
        own sequence is dropped, so every True really is foreign). The caller passes the unmasked
        events as `eligible`: an event masked in this pass is neither swapped nor copied, so no
        other sequence shows a copy of an event the masked loss (and event membership, which must
        place it in its own sequence) hides in its own."""
        valid = _valid(batch)
        B, T = valid.shape
        seq = sequence_index(batch, valid if valid_mask(batch) is not None else None)[0].reshape(-1)
        pool = (valid & eligible).reshape(-1).nonzero().squeeze(1)
        dst = ((_rand((B, T), generator, valid.device) < self.replace_prob) & eligible & valid).reshape(-1)
        dst = dst.nonzero().squeeze(1)
        src = pool[(_rand(dst.shape, generator, valid.device) * len(pool)).long().clamp(max=max(len(pool) - 1, 0))]
        foreign = seq[src] != seq[dst]
        dst, src = dst[foreign], src[foreign]
        out = dict(batch)
        keys = [f for f in fields if f not in self.replace_keep]
        keys += [value_key(f) for f in keys if value_key(f) in batch]
        for k in keys:
            x = batch[k].reshape(-1).clone()
            x[dst] = x[src]
            out[k] = x.view(B, T)
        swapped = torch.zeros(B * T, dtype=torch.bool, device=valid.device)
        swapped[dst] = True
        return out, swapped.view(B, T)

    def membership_loss(self, out, batch: dict[str, Tensor], sel: Tensor, res: ObjectiveOutput) -> None:
        """Event membership: each event masked whole is scored against every sequence's pooled
        vector of the batch (the sequence saw only the mask at its place) and must pick its own
        (cross-entropy over the batch's sequences, temperature `membership_temperature`). Common
        events cannot single out their user; an unusual one can, if the pooled vector keeps it."""
        if out.membership is None:
            raise ValueError("objective.masked.membership_weight > 0 needs the membership head: "
                             "set model.heads.membership_dim > 0")
        q, k = out.membership  # (N, p), (n, p)
        seq = sequence_index(batch, valid_mask(batch))[0][sel]  # (n,)
        if k.shape[0] == 0 or q.shape[0] < 2:
            ce = (q.sum() + k.sum()) * 0.0
            acc = torch.zeros((), device=q.device)
        else:
            logits = (k.float() @ q.float().T) / self.membership_temperature  # (n, N)
            ce = F.cross_entropy(logits, seq)
            acc = (logits.argmax(-1) == seq).float().mean()
        res.loss = res.loss + self.membership_weight * ce
        res.metrics["masked/membership_loss"] = ce.detach()
        res.metrics["masked/membership_acc"] = acc.detach()

    @staticmethod
    def apply_masks(batch: dict[str, Tensor], masks: dict[str, Tensor]) -> dict[str, Tensor]:
        out = dict(batch)
        for f, m in masks.items():
            out[f] = torch.where(m, torch.full_like(batch[f], MASK), batch[f])
            vk = value_key(f)
            if vk in batch:
                out[vk] = torch.where(m, torch.zeros_like(batch[vk]), batch[vk])
        return out

    def __call__(self, model, batch: dict[str, Tensor], generator=None) -> ObjectiveOutput:
        fields = [f for f in model.field_vocab_sizes if f in batch]
        last, inputs = None, batch
        if self.last_prob > 0:
            last, r, c = self.last_events(batch, generator)
            if self.last_jitter and "ts" in batch:
                inputs = self.jitter_times(batch, r, c, generator)
        masks = self.make_masks(batch, fields, generator, last)
        swapped = None
        if self.replace_prob > 0:
            masked_any = torch.stack(list(masks.values())).any(0)
            inputs, swapped = self.replace_events(inputs, fields, ~masked_any, generator)
        member_sel = None
        if self.membership_weight > 0:  # events masked whole: their user must be found from the rest
            member_sel = torch.stack(list(masks.values())).all(0) & _valid(batch)
        out, pred, _ = run_net(model, self.apply_masks(inputs, masks), member_events=batch, member_sel=member_sel)
        targets = {f: batch[f] for f in fields}
        values = {f: batch[value_key(f)] for f in fields if value_key(f) in batch}
        res = field_losses(pred.logits, pred.values, targets, values, masks, "masked", self.regression_weight)
        if swapped is not None:
            if pred.replaced is None:
                raise ValueError("objective.masked.replace_prob > 0 needs the replaced-event head: "
                                 "set model.heads.replaced=true")
            sel = _valid(batch) & ~masked_any
            logit, target = pred.replaced[sel].float(), swapped[sel].float()
            bce = F.binary_cross_entropy_with_logits(logit, target) if logit.numel() else pred.replaced.sum() * 0.0
            res.loss = res.loss + self.replace_weight * bce
            res.metrics["masked/replaced_loss"] = bce.detach()
            res.metrics["masked/replaced_acc"] = ((logit > 0).float() == target).float().mean().detach() \
                if logit.numel() else torch.zeros(())
            res.metrics["masked/replaced_fraction"] = target.mean().detach() if logit.numel() else torch.zeros(())
        if member_sel is not None:
            self.membership_loss(out, batch, member_sel, res)
        res.metrics["masked/fraction"] = torch.stack([m.float().sum() for m in masks.values()]).sum().detach() / (
            len(masks) * _valid(batch).sum().clamp(min=1))
        res.aux = out.aux_loss  # type: ignore[attr-defined]
        return res


# ------------------------------------------------------------------------------ next event


def next_event_targets(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(B, T) bool `has_next`: event t has a next event t+1 in the same sequence (same packed
    segment, both real); and (B, T) long index t+1 (clamped). Position T-1 never has one."""
    valid = _valid(batch)
    B, T = valid.shape
    nxt = valid[:, 1:] & valid[:, :-1]
    if "segment_ids" in batch:
        seg = batch["segment_ids"]
        nxt = nxt & (seg[:, 1:] == seg[:, :-1])
    has_next = torch.cat([nxt, torch.zeros(B, 1, dtype=torch.bool, device=valid.device)], 1)
    idx = torch.arange(T, device=valid.device).add(1).clamp(max=T - 1).expand(B, T)
    return has_next, idx


def shift_left(x: Tensor) -> Tensor:
    """x[:, t+1] at position t (last position repeats; it is masked by has_next)."""
    return torch.cat([x[:, 1:], x[:, -1:]], 1)


class NextEventObjective:
    """Decoder: every field of event t+1 and the time to it (seconds) from hidden state t."""

    name = "next"

    def __init__(self, time_weight: float = 1.0, regression_weight: float = 1.0):
        self.time_weight, self.regression_weight = time_weight, regression_weight

    def __call__(self, model, batch: dict[str, Tensor], generator=None) -> ObjectiveOutput:
        fields = [f for f in model.field_vocab_sizes if f in batch]
        has_next, _ = next_event_targets(batch)
        out, pred, _ = run_net(model, batch)
        targets = {f: shift_left(batch[f]) for f in fields}
        values = {f: shift_left(batch[value_key(f)]) for f in fields if value_key(f) in batch}
        where = {f: has_next for f in fields}
        res = field_losses(pred.logits, pred.values, targets, values, where, "next", self.regression_weight)
        if self.time_weight > 0 and pred.time and "ts" in batch:
            ts = batch["ts"].long()
            dt = ((shift_left(ts) - ts).clamp(min=0).double() / 1e6).float()  # seconds
            nll = inner(model).heads.time.nll(pred.time, dt)  # (B, T)
            t_loss = (nll * has_next).sum() / has_next.sum().clamp(min=1)
            res.loss = res.loss + self.time_weight * t_loss
            res.metrics["next/loss_time"] = t_loss.detach()
            res.ce_sums["time"] = ((nll * has_next).sum().detach(), has_next.sum().detach())
        res.aux = out.aux_loss  # type: ignore[attr-defined]
        return res


# ------------------------------------------------------------------------------ contrastive


def sequence_spans(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Per sequence (ordered as `sequence_index`): row, first column, length — each (N,)."""
    valid = _valid(batch)
    seq, N = sequence_index(batch, valid if valid_mask(batch) is not None else None)
    B, T = valid.shape
    flat = seq.reshape(-1)
    keep = flat >= 0
    si = flat[keep]
    pos = torch.arange(B * T, device=valid.device)[keep]
    length = torch.zeros(N, dtype=torch.long, device=valid.device).index_add_(0, si, torch.ones_like(si))
    first = torch.full((N,), B * T, dtype=torch.long, device=valid.device).scatter_reduce(0, si, pos, "amin")
    return first // T, first % T, length


def _crop_spans(batch: dict[str, Tensor], n_views: int, min_frac: float, max_frac: float, min_len: int,
                generator) -> tuple[Tensor, Tensor, Tensor]:
    """(row, start column, length) of n_views random contiguous sub-sequences of every sequence,
    each (n_views * N,); view v of sequence n is item v * N + n."""
    row, col, length = sequence_spans(batch)
    dev = length.device
    N = len(length)
    L = length.repeat(n_views)
    r = row.repeat(n_views)
    c = col.repeat(n_views)
    u1 = _rand((n_views * N,), generator, dev)
    u2 = _rand((n_views * N,), generator, dev)
    lo = torch.clamp(torch.ceil(L.float() * min_frac).long(), min=min_len).minimum(L)
    hi = torch.clamp(torch.floor(L.float() * max_frac).long(), min=1).maximum(lo).minimum(L)
    n = lo + (u1 * (hi - lo + 1).float()).long().minimum(hi - lo)
    start = c + (u2 * (L - n + 1).float()).long().minimum(L - n)
    return r, start, n


def _view_keys(batch: dict[str, Tensor], fields: list[str]) -> list[str]:
    return list(fields) + [value_key(f) for f in fields if value_key(f) in batch] + (["ts"] if "ts" in batch else [])


def crop_views(batch: dict[str, Tensor], fields: list[str], n_views: int, min_frac: float, max_frac: float,
               min_len: int, generator) -> dict[str, Tensor]:
    """n_views random contiguous sub-sequences of every sequence, as one right-padded unpacked batch
    of n_views * N rows (view v of sequence n is row v * N + n)."""
    r, start, n = _crop_spans(batch, n_views, min_frac, max_frac, min_len, generator)
    dev = n.device
    Tn = int(n.max()) if len(n) else 1
    ar = torch.arange(Tn, device=dev)
    ok = ar[None] < n[:, None]  # (V*N, Tn)
    src = (start[:, None] + ar[None]).clamp(max=batch_T(batch) - 1)
    out: dict[str, Tensor] = {}
    for k in _view_keys(batch, fields):
        x = batch[k][r[:, None], src]
        out[k] = torch.where(ok, x, torch.zeros_like(x))
    out["attention_mask"] = ok
    out["positions"] = torch.where(ok, ar[None].expand_as(ok), torch.zeros_like(src))
    return out


def crop_views_packed(batch: dict[str, Tensor], fields: list[str], n_views: int, min_frac: float,
                      max_frac: float, min_len: int, generator) -> tuple[dict[str, Tensor], Tensor]:
    """The same views as `crop_views` (same draws from `generator`), packed first-fit-decreasing
    into rows of the batch's length (`segment_ids`/`positions` per the batch contract) instead of
    one padded row each: crops of 50-100% of sequences of very different lengths left ~60% of a
    padded view batch empty. Returns (packed batch, order): `pooled[order]` lists the views'
    pooled vectors as view v of sequence n at v * N + n, like `crop_views`' rows."""
    r, start, n = _crop_spans(batch, n_views, min_frac, max_frac, min_len, generator)
    dev = n.device
    T = batch_T(batch)
    V = len(n)
    lengths = n.tolist()
    # first-fit decreasing (stable); a view goes to the end of its row, so its segment id is
    # the number of views already in that row + 1
    row_of, off_of, seg_of, room, count = [0] * V, [0] * V, [0] * V, [], []
    for i in sorted(range(V), key=lambda i: -lengths[i]):
        j = next((j for j, free in enumerate(room) if free >= lengths[i]), len(room))
        if j == len(room):
            room.append(T)
            count.append(0)
        row_of[i], off_of[i] = j, T - room[j]
        room[j] -= lengths[i]
        count[j] += 1
        seg_of[i] = count[j]
    rows = torch.tensor(row_of, dtype=torch.long, device=dev)
    offs = torch.tensor(off_of, dtype=torch.long, device=dev)
    seg = torch.tensor(seg_of, dtype=torch.long, device=dev)
    R = max(len(room), 1)
    vid = torch.repeat_interleave(torch.arange(V, device=dev), n)
    j = torch.arange(len(vid), device=dev) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
    dr, dc = rows[vid], offs[vid] + j
    sr, sc = r[vid], start[vid] + j
    out: dict[str, Tensor] = {}
    for k in _view_keys(batch, fields):
        x = torch.zeros(R, T, dtype=batch[k].dtype, device=dev)
        x[dr, dc] = batch[k][sr, sc]
        out[k] = x
    sid = torch.zeros(R, T, dtype=torch.long, device=dev)
    sid[dr, dc] = seg[vid]
    pos = torch.zeros(R, T, dtype=torch.long, device=dev)
    pos[dr, dc] = j
    out["segment_ids"], out["positions"], out["attention_mask"] = sid, pos, sid != 0
    # pooled index of each view: row-major over (row, segment), as plm.model.batch.sequence_index
    per_row = torch.tensor(count, dtype=torch.long, device=dev)
    row_base = torch.cumsum(per_row, 0) - per_row
    order = row_base[rows] + seg - 1
    return out, order


def batch_T(batch: dict[str, Tensor]) -> int:
    return _valid(batch).shape[1]


def gather_with_grad(z: Tensor) -> tuple[Tensor, int, Tensor]:
    """All ranks' rows (padded to the largest count) with gradients flowing back to each rank's
    own rows; returns (all rows, offset of this rank's rows, validity mask of all rows)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z, 0, torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
    import torch.distributed._functional_collectives as fc

    # the functional all-gather with autograd (its backward sums the ranks' gradients of each
    # rank's rows); torch.distributed.nn.functional.all_gather warns it is deprecated since 2.13,
    # and all_gather_single (2.13) supersedes all_gather_tensor_autograd (torch >= 2.9 has it)
    gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
    world, rank = dist.get_world_size(), dist.get_rank()
    n = torch.tensor([z.shape[0]], device=z.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes_l = [int(s) for s in sizes]
    m = max(sizes_l)
    zp = torch.cat([z, z.new_zeros(m - z.shape[0], z.shape[1])], 0)
    allz = gather(zp, 0, dist.group.WORLD)  # an async tensor: the first op on it waits (autograd kept)
    ok = torch.cat([torch.arange(m, device=z.device) < s for s in sizes_l])
    return allz, rank * m, ok


def info_nce(z1: Tensor, z2: Tensor, temperature: float, gather: bool = True) -> tuple[Tensor, Tensor]:
    """Symmetric InfoNCE (NT-Xent) between L2-normalised views z1[i] <-> z2[i]; negatives are all
    other views in the (gathered) batch. Returns (loss, top-1 accuracy of finding the positive)."""
    z1, z2 = F.normalize(z1.float(), dim=-1), F.normalize(z2.float(), dim=-1)
    N = z1.shape[0]
    local = torch.cat([z1, z2], 0)  # (2N, d)
    if gather:
        allz1, off, ok1 = gather_with_grad(z1)
        allz2, _, ok2 = gather_with_grad(z2)
    else:
        allz1, off, ok1 = z1, 0, torch.ones(N, dtype=torch.bool, device=z1.device)
        allz2, ok2 = z2, ok1
    M = allz1.shape[0]
    keys = torch.cat([allz1, allz2], 0)  # (2M, d)
    kok = torch.cat([ok1, ok2], 0)
    logits = local @ keys.T / temperature  # (2N, 2M)
    ar = torch.arange(N, device=z1.device)
    self_idx = torch.cat([off + ar, M + off + ar])
    pos_idx = torch.cat([M + off + ar, off + ar])
    mask = ~kok[None].expand_as(logits).clone()
    mask[torch.arange(2 * N, device=z1.device), self_idx] = True  # a view is not its own negative
    logits = logits.masked_fill(mask, float("-inf"))
    loss = F.cross_entropy(logits, pos_idx)
    acc = (logits.argmax(-1) == pos_idx).float().mean()
    return loss, acc


class ContrastiveObjective:
    """CoLES: two random sub-sequences (length fraction in [min_frac, max_frac], at least
    `min_len` events) of each sequence are positives; InfoNCE over the (gathered) batch."""

    name = "contrastive"

    def __init__(self, temperature: float = 0.1, min_frac: float = 0.5, max_frac: float = 1.0, min_len: int = 2,
                 gather: bool = True, pack_views: bool = True):
        if temperature <= 0 or not 0 < min_frac <= max_frac <= 1:
            raise ValueError("contrastive: need temperature > 0 and 0 < min_frac <= max_frac <= 1")
        self.temperature, self.min_frac, self.max_frac = temperature, min_frac, max_frac
        self.min_len, self.gather, self.pack_views = min_len, gather, pack_views

    def __call__(self, model, batch: dict[str, Tensor], generator=None) -> ObjectiveOutput:
        fields = [f for f in model.field_vocab_sizes if f in batch]
        args = (batch, fields, 2, self.min_frac, self.max_frac, self.min_len, generator)
        if self.pack_views:
            views, order = crop_views_packed(*args)
            out, _, z = run_net(model, views, heads=False, project=True)
            z = z[order]
        else:
            out, _, z = run_net(model, crop_views(*args), heads=False, project=True)
        N = z.shape[0] // 2
        loss, acc = info_nce(z[:N], z[N:], self.temperature, self.gather)
        res = ObjectiveOutput(loss=loss, metrics={"contrastive/loss": loss.detach(), "contrastive/acc": acc.detach()})
        res.aux = out.aux_loss  # type: ignore[attr-defined]
        return res


ENCODER_OBJECTIVES = ("masked", "contrastive")
DECODER_OBJECTIVES = ("next",)
