"""`train(cfg: TrainConfig) -> dict`: the whole pre-training run, no hydra needed (the CLI in
`plm.cli.train` only composes the config and picks the run folder).

Run folder layout::

    <run_dir>/config.yaml         the resolved TrainConfig
    <run_dir>/checkpoints/        step-N.ckpt (periodic), last.ckpt (torch.load(..., weights_only=True))
    <run_dir>/final.pt            {"model": state_dict, "model_config", "vocab_sizes", "numeric_fields", "arch", "max_len",
                                   "as_of_query" (trained with objective.masked.last_prob > 0),
                                   "tokenizer_sha256" (of the training data's tokenizer.json)}
    <run_dir>/run.json            steps, fit time, the data (path, tokenizer hash), outputs, last metrics
    <run_dir>/csv/metrics.csv     every logged metric
    <run_dir>/curves.png          training curves
    <run_dir>/wandb/              offline wandb run (sync later with `wandb sync`)
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from plm.train.config import TrainConfig, trains_as_of_query

STRATEGIES = ("auto", "ddp", "fsdp2")
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true")


def check_config(cfg: TrainConfig) -> None:
    """Clear errors for bad values (hydra already rejects unknown keys and wrong types)."""
    t = cfg.trainer
    if t.strategy not in STRATEGIES:
        raise ValueError(f"trainer.strategy={t.strategy!r} is not one of {STRATEGIES}")
    if t.precision not in PRECISIONS:
        raise ValueError(f"trainer.precision={t.precision!r} is not one of {PRECISIONS}")
    if t.accelerator not in ("cpu", "gpu", "cuda", "auto"):
        raise ValueError(f"trainer.accelerator={t.accelerator!r} is not one of cpu, gpu, cuda, auto")
    if t.devices < 1 or t.num_nodes < 1:
        raise ValueError(f"trainer.devices={t.devices} and trainer.num_nodes={t.num_nodes} must be >= 1")
    if t.max_steps < 1 and not t.fast_dev_run:
        raise ValueError(f"trainer.max_steps={t.max_steps} must be >= 1")
    if t.accumulate_grad_batches < 1:
        raise ValueError(f"trainer.accumulate_grad_batches={t.accumulate_grad_batches} must be >= 1")
    if t.save_top_k not in (-1, 0, 1):  # periodic checkpoints have no metric to rank k of them by
        raise ValueError(f"trainer.save_top_k={t.save_top_k}: -1 keeps every periodic checkpoint, 1 only the newest, "
                         "0 none (last.ckpt is always kept)")
    if cfg.arch not in ("auto", "encoder", "decoder"):
        raise ValueError(f"arch={cfg.arch!r} is not one of auto, encoder, decoder")
    if (t.require_gpu or t.accelerator in ("gpu", "cuda")) and not torch.cuda.is_available():
        raise ValueError(  # bad input (exit 2 through cli_errors), not a crash
            f"trainer config asks for GPUs (accelerator={t.accelerator}, devices={t.devices}, "
            f"num_nodes={t.num_nodes}) but no CUDA device is visible on this machine. Use trainer=cpu "
            "(or trainer=ddp / trainer=fsdp with trainer.accelerator=cpu trainer.precision=32-true for gloo on CPU)."
        )
    backend = cfg.model.attention.backend
    if t.accelerator == "cpu" and backend in ("flex", "xformers"):
        why = ("has no CPU kernels" if backend == "xformers"
               else "runs forward-only on CPU (FlexAttention has no CPU backward)")
        raise ValueError(f"model.attention.backend={backend} {why}, and trainer.accelerator=cpu trains on CPU: "
                         "use model.attention.backend=sdpa (the same attention; plm-export runs a model "
                         "trained with either on CPU)")
    if t.strategy == "fsdp2" and t.accelerator == "cpu" and t.precision.startswith("16"):
        raise ValueError("trainer.precision=16-mixed is not supported on CPU; use 32-true or bf16-mixed")
    cfg.data.validate()
    from plm.model import model_config_from_dict

    model_config_from_dict(asdict(cfg.model))


def strategy(t):
    """Lightning strategy of a trainer group (`TrainerConfig`): also plm-export's predict loop."""
    backend = t.process_group_backend or None
    if t.strategy == "ddp" or (t.strategy == "auto" and (t.devices > 1 or t.num_nodes > 1)):
        # auto on several devices is Lightning's DDP: built here so process_group_backend applies
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(process_group_backend=backend, find_unused_parameters=False)
    if t.strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=t.devices * t.num_nodes, tensor_parallel_size=1,
                                     process_group_backend=backend, save_distributed_checkpoint=True)
    return "auto"


def resolve_run_dir(cfg: TrainConfig) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:
        import time

        return Path("runs/train") / time.strftime("%Y-%m-%d_%H-%M-%S")


_WANDB_ENV = ("WANDB_MODE", "WANDB_SILENT")


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Pre-train a model; returns {"run_dir", "last_ckpt", "final", "metrics" (last logged values),
    "throughput" (last throughput figures)}. The wandb variables it sets in the environment
    (and Lightning's offline mode, which sets WANDB_MODE=dryrun) are undone when it returns, so
    the next run of a sweep in the same process starts from the user's own environment."""
    saved = {k: os.environ.get(k) for k in _WANDB_ENV}
    try:
        return _train(cfg)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _is_rank_zero() -> bool:
    """Whether this process is global rank 0, before any Trainer exists (Lightning's reading of
    RANK / LOCAL_RANK / SLURM_PROCID, which its launchers set in every process they start)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _start_wandb_online(wandb_logger) -> None:
    """Start the online wandb run before training, so that a missing API key or an unreachable
    server fails at once with one line (wandb's own error surfaced from inside Trainer.fit)."""
    import wandb

    try:
        wandb_logger.experiment  # noqa: B018 - wandb.init, on rank 0
    except wandb.errors.Error as e:
        raise ValueError(f"logger.wandb_mode=online: wandb could not start a run ({e}); log in (`wandb login` or "
                         "WANDB_API_KEY), or train with logger.wandb_mode=offline and `wandb sync` the run "
                         "folder's wandb/ later") from None


def wandb_mode(configured: str) -> str:
    """The wandb mode a run uses: WANDB_MODE from the environment when set (it overrides
    logger.wandb_mode, with a note; `dryrun` is wandb's old name of `offline`), else the config's."""
    env = os.environ.get("WANDB_MODE")
    env = "offline" if env == "dryrun" else env
    if env and env != configured and _is_rank_zero():  # once per run, not once per DDP process
        print(f"plm-train: WANDB_MODE={env} in the environment overrides logger.wandb_mode={configured}", flush=True)
    return env or configured


def _check_resume(ckpt_path: str, run_dir: Path) -> None:
    """ckpt_path=last needs this run folder's checkpoints/last.ckpt; a local path must exist.
    Said before anything loads (Lightning's "Checkpoint file not found" came after the model
    and data were set up, and without the fix)."""
    if ckpt_path == "last":
        if not (run_dir / "checkpoints" / "last.ckpt").exists():
            raise FileNotFoundError(
                f"ckpt_path=last resumes the run folder's checkpoints/last.ckpt, and {run_dir} has none: pass the "
                "earlier run's folder (run_dir=RUN or hydra.run.dir=RUN), or ckpt_path=RUN/checkpoints/last.ckpt")
    elif ckpt_path and "://" not in ckpt_path and not Path(ckpt_path).exists():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist")


def _train(cfg: TrainConfig) -> dict[str, Any]:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from omegaconf import OmegaConf

    from plm.data.datamodule import PLMDataModule, loader_warnings_off
    from plm.model.flops import flops_per_event
    from plm.train.callbacks import (
        CurvesCallback,
        FinalValidation,
        ThroughputCallback,
        default_peak_flops,
        progress_callbacks,
    )
    from plm.train.module import PretrainModule

    check_config(cfg)
    t = cfg.trainer
    run_dir = resolve_run_dir(cfg)
    _check_resume(cfg.ckpt_path, run_dir)
    earlier = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt")) if not cfg.ckpt_path else []
    if earlier:  # Lightning would write beside them as last-v1.ckpt, and ckpt_path=last resume the old run
        raise FileExistsError(f"run_dir={run_dir} holds an earlier run's checkpoints ({', '.join(earlier[:3])}"
                              f"{', ...' if len(earlier) > 3 else ''}): resume it with ckpt_path=last, or train "
                              "into another run_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    if t.num_threads > 0:
        torch.set_num_threads(t.num_threads)

    dm = PLMDataModule(config=cfg.data)
    module = PretrainModule(
        asdict(cfg.model), dict(dm.vocab_sizes), list(dm.numeric_fields), asdict(cfg.objective), asdict(cfg.optim),
        asdict(t), cfg.arch, cfg.seed,
    )
    rank0 = os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"
    if rank0 and module.arch == "decoder":  # e.g. conf/sweep/objective.yaml over an encoder preset
        heads = module.model.cfg.heads
        for key, value, serves in (("projection_dim", heads.projection_dim, "the encoder's contrastive objective"),
                                   ("membership_dim", heads.membership_dim, "the encoder's masked objective"),
                                   ("membership_bank", heads.membership_bank, "the encoder's masked objective")):
            if value > 0:
                print(f"plm-train: model.heads.{key}={value} has no effect on a decoder (the head serves {serves})",
                      flush=True)
    module.hparams["tokenizer_sha256"] = dm.tokenizer_sha256  # Lightning checkpoints carry it too
    if rank0 and module.frozen:  # built by the model config, trained by no active objective: say so, once
        serves = {"heads.time": "objective=next", "heads.values": "a regression_weight > 0",
                  "heads.replaced": "objective.masked.replace_prob > 0", "projection": "a contrastive objective",
                  "pool_query": "a contrastive objective", "membership": "objective.masked.membership_weight > 0"}
        parts = sorted({".".join(n.split(".")[:2]) if n.startswith("heads.") else n.split(".")[0] for n in module.frozen})
        print(f"plm-train: not trained by {'+'.join(o[0] for o in module.objectives)} (built by the model config, "
              f"kept at init): {', '.join(f'{p} (serves {serves[p]})' if p in serves else p for p in parts)}", flush=True)
    fpe = flops_per_event(module.model.cfg, context=cfg.data.max_len, decoder=module.arch == "decoder",
                          vocab=dict(dm.vocab_sizes))["train"]
    peak = t.peak_tflops * 1e12 if t.peak_tflops > 0 else default_peak_flops(t.accelerator)

    loggers: list = []
    csv_dir = run_dir / "csv"
    if cfg.ckpt_path and rank0 and (csv_dir / "metrics.csv").exists():
        # a resumed run in the same folder: Lightning's logger deletes metrics.csv; keep it as a
        # part of the history (read_metrics_csv joins the parts: curves.png, plm-sweep-report)
        n = len(list(csv_dir.glob("metrics.part-*.csv")))
        (csv_dir / "metrics.csv").rename(csv_dir / f"metrics.part-{n:03d}.csv")
    csv_logger = CSVLogger(str(run_dir), name="csv", version="")
    loggers.append(csv_logger)
    wandb_logger = None
    mode = wandb_mode(cfg.logger.wandb_mode) if cfg.logger.wandb else "disabled"
    if mode != "disabled":
        os.environ["WANDB_MODE"] = mode
        os.environ.setdefault("WANDB_SILENT", "true")
        from lightning.pytorch.loggers import WandbLogger

        wandb_logger = WandbLogger(
            project=cfg.logger.project, name=cfg.name or run_dir.name, save_dir=str(run_dir),
            entity=cfg.logger.entity or None, offline=mode == "offline",
            config=OmegaConf.to_container(OmegaConf.structured(cfg)),
            # explicit: wandb keeps the settings of its first run in a process, so the second job
            # of a sweep (hydra's in-process launcher) ran offline after an offline one, silently
            mode=mode,
        )
        # Lightning passes anonymous=None to wandb.init unconditionally and wandb warns about any
        # value ("The anonymous setting has no effect", wandb/wandb#10909); PLM never uses it
        init = getattr(wandb_logger, "_wandb_init", None)
        if isinstance(init, dict) and init.get("anonymous") is None:
            init.pop("anonymous", None)
        if mode == "online" and _is_rank_zero():
            _start_wandb_online(wandb_logger)
        loggers.append(wandb_logger)

    ckpt_dir = run_dir / "checkpoints"
    ckpt_cb = ModelCheckpoint(
        dirpath=str(ckpt_dir), filename="step-{step}", auto_insert_metric_name=False,
        every_n_train_steps=t.checkpoint_every_n_steps if t.checkpoint_every_n_steps > 0 else None,
        save_top_k=t.save_top_k, save_last=True, monitor=None,
    )
    thr = ThroughputCallback(fpe, peak, dm.timer, t.throughput_every_n_steps)
    callbacks = [ckpt_cb, thr, CurvesCallback(run_dir), LearningRateMonitor(logging_interval="step"), FinalValidation()]
    callbacks += progress_callbacks(t.enable_progress_bar, "plm-train", t.log_every_n_steps)
    limit_val = t.limit_val_batches if t.limit_val_batches <= 1 else int(t.limit_val_batches)
    trainer = pl.Trainer(
        accelerator="gpu" if t.accelerator == "cuda" else t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy(t),
        precision=t.precision,
        max_steps=t.max_steps,
        max_epochs=t.max_epochs,
        accumulate_grad_batches=t.accumulate_grad_batches,
        val_check_interval=t.val_check_interval if t.val_check_interval > 0 else None,
        check_val_every_n_epoch=None if t.val_check_interval > 0 else 1,
        limit_val_batches=limit_val,
        num_sanity_val_steps=t.num_sanity_val_steps,
        log_every_n_steps=t.log_every_n_steps,
        fast_dev_run=t.fast_dev_run,
        enable_progress_bar=t.enable_progress_bar,
        deterministic=t.deterministic,
        logger=loggers,
        callbacks=callbacks,
        default_root_dir=str(run_dir),
        use_distributed_sampler=False,
        enable_model_summary=False,
    )
    ckpt_path = cfg.ckpt_path or None
    if ckpt_path == "last":
        ckpt_path = str(ckpt_dir / "last.ckpt")
    t_fit = time.perf_counter()
    with loader_warnings_off():
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    fit_seconds = time.perf_counter() - t_fit

    final = run_dir / "final.pt"
    if t.strategy == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(module.net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        sd = {k.removeprefix("model."): v for k, v in full.items()}  # a collective: every rank calls it
    else:
        sd = {k: v.detach().cpu() for k, v in module.model.state_dict().items()}
    if trainer.global_rank == 0:
        torch.save({"model": sd, "model_config": asdict(cfg.model), "vocab_sizes": dict(dm.vocab_sizes),
                    "numeric_fields": list(dm.numeric_fields), "arch": module.arch,
                    "max_len": int(cfg.data.eval_max_len or cfg.data.max_len),
                    "as_of_query": trains_as_of_query(cfg.objective.masked),
                    "tokenizer_sha256": dm.tokenizer_sha256}, final)
        if wandb_logger is not None and cfg.logger.log_artifacts:
            _log_artifacts(wandb_logger, dm, final, run_dir)
        if wandb_logger is not None:
            import wandb

            wandb.finish()
    metrics = {k: float(v) for k, v in trainer.logged_metrics.items() if torch.as_tensor(v).numel() == 1}
    last_ckpt = Path(ckpt_cb.last_model_path) if ckpt_cb.last_model_path else ckpt_dir / "last.ckpt"
    result = {"run_dir": str(run_dir), "last_ckpt": str(last_ckpt), "final": str(final), "metrics": metrics,
              "throughput": dict(thr.last), "global_step": trainer.global_step, "global_rank": trainer.global_rank}
    if trainer.global_rank == 0:  # what the run consumed and produced, beside config.yaml
        record = {"global_step": trainer.global_step, "fit_seconds": round(fit_seconds, 1),
                  "resumed_from": ckpt_path, "world_size": trainer.world_size,
                  "data": {"path": str(cfg.data.path), "tokenizer_sha256": dm.tokenizer_sha256},
                  "outputs": {"final": str(final), "last_ckpt": str(last_ckpt)},
                  "metrics": metrics, "throughput": dict(thr.last)}
        (run_dir / "run.json").write_text(json.dumps(record, indent=2, default=str))
    return result


def _log_artifacts(wandb_logger, dm, final: Path, run_dir: Path) -> None:
    import wandb

    from plm.data.dataset import join

    run = wandb_logger.experiment
    tok_rel = (dm.manifest.get("tokenizer") or {}).get("path", "tokenizer.json")
    tok_local = run_dir / "tokenizer.json"
    with dm.fs.open_input_stream(join(dm.root, tok_rel)) as f:
        tok_local.write_bytes(f.read())
    art = wandb.Artifact("tokenizer", type="tokenizer")
    art.add_file(str(tok_local))
    run.log_artifact(art)
    art = wandb.Artifact("model", type="model")
    art.add_file(str(final))
    run.log_artifact(art)
