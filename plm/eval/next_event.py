"""Next-event evaluation of a decoder checkpoint on a prepared split (`plm-eval ckpt=... data=...`).

`next_event_metrics` (teacher forcing over each user's most recent `max_len` events): per field,
accuracy of the arg-max token and perplexity exp(mean cross-entropy) of event t+1 given events
<= t; the time head's negative log-likelihood and the mean absolute error of its point forecast
of the gap to the next event, in log1p(seconds) and in hours (point forecast: expm1 of the
mixture's / bins' mean of log1p(dt)). Each field also gets the accuracy of a "repeat the previous
event's value" baseline, so a reader can tell what the model adds.

`generated_vs_real` (free-running): for up to `n_users` users with more than `horizon` events,
hold out the last `horizon` events, generate `horizon` events from the rest (`plm.model.generate`,
seeded), and compare the generated events with the held-out real ones: per field, the total
variation distance (TVD) between the pooled distributions of generated and real values, against
the TVD between the users' own history and their real future (the "history" baseline: a
generator no better than replaying the past scores the same); and the median gap to the next
event (hours), generated vs real.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from plm.model.batch import N_SPECIALS, PAD

KEY_FIELDS = ("event_type", "mcc", "channel", "status", "amount", "merchant", "log_dt")


def _tensors(batch: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def _time_point(time_head, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Point forecast of y = log1p(dt): the mean of y under the head's distribution."""
    if "mu" in params:
        w = F.softmax(params["logits"].float(), dim=-1)
        return (w * params["mu"].float()).sum(-1)
    centers = (torch.arange(time_head.n_bins, device=params["logits"].device).float() + 0.5) * (
        time_head.y_max / time_head.n_bins)
    return (F.softmax(params["logits"].float(), dim=-1) * centers).sum(-1)


@torch.no_grad()
def next_event_metrics(model, batches, max_batches: int = 0) -> dict:
    """Teacher-forced next-event metrics of a `PLMDecoder` over unpacked batches (see module doc).
    Fields without a head (`model.heads.exclude_fields`) are not predicted, so not scored."""
    fields = list(model.heads.fields)
    ce_sum = dict.fromkeys(fields, 0.0)
    correct = dict.fromkeys(fields, 0)
    repeat = dict.fromkeys(fields, 0)
    count = dict.fromkeys(fields, 0)
    t_nll = t_abs_y = t_abs_h = 0.0
    t_n = 0
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        b = _tensors(batch)
        valid = b["attention_mask"].bool()
        has_next = valid[:, 1:] & valid[:, :-1]  # (B, T-1)
        h = model(b).hidden[:, :-1]
        pred = model.heads(h)
        for f in fields:
            if f not in b:
                continue
            tgt = b[f][:, 1:].long()
            sel = has_next & (tgt != PAD)
            if not bool(sel.any()):
                continue
            lg = pred.logits[f][sel].float()
            tg = tgt[sel]
            ce_sum[f] += float(F.cross_entropy(lg, tg, reduction="sum"))
            correct[f] += int((lg.argmax(-1) == tg).sum())
            repeat[f] += int((b[f][:, :-1].long()[sel] == tg).sum())
            count[f] += int(sel.sum())
        if pred.time and "ts" in b:
            ts = b["ts"].long()
            dt = ((ts[:, 1:] - ts[:, :-1]).clamp(min=0).double() / 1e6).float()
            sel = has_next
            nll = model.heads.time.nll(pred.time, dt)
            y_hat = _time_point(model.heads.time, pred.time)
            y = torch.log1p(dt)
            t_nll += float(nll[sel].sum())
            t_abs_y += float((y_hat - y).abs()[sel].sum())
            t_abs_h += float(((torch.expm1(y_hat.double().clamp(max=40)) - dt.double()).abs() / 3600.0)[sel].sum())
            t_n += int(sel.sum())
    per_field = {}
    for f in fields:
        if count[f]:
            per_field[f] = {"accuracy": correct[f] / count[f], "perplexity": math.exp(ce_sum[f] / count[f]),
                            "repeat_previous_accuracy": repeat[f] / count[f], "n": count[f]}
    out = {"per_field": per_field}
    if per_field:
        out["mean_accuracy"] = float(np.mean([v["accuracy"] for v in per_field.values()]))
        out["mean_perplexity"] = float(np.mean([v["perplexity"] for v in per_field.values()]))
    if t_n:
        out["time"] = {"nll_log1p_s": t_nll / t_n, "mae_log1p_s": t_abs_y / t_n, "mae_hours": t_abs_h / t_n, "n": t_n}
    return out


def _tvd(a: np.ndarray, b: np.ndarray, size: int) -> float:
    pa_ = np.bincount(a, minlength=size).astype(float)
    pb = np.bincount(b, minlength=size).astype(float)
    if pa_.sum() == 0 or pb.sum() == 0:
        return float("nan")
    return 0.5 * float(np.abs(pa_ / pa_.sum() - pb / pb.sum()).sum())


@torch.no_grad()
def generated_vs_real(model, batches, horizon: int = 8, n_users: int = 128, seed: int = 0,
                      temperature: float = 1.0) -> dict:
    """Generated futures against held-out real ones (see the module docstring)."""
    from plm.model import generate

    fields = [f for f in KEY_FIELDS if f in model.heads.fields]  # (no head: not generated)
    gen: dict[str, list] = {f: [] for f in fields}
    real: dict[str, list] = {f: [] for f in fields}
    hist: dict[str, list] = {f: [] for f in fields}
    gen_dt, real_dt = [], []
    g = torch.Generator().manual_seed(seed)
    users = 0
    for batch in batches:
        b = _tensors(batch)
        lens = b["attention_mask"].sum(1)
        for r in range(b["attention_mask"].shape[0]):
            n = int(lens[r])
            if n <= horizon + 1 or users >= n_users:
                continue
            users += 1
            keys = [k for k in b if k not in ("positions", "attention_mask") and b[k].dim() == 2]
            prompt = {k: b[k][r : r + 1, : n - horizon] for k in keys}
            out = generate(model, prompt, horizon, temperature=temperature, generator=g)
            for f in fields:
                gen[f].append(out[f][0].numpy())
                real[f].append(b[f][r, n - horizon : n].numpy())
                hist[f].append(b[f][r, : n - horizon].numpy())
            ts = b["ts"][r, :n].double()
            real_dt.append(((ts[n - horizon :] - ts[n - horizon - 1 : n - 1]) / 3.6e9).numpy())
            gen_dt.append((out["dt_seconds"][0].double() / 3600.0).numpy())
        if users >= n_users:
            break
    if users == 0:
        return {"users": 0, "note": f"no user has more than {horizon + 1} events"}
    res: dict = {"users": users, "horizon": horizon, "temperature": temperature, "per_field": {}}
    for f in fields:
        size = int(model.field_vocab_sizes[f])
        gv, rv, hv = (np.concatenate(x[f]).astype(np.int64) for x in (gen, real, hist))
        if f != "event_type":  # fitted values only (specials: not applicable / missing)
            gv, rv, hv = gv[gv >= N_SPECIALS], rv[rv >= N_SPECIALS], hv[hv >= N_SPECIALS]
        res["per_field"][f] = {"tvd_generated_vs_real": _tvd(gv, rv, size),
                               "tvd_history_vs_real": _tvd(hv, rv, size)}
    res["median_gap_hours"] = {"generated": float(np.median(np.concatenate(gen_dt))),
                               "real": float(np.median(np.concatenate(real_dt)))}
    return res


def decoder_line(sections: dict[str, dict]) -> str | None:
    """One console line of `decoder_sections`' headline figures (None without them)."""
    nxt = sections.get("Next-event prediction (decoder)")
    if not nxt:
        return None
    gen = sections.get("Generated vs real futures", {})

    def f(v, spec):
        return "n/a" if v is None or v != v else format(v, spec)

    line = (f"plm-eval: next events ({nxt['split']} split, {f(nxt.get('time_n'), ',')} events): mean field accuracy "
            f"{f(nxt.get('mean_accuracy'), '.3f')}, mean perplexity {f(nxt.get('mean_perplexity'), '.2f')}, "
            f"time MAE {f(nxt.get('time_mae_hours'), '.3g')} h")
    if gen.get("users"):
        line += (f"; {gen['users']} generated futures of {gen['horizon']} events: median gap "
                 f"{f(gen.get('median_gap_hours_generated'), '.3g')} h (real {f(gen.get('median_gap_hours_real'), '.3g')} h)")
    return line


def decoder_sections(ckpt: str, data: str, split: str = "test", max_batches: int = 0, generate_users: int = 128,
                     horizon: int = 8, seed: int = 0) -> dict[str, dict]:
    """The report sections of a decoder checkpoint on a prepared split (for `run_eval`'s
    `extra_sections`); an encoder checkpoint is an error that says so."""
    from plm.data.datamodule import PLMDataModule, read_manifest, spread_sample
    from plm.export.model import check_tokenizer, load_checkpoint
    from plm.export.run import check_vocab, training_max_len

    loaded = load_checkpoint(ckpt)
    if loaded.arch != "decoder":
        raise ValueError(f"ckpt={ckpt} is an {loaded.arch}: next-event metrics need a decoder (objective=next); "
                         "evaluate an encoder through its exported embeddings")
    max_len = training_max_len(loaded, read_manifest(data))
    dm = PLMDataModule(data, max_len=max_len, batch_mode="bucketed", max_tokens=max(8192, max_len))
    check_vocab(loaded, dm.vocab_sizes, data)
    check_tokenizer(loaded, dm.tokenizer_sha256, f"data={data}")
    model = loaded.model
    block = int(dm.config.shuffle_buffer)
    loader = dm.loader(dm.stream(split, "eval"), resumable=False)
    # the eval stream buckets each block of users shortest first: a cap on batches, and the users
    # whose futures are generated, are spread over every length (spread_sample), not the shortest
    if max_batches:
        loader = spread_sample(loader, block, n_batches=max_batches)
    nxt = next_event_metrics(model, loader, max_batches=max_batches)
    long_enough = (b for b in dm.loader(dm.stream(split, "eval"), resumable=False)
                   if int(b["lengths"].max()) > horizon + 1)
    gen = generated_vs_real(model, spread_sample(long_enough, block, n_users=generate_users), horizon=horizon,
                            n_users=generate_users, seed=seed)
    summary = {"checkpoint": ckpt, "split": split, "max_len": max_len,
               "mean_accuracy": nxt.get("mean_accuracy"), "mean_perplexity": nxt.get("mean_perplexity")}
    summary.update({f"time_{k}": v for k, v in nxt.get("time", {}).items()})
    return {
        "Next-event prediction (decoder)": summary,
        "Next-event per field (teacher forcing)": nxt["per_field"],
        "Generated vs real futures": {"users": gen.get("users", 0), "horizon": horizon,
                                      **{f"median_gap_hours_{k}": v for k, v in gen.get("median_gap_hours", {}).items()}},
        "Generated vs real per field (TVD, lower is better)": gen.get("per_field", {}),
    }
