"""Worker of tests/dist/test_dist.py: trains PretrainModule on fixed synthetic batches with a given
strategy and writes each step's loss (this rank's) to OUT/losses-<rank>.json.

    torchrun --nproc_per_node=2 tests/dist/dist_worker.py ddp|fsdp2|single OUT

Every rank gets its share of the same global batch (rows rank::world of 4 full-length rows), so
with the next-event objective (same number of targets per row) the mean of the ranks' losses
equals the one-process loss on the whole batch, and so do the gradients (no specials: every
row has the same number of regression targets too)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import lightning.pytorch as pl
import torch

torch.set_num_threads(1)

from plm.model import ModelConfig  # noqa: E402
from plm.model.testing import TOY_NUMERIC, TOY_VOCAB, random_batch  # noqa: E402
from plm.train.config import ObjectiveConfig, OptimConfig, TrainerConfig  # noqa: E402
from plm.train.module import PretrainModule  # noqa: E402

GLOBAL_B, T, STEPS = 4, 12, 6


class Batches:
    def __init__(self, rank: int, world: int):
        self.batches = []
        for s in range(STEPS):
            b = random_batch(B=GLOBAL_B, T=T, seed=100 + s, specials=False)
            self.batches.append({k: v[rank::world].contiguous() for k, v in b.items()})

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class Record(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def main(strategy: str, out: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    mcfg = ModelConfig(d_model=32, n_layers=2)
    mcfg.attention.n_heads = 2
    obj = ObjectiveConfig(name="next")
    obj.next.weight = 1.0
    tcfg = TrainerConfig(strategy=strategy if strategy != "single" else "auto", max_steps=STEPS, gradient_clip_val=0.5)
    pl.seed_everything(0, verbose=False)
    module = PretrainModule(asdict(mcfg), TOY_VOCAB, list(TOY_NUMERIC), asdict(obj),
                            asdict(OptimConfig(lr=3e-3, warmup_steps=0)), asdict(tcfg), "auto", 0)
    if strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        strat = DDPStrategy(process_group_backend="gloo")
    elif strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strat = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1, process_group_backend="gloo")
    else:
        strat = "auto"
    rec = Record()
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strat, max_steps=STEPS, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[rec], use_distributed_sampler=False, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=Batches(rank, world))
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"losses-{rank}.json").write_text(json.dumps(rec.losses))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
