"""Generation of whole future events with the decoder: every field of the next event is sampled
from its head (temperature, top-k, top-p), numeric values from the regression heads, and the
timestamp from the time-to-next-event head, so generated events come with timestamps.

Fields of one event are sampled independently given the history (the decoder state). Prompts
must be unpadded or left-padded, so that the last column is each row's latest event.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from plm.model.batch import MASK, batch_shape, value_key
from plm.model.heads import EventPredictions, sample_logits


def sample_event(pred: EventPredictions, model, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """One event per row from head outputs at one position (B, 1, ...): field ids (B, 1),
    `<numeric>_value` (B, 1) and `dt_seconds` (B, 1) float64 (0 without a time head)."""
    some = next(iter(pred.logits.values()))
    B = some.shape[0]
    ev: dict[str, Tensor] = {}
    for f in model.field_vocab_sizes:
        if f in pred.logits:
            ev[f] = sample_logits(pred.logits[f], temperature, top_k, top_p, generator)
        else:  # no head for this field: feed the MASK token
            ev[f] = torch.full((B, 1), MASK, dtype=torch.long, device=some.device)
    for f in model.numeric_fields:
        v = pred.values.get(f)
        ev[value_key(f)] = v.float() if v is not None else torch.zeros(B, 1, device=some.device)
    time_head = model.heads.time
    if time_head is not None:
        ev["dt_seconds"] = time_head.sample(pred.time, temperature, generator)
    else:
        ev["dt_seconds"] = torch.zeros(B, 1, dtype=torch.float64, device=some.device)
    return ev


@torch.no_grad()
def generate(model, prompt: dict[str, Tensor], n_events: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, generator: torch.Generator | None = None,
             postprocess: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
             use_cache: bool = True) -> dict[str, Tensor]:
    """Continue every prompt row by `n_events` events.

    model: a PLMDecoder. prompt: a batch (see `plm.model.batch`), unpadded or left-padded, without
        `segment_ids` / `positions` (one sequence per row).
    postprocess: optional hook applied to each sampled event dict (B, 1) before it is fed back,
        e.g. to re-derive `hour`/`dow`/`log_dt` ids from the new `ts` with the tokenizer.
    use_cache: False recomputes the whole sequence every step (reference and benchmark).
    Returns {key: (B, n_events)} with every field id, every `<numeric>_value`, `dt_seconds`
    (float64) and `ts` (int64 µs).
    """
    B, T0 = batch_shape(prompt)
    was_training = model.training
    model.eval()
    device = prompt["ts"].device
    cache = None
    if use_cache:
        cache = model.new_cache(B, T0 + n_events, next(model.parameters()).dtype, device)
        h = model(prompt, cache).hidden[:, -1:]  # (B, 1, d)
    else:
        seq = dict(prompt)
        h = model(seq).hidden[:, -1:]
    last_ts = prompt["ts"][:, -1:].long()
    out: list[dict[str, Tensor]] = []
    for _ in range(n_events):
        ev = sample_event(model.heads(h), model, temperature, top_k, top_p, generator)
        ev["ts"] = last_ts + (ev["dt_seconds"] * 1e6).round().long()
        if "attention_mask" in prompt:
            ev["attention_mask"] = torch.ones(B, 1, dtype=torch.bool, device=device)
        if "padding" in prompt:  # the batch contract's other form of the mask
            ev["padding"] = torch.zeros(B, 1, dtype=torch.bool, device=device)
        if postprocess is not None:
            ev = postprocess(ev)
        out.append(ev)
        last_ts = ev["ts"]
        feed = {k: v for k, v in ev.items() if k != "dt_seconds"}
        if cache is not None:
            h = model(feed, cache).hidden  # (B, 1, d)
        else:
            seq = {k: torch.cat([seq[k], feed[k].to(seq[k].dtype)], 1) for k in seq}
            h = model(seq).hidden[:, -1:]
    model.train(was_training)
    return {k: torch.cat([e[k] for e in out], 1) for k in out[0]}
