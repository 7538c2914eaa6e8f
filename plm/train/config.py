"""Typed schema of `plm-train` (hydra ConfigStore name `train_schema`); values in `conf/train.yaml`
and the groups `conf/{model,objective,trainer,logger,experiment}/`."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from plm.data.config import DataConfig
from plm.model.config import ModelConfig


@dataclass
class MaskedConfig:
    weight: float = 0.0  # 0 = off
    event_prob: float = 0.15  # probability to mask a whole event (every field)
    field_prob: float = 0.0  # probability to mask one field of an event on its own
    regression_weight: float = 1.0  # weight of the numeric-value MSE (0 = CE on bins only)
    last_prob: float = 0.0  # probability to mask the last event of each sequence (the as-of query)
    last_jitter: bool = False  # that event's time drawn between the previous event and its own
    # replaced-event detection (needs model.heads.replaced=true): swap this fraction of the
    # unmasked events for events of other sequences and predict which were swapped
    replace_prob: float = 0.0
    replace_weight: float = 1.0  # weight of its binary cross-entropy
    replace_keep: str = "log_dt,hour,dow"  # comma-separated fields a swapped event keeps (time-derived)
    # event membership (needs model.heads.membership_dim > 0): each event masked whole must be
    # matched to its own sequence among the batch's from their pooled vectors (cross-entropy)
    membership_weight: float = 0.0
    membership_temperature: float = 0.1


def trains_as_of_query(masked: MaskedConfig | dict) -> bool:
    """Whether a masked-objective config (the dataclass, or its dict in a checkpoint's
    hyper-parameters) trains the as-of query that `plm-export pooling=asof` asks."""
    get = masked.get if isinstance(masked, dict) else (lambda k, d=0: getattr(masked, k, d))
    return bool(get("weight", 0) > 0 and get("last_prob", 0) > 0)


@dataclass
class ContrastiveConfig:
    weight: float = 0.0  # 0 = off
    temperature: float = 0.1
    min_frac: float = 0.5  # sub-sequence length as a fraction of the sequence, in [min_frac, max_frac]
    max_frac: float = 1.0
    min_len: int = 2  # shortest sub-sequence (events)
    gather: bool = True  # negatives from every rank (gradient-preserving all_gather)
    pack_views: bool = True  # pack the views into rows (segment_ids) instead of one padded row each


@dataclass
class NextEventConfig:
    weight: float = 0.0  # 0 = off (decoder objective)
    time_weight: float = 1.0  # weight of the time-to-next NLL
    regression_weight: float = 1.0


@dataclass
class ObjectiveConfig:
    name: str = "masked"
    masked: MaskedConfig = field(default_factory=MaskedConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    next: NextEventConfig = field(default_factory=NextEventConfig)
    aux_weight: float = 0.01  # MoE load-balancing loss weight


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1  # not applied to biases, norms and embedding tables
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at trainer.max_steps
    impl: str = "auto"  # auto (fused on CUDA, else foreach) | fused | foreach | plain


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"  # cpu | gpu | auto
    devices: int = 1  # per node
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp2 (ModelParallelStrategy + fully_shard per block)
    process_group_backend: str = ""  # "" = default (nccl on GPU, gloo on CPU)
    precision: str = "32-true"  # 32-true | bf16-mixed | 16-mixed | bf16-true
    max_steps: int = 1000
    max_epochs: int = -1
    accumulate_grad_batches: int = 1
    gradient_clip_val: float = 1.0  # global grad-norm clip (0 = off)
    val_check_interval: int = 200  # validate every N training batches (0 = only at epoch end)
    limit_val_batches: float = 1.0  # fraction (<= 1) or number (> 1) of val batches
    num_sanity_val_steps: int = 0
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 200  # 0 = only the last checkpoint at the end
    save_top_k: int = -1  # periodic checkpoints kept: -1 every one, 1 the newest, 0 none (last.ckpt always)
    fast_dev_run: bool = False
    enable_progress_bar: bool = True
    deterministic: bool = False
    compile: bool = False  # torch.compile each transformer block
    activation_checkpointing: bool = False  # recompute each block in backward (fsdp2 and others)
    fsdp_reshard_after_forward: bool = True
    require_gpu: bool = False  # fail clearly when no CUDA device is present
    peak_tflops: float = 0.0  # per-device peak for MFU (0 = 1.0 TFLOP/s CPU guess)
    throughput_every_n_steps: int = 10
    num_threads: int = 0  # torch intra-op CPU threads per process (0 = torch's default)


@dataclass
class LoggerConfig:
    # metrics.csv is always written (curves.png and plm-sweep-report read it); no switch for it
    wandb: bool = True
    wandb_mode: str = "offline"  # offline | online | disabled
    project: str = "plm"
    entity: str = ""
    log_artifacts: bool = True  # tokenizer + final checkpoint


@dataclass
class TrainConfig:
    """`plm-train data.path=PREPARED model=tiny trainer=cpu objective=masked experiment=NAME`."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    name: str = ""  # run name ("" = experiment name + the command-line overrides)
    run_dir: str = ""  # "" = hydra's run folder (hydra.run.dir), else this folder
    ckpt_path: str = ""  # resume from this checkpoint ("last" = the run folder's last.ckpt)
    arch: str = "auto"  # auto (decoder iff objective next) | encoder | decoder


cs = ConfigStore.instance()
cs.store(name="train_schema", node=TrainConfig)
