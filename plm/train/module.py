"""LightningModule for pre-training: wraps a `PLMEncoder`/`PLMDecoder` and a weighted sum of
objectives (`plm.train.objectives`); AdamW (fused/foreach) with warm-up + cosine, grad-norm
clipping, per-field metrics, exact validation perplexity, and (FSDP2) sharding applied from
outside the model in `configure_model`."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from plm.model import PLMDecoder, PLMEncoder, model_config_from_dict
from plm.model.config import split_names
from plm.train.config import ObjectiveConfig, OptimConfig, TrainerConfig
from plm.train.objectives import ContrastiveObjective, MaskedEventObjective, NextEventObjective, PretrainNet


def build_objectives(cfg: ObjectiveConfig) -> list[tuple[str, float, Any]]:
    out = []
    if cfg.masked.weight > 0:
        m = cfg.masked
        keep = tuple(split_names(m.replace_keep))
        out.append(("masked", m.weight, MaskedEventObjective(m.event_prob, m.field_prob, m.regression_weight,
                                                                m.last_prob, m.last_jitter, m.replace_prob,
                                                                m.replace_weight, keep, m.membership_weight,
                                                                m.membership_temperature)))
    if cfg.contrastive.weight > 0:
        c = cfg.contrastive
        out.append(("contrastive", c.weight, ContrastiveObjective(c.temperature, c.min_frac, c.max_frac, c.min_len,
                                                                 c.gather, c.pack_views)))
    if cfg.next.weight > 0:
        n = cfg.next
        out.append(("next", n.weight, NextEventObjective(n.time_weight, n.regression_weight)))
    if not out:
        raise ValueError("objective: every weight is 0 (set objective.masked.weight, .contrastive.weight or .next.weight)")
    names = {o[0] for o in out}
    if "next" in names and names & {"masked", "contrastive"}:
        raise ValueError("objective: next (decoder) cannot be combined with masked/contrastive (encoder) in one model")
    return out


def check_trainable(mcfg, vocab_sizes: dict[str, int]) -> None:
    """Model options that would have no effect, refused when training starts (not when a
    checkpoint loads, so models trained before these checks still export)."""
    from plm.model.config import EmbeddingConfig

    e = mcfg.embedding
    if e.combine == "sum" and e.field_dim != EmbeddingConfig.field_dim:
        raise ValueError(f"model.embedding.field_dim={e.field_dim} applies to combine=concat only: with combine=sum "
                         f"every field (and the field mixer) has width d_model, so set "
                         f"model.embedding.field_dim={EmbeddingConfig.field_dim} (the default; e.g. after model=tiny, "
                         "whose concat uses 16)")
    unknown = sorted(set(split_names(mcfg.heads.exclude_fields)) - set(vocab_sizes))
    if unknown:
        raise ValueError(f"model.heads.exclude_fields names fields {unknown} that are not in the data "
                         f"(fields: {', '.join(vocab_sizes)})")


def freeze_unused(model, cfg: ObjectiveConfig, names: list[str]) -> list[str]:
    """Stop gradients of heads no active objective uses (time head, value regressions, projection,
    attention pooling), so DDP needs no find_unused_parameters and FSDP2/optimizer states cover
    exactly the trained parameters (distributed checkpoints then round-trip)."""
    off = []
    heads = model.heads
    uses_time = "next" in names and cfg.next.time_weight > 0
    uses_values = ("next" in names and cfg.next.regression_weight > 0) or (
        "masked" in names and cfg.masked.regression_weight > 0)
    uses_pooled = "contrastive" in names
    if getattr(heads, "time", None) is not None and not uses_time:
        off.append(heads.time)
    if getattr(heads, "replaced", None) is not None and not ("masked" in names and cfg.masked.replace_prob > 0):
        off.append(heads.replaced)
    if not uses_values:
        off.extend(heads.values.values())
    for name in ("projection", "pool_query"):
        if getattr(model, name, None) is not None and not uses_pooled:
            off.append(getattr(model, name))
    if getattr(model, "membership", None) is not None and not ("masked" in names and cfg.masked.membership_weight > 0):
        off.append(model.membership)
    where = {id(m): name for name, m in model.named_modules()}
    frozen = []
    for m in off:
        for n, p in m.named_parameters():
            p.requires_grad_(False)
            frozen.append(f"{where[id(m)]}.{n}")  # named from the model: heads.time.weight, projection.0.bias
    return frozen


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))


class PretrainModule(pl.LightningModule):
    """`PretrainModule(model_cfg: dict, vocab_sizes, numeric_fields, objective, optim, trainer, seed)`.
    Everything is saved as plain-dict hyper-parameters, so checkpoints load with weights_only=True."""

    def __init__(self, model_cfg: dict, vocab_sizes: dict[str, int], numeric_fields: list[str],
                 objective: dict, optim: dict, trainer: dict | None = None, arch: str = "auto", mask_seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.obj_cfg = _dc(ObjectiveConfig, objective)
        self.optim_cfg = _dc(OptimConfig, optim)
        self.trainer_cfg = _dc(TrainerConfig, trainer or {})
        self.objectives = build_objectives(self.obj_cfg)
        if arch == "auto":
            arch = "decoder" if self.objectives[0][0] == "next" else "encoder"
        if (arch == "decoder") != (self.objectives[0][0] == "next"):
            raise ValueError(f"arch={arch} does not fit objective {[o[0] for o in self.objectives]}")
        self.arch = self.hparams["arch"] = arch  # checkpoints record the resolved architecture
        mcfg = model_config_from_dict(model_cfg)
        check_trainable(mcfg, vocab_sizes)
        if arch == "decoder" and mcfg.pooling != "mean":
            raise ValueError(f"model.pooling={mcfg.pooling} is an encoder option: a decoder's user embedding is the "
                             "state of its last event (plm-export pooling=model); drop model.pooling")
        if any(o[0] == "contrastive" for o in self.objectives) and mcfg.heads.projection_dim == 0:
            pass  # pooled embedding used directly
        if self.obj_cfg.masked.weight > 0 and self.obj_cfg.masked.replace_prob > 0 and not mcfg.heads.replaced:
            raise ValueError("objective.masked.replace_prob > 0 needs the replaced-event head: "
                             "set model.heads.replaced=true")
        if self.obj_cfg.masked.weight > 0 and self.obj_cfg.masked.membership_weight > 0 and not mcfg.heads.membership_dim:
            raise ValueError("objective.masked.membership_weight > 0 needs the membership head: "
                             "set model.heads.membership_dim > 0 (e.g. 64)")
        swapping = [o for n, _, o in self.objectives if n == "masked" and o.replace_prob > 0]
        unknown = [f for o in swapping for f in o.replace_keep if f not in vocab_sizes]
        if unknown:
            raise ValueError(f"objective.masked.replace_keep: unknown field(s) {unknown} "
                             f"(fields: {sorted(vocab_sizes)})")
        cls = PLMDecoder if arch == "decoder" else PLMEncoder
        self.net = PretrainNet(cls(mcfg, dict(vocab_sizes), list(numeric_fields)))
        self.frozen = freeze_unused(self.net.model, self.obj_cfg, [o[0] for o in self.objectives])
        self.seed = mask_seed
        self._val_ce: dict[str, list[Tensor]] = {}
        self._sharded = False

    @property
    def model(self):
        """The bare PLMEncoder / PLMDecoder (state_dict keys `net.model.*` in checkpoints)."""
        return self.net.model

    # --------------------------------------------------------------------- distributed setup
    def configure_model(self) -> None:
        """Called by Lightning inside the strategy's context: FSDP2 / activation checkpointing /
        compile are applied here, from outside the model."""
        if self._sharded:
            return
        from plm.train.parallel import apply_parallelism

        mesh = getattr(self, "device_mesh", None) if self._device_mesh_available() else None
        apply_parallelism(self.net, mesh, self.trainer_cfg)
        self._sharded = True

    def _device_mesh_available(self) -> bool:
        try:
            return self._trainer is not None and self.device_mesh is not None
        except Exception:
            return False

    # ------------------------------------------------------------------------------- steps
    def _generator(self, stage: str, micro: int = 0) -> torch.Generator:
        """The masks' and crops' random source: a function of (seed, rank, optimizer step, `micro`
        = the micro-batch within the step under trainer.accumulate_grad_batches; each of them
        draws its own masks), so a rerun or a resumed run draws the same ones."""
        rank = self.global_rank if self._trainer is not None else 0
        step = self.global_step if self._trainer is not None else 0
        k = max(1, int(self.trainer.accumulate_grad_batches)) if self._trainer is not None else 1
        step = step * k + micro % k  # = global_step without accumulation, as before
        salt = {"train": 0, "val": 1}[stage]
        g = torch.Generator()
        g.manual_seed(((self.seed * 1_000_003 + rank) * 7_919 + step) * 4 + salt)
        return g

    def shared_step(self, batch: dict[str, Any], stage: str, batch_idx: int = 0) -> tuple[Tensor, dict[str, Tensor], dict]:
        g = self._generator(stage, batch_idx)
        if stage == "val":
            g.manual_seed(self.seed * 31 + batch_idx)  # the same masks every validation pass
        total = None
        metrics: dict[str, Tensor] = {}
        ce_sums: dict[str, tuple[Tensor, Tensor]] = {}
        for name, w, obj in self.objectives:
            res = obj(self.net, batch, g)
            total = w * res.loss if total is None else total + w * res.loss
            metrics[f"{name}/loss"] = res.loss.detach()
            metrics.update(res.metrics)
            for f, v in res.ce_sums.items():
                ce_sums[f"{name}/{f}"] = v
            aux = getattr(res, "aux", None)
            if aux is not None and self.obj_cfg.aux_weight > 0 and aux.requires_grad:
                total = total + self.obj_cfg.aux_weight * aux
        return total, metrics, ce_sums

    def training_step(self, batch, batch_idx):
        loss, metrics, _ = self.shared_step(batch, "train", batch_idx)
        n = batch["attention_mask"].sum() if "attention_mask" in batch else None
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=1)
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, on_step=True, on_epoch=False, batch_size=1)
        if n is not None:
            self.log("train/events", n.float(), on_step=True, on_epoch=False, batch_size=1, reduce_fx="sum")
        return loss

    def validation_step(self, batch, batch_idx):
        if bool(torch.as_tensor(batch.get("repeat", False)).any()):
            return None  # padded batch (even_batches=pad): keep metrics exact
        loss, metrics, ce_sums = self.shared_step(batch, "val", batch_idx)
        self.log("val/loss", loss, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True, batch_size=1)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, on_step=False, on_epoch=True, sync_dist=True,
                      batch_size=1)
        for k, (s, c) in ce_sums.items():
            acc = self._val_ce.setdefault(k, [torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)])
            acc[0] += s.double().cpu()
            acc[1] += c.double().cpu()
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_ce = {}

    def on_validation_epoch_end(self) -> None:
        if not self._val_ce:
            return
        keys = sorted(self._val_ce)
        t = torch.stack([torch.stack(self._val_ce[k]) for k in keys]).to(self.device)  # (K, 2)
        if self.trainer.world_size > 1:
            t = self.trainer.strategy.reduce(t, reduce_op="sum")
        # every rank holds the summed totals now: each logs the same value, and sync_dist (a mean
        # of equal values) only tells Lightning the value is already global
        sync = self.trainer.world_size > 1
        for k, (s, c) in zip(keys, t.tolist()):
            if c > 0 and not k.endswith("/time"):
                self.log(f"val/ppl/{k}", math.exp(min(s / c, 50.0)), sync_dist=sync)
            elif c > 0:
                self.log(f"val/nll/{k}", s / c, sync_dist=sync)

    # --------------------------------------------------------------------------- optimiser
    def on_before_optimizer_step(self, optimizer) -> None:
        clip = self.trainer_cfg.gradient_clip_val
        params = [p for p in self.parameters() if p.grad is not None]
        if clip > 0 and params:
            norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
            if hasattr(norm, "full_tensor"):
                norm = norm.full_tensor()
            self.log("train/grad_norm", norm.detach().float(), on_step=True, on_epoch=False, batch_size=1)

    def configure_optimizers(self):
        o = self.optim_cfg
        # weight decay on the matrices of linear maps only: not on embedding tables (fields,
        # learned positions, T5 / time-bucket biases), norms, biases or other vectors; a name test
        # ("embed" not in the name) skipped the event embedding's projection and field mixer and
        # decayed the learned position table
        linear = {id(m.weight) for m in self.net.modules() if isinstance(m, torch.nn.Linear)}
        decay, no_decay = [], []
        for p in self.net.parameters():
            if not p.requires_grad:
                continue
            (decay if id(p) in linear and p.dim() >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        kw: dict[str, Any] = {}
        on_cuda = all(p.is_cuda for p in decay + no_decay)
        impl = o.impl if o.impl != "auto" else ("fused" if on_cuda else "foreach")
        if impl == "fused":
            kw["fused"] = True
        elif impl == "foreach":
            kw["foreach"] = True
        elif impl != "plain":
            raise ValueError(f"optim.impl={o.impl!r} is not one of auto, fused, foreach, plain")
        opt = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, **kw)
        total = self.trainer_cfg.max_steps if self.trainer_cfg.max_steps > 0 else 10_000
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_lambda(s, o.warmup_steps, total, o.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    # --------------------------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["plm_rng"] = {"torch": torch.get_rng_state()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Lightning calls this before it loads the weights and the optimizer: a checkpoint of
        # another model is named here, not as a size mismatch or an optimizer-group error
        diffs = _resume_differences(checkpoint.get("hyper_parameters") or {}, dict(self.hparams))
        if diffs:
            raise ValueError("the checkpoint to resume is a run of another model or data (" + "; ".join(diffs[:6])
                             + "): resuming continues a run exactly; use that run's config (its .hydra/config.yaml), "
                             "or start a new run")
        st = checkpoint.get("plm_rng")
        if st is not None:
            torch.set_rng_state(st["torch"])


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _resume_differences(saved: dict, now: dict) -> list[str]:
    """What makes a checkpoint's run another model: architecture, vocabularies, numeric fields and
    model config (how attention is computed and dropout may change), as 'key: saved -> now'."""
    out = []
    for key in ("arch", "vocab_sizes", "numeric_fields"):
        if key in saved and saved[key] != now.get(key):
            a, b = saved[key], now.get(key)
            if isinstance(a, dict) and isinstance(b, dict):
                out += [f"{key}.{k}: {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            else:
                out.append(f"{key}: {a} -> {b}")
    if "model_cfg" in saved:
        a, b = _flat(saved["model_cfg"]), _flat(now.get("model_cfg"))
        # keys both know (a checkpoint from before a key existed is not refused for lacking it)
        out += [f"model.{k}: {a[k]} -> {b[k]}" for k in sorted(set(a) & set(b))
                if a[k] != b[k] and not k.endswith(("backend", "dropout"))]
    return out


def _dc(cls, d: dict):
    """Dataclass from a (possibly nested) dict, ignoring nothing: unknown keys fail."""
    from dataclasses import fields, is_dataclass

    known = {f.name: f for f in fields(cls)}
    kw = {}
    for k, v in (d or {}).items():
        if k not in known:
            raise ValueError(f"{cls.__name__}: unknown key {k!r}")
        f = known[k]
        default = f.default_factory() if callable(f.default_factory) else None  # type: ignore[misc]
        kw[k] = _dc(type(default), v) if is_dataclass(default) and isinstance(v, dict) else v
    return cls(**kw)


def as_dict(x) -> dict:
    return asdict(x)
