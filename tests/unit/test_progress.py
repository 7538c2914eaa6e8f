"""Progress display of plm-train / plm-export: Lightning's bar on a terminal, plain lines in a
log (no carriage returns or cursor codes), nothing when switched off."""

from __future__ import annotations

import io

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from plm.train.callbacks import LineProgress, progress_callbacks


class _Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.lin(batch[0]).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.lin(batch[0]).pow(2).mean(), prog_bar=True)

    def predict_step(self, batch, batch_idx):
        return self.lin(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(n=12):
    return DataLoader(TensorDataset(torch.randn(n, 2, generator=torch.Generator().manual_seed(0))), batch_size=2)


def _trainer(callbacks, **kw):
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_model_summary=False, enable_progress_bar=bool(callbacks), callbacks=callbacks, **kw)


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_plain_lines_and_a_terminal_gets_the_bar():
    from lightning.pytorch.callbacks import TQDMProgressBar

    assert progress_callbacks(False, "plm-train") == []
    assert isinstance(progress_callbacks(True, "plm-train", stream=_Tty())[0], TQDMProgressBar)
    log = io.StringIO()
    cbs = progress_callbacks(True, "plm-train", stream=log)
    assert isinstance(cbs[0], LineProgress)
    _trainer(cbs, max_steps=5, val_check_interval=5, limit_val_batches=2, num_sanity_val_steps=1).fit(
        _Tiny(), _loader(), _loader())
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    # the 30-second cadence prints nothing in between; the last step and the validation always
    assert [ln.split(" | ")[0] for ln in lines] == ["plm-train: step 5/5 (100%)", "plm-train: validation at step 5"]
    assert "train/loss" in lines[0] and "steps/s" in lines[0] and "eta" not in lines[0]
    assert "val/loss" in lines[1]  # the sanity check printed nothing
    log = io.StringIO()
    _trainer([LineProgress("plm-export", every_s=0.0, stream=log)]).predict(_Tiny(), _loader(), return_predictions=False)
    lines = log.getvalue().splitlines()
    assert [ln.split(" | ")[0] for ln in lines] == [f"plm-export: batch {i}/6 ({100 * i // 6}%)" for i in range(1, 7)]


def test_every_s_zero_prints_each_step_with_an_eta():
    log = io.StringIO()
    _trainer([LineProgress("plm-train", every_s=0.0, stream=log)], max_steps=3, limit_val_batches=0).fit(
        _Tiny(), _loader())
    lines = log.getvalue().splitlines()
    assert [ln.split(" | ")[0] for ln in lines] == ["plm-train: step 1/3 (33%)", "plm-train: step 2/3 (66%)",
                                                   "plm-train: step 3/3 (100%)"]
    assert "eta" in lines[0] and "eta" not in lines[-1]
