"""Training callbacks: throughput (events/s, tokens/s, MFU, data-wait fraction), a PNG of the
training curves written into the run folder, and the progress display (a bar on a terminal,
plain lines in a log)."""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch


class ThroughputCallback(pl.Callback):
    """Every `every_n_steps` optimiser steps logs (global figures = this rank's x world size):

    - `perf/steps_per_s`, `perf/events_per_s` (real events), `perf/tokens_per_s` (padded slots
      B x T, what the hardware computes), `perf/mfu` = events/s x train FLOPs per event /
      (peak FLOP/s per device x devices), with FLOPs per event from `plm.model.flops`;
    - `data/wait_fraction` (and `data/wait_ms`) from the loader's `LoaderTimer`.
    """

    def __init__(self, flops_per_event: float, peak_flops_per_device: float, timer=None, every_n_steps: int = 10):
        self.fpe = flops_per_event
        self.peak = peak_flops_per_device
        self.timer = timer
        self.every = max(1, every_n_steps)
        self._reset()
        self.last: dict[str, float] = {}

    def _reset(self):
        self.t0 = None
        self.events = 0.0
        self.tokens = 0.0
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.t0 is None:
            self.t0 = time.perf_counter()
            if self.timer is not None:
                self.timer.reset()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = batch.get("attention_mask")
        if m is not None:
            self.events += float(m.sum())
            self.tokens += float(m.numel())
        self.batches += 1
        if self.batches < self.every:
            return
        dt = time.perf_counter() - self.t0
        world = trainer.world_size
        ev = self.events / dt * world
        out = {
            "perf/steps_per_s": self.batches / dt / max(1, trainer.accumulate_grad_batches),
            "perf/batches_per_s": self.batches / dt,
            "perf/events_per_s": ev,
            "perf/tokens_per_s": self.tokens / dt * world,
            "perf/mfu": ev * self.fpe / (self.peak * world) if self.peak > 0 else 0.0,
        }
        if self.timer is not None and self.timer.batches:
            s = self.timer.summary(reset=True)
            out["data/wait_fraction"] = s["data_wait_fraction"]
            out["data/wait_ms"] = 1000 * s["data_wait_s"] / max(s["batches"], 1)
        self.last = out
        pl_module.log_dict(out, on_step=True, on_epoch=False, batch_size=1, rank_zero_only=True)
        self._reset()
        self.t0 = time.perf_counter()


def read_metrics_csv(path: Path) -> dict[str, list[tuple[float, float]]]:
    """{metric: [(step, value), ...]} from a Lightning CSVLogger metrics.csv, after the history of
    the runs it resumed: `metrics.part-NNN.csv` beside it (plm-train keeps the file of a run it
    resumes in the same folder under that name; Lightning's logger would delete it), each part's
    points from the step its successor restarted at on replaced by the successor's."""
    path = Path(path)
    series: dict[str, list[tuple[float, float]]] = {}
    for part in [*sorted(path.parent.glob("metrics.part-*.csv")), path]:
        if not part.exists():
            continue
        s = _read_one_metrics_csv(part)
        first = min((x for v in s.values() for x, _ in v), default=None)
        if first is not None:
            series = {k: [(x, y) for x, y in v if x < first] for k, v in series.items()}
        for k, v in s.items():
            series.setdefault(k, []).extend(v)
    return {k: v for k, v in series.items() if v}


def _read_one_metrics_csv(path: Path) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if step in (None, ""):
                continue
            for k, v in row.items():
                if k in ("step", "epoch") or v in (None, ""):
                    continue
                try:
                    series.setdefault(k, []).append((float(step), float(v)))
                except ValueError:
                    pass
    return series


def plot_curves(metrics_csv: Path, out_png: Path) -> Path | None:
    """Loss curves (train/val total and per objective), learning rate and throughput to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not Path(metrics_csv).exists():
        return None
    s = read_metrics_csv(Path(metrics_csv))
    panels = [
        ("loss", [k for k in s if k in ("train/loss", "val/loss") or (k.endswith("/loss") and k.count("/") == 2)]),
        ("learning rate", [k for k in s if k.startswith("lr")]),
        ("events/s", [k for k in s if k == "perf/events_per_s"]),
        ("data-wait fraction", [k for k in s if k == "data/wait_fraction"]),
    ]
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for k in sorted(keys):
            xs, ys = zip(*s[k])
            ax.plot(xs, ys, label=k, marker="." if len(xs) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


class CurvesCallback(pl.Callback):
    """Writes `<run_dir>/curves.png` from the CSV logger's metrics at every validation end and at
    the end of training (rank 0 only)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def _plot(self, trainer):
        if trainer.global_rank != 0:
            return
        for lg in trainer.loggers:
            if isinstance(lg, pl.loggers.CSVLogger):
                lg.save()
                plot_curves(Path(lg.log_dir) / "metrics.csv", self.run_dir / "curves.png")

    def on_train_end(self, trainer, pl_module):
        self._plot(trainer)

    def on_exception(self, trainer, pl_module, exception):
        try:
            self._plot(trainer)
        except Exception:
            pass


class FinalValidation(pl.Callback):
    """Validates at the last training step too: Lightning validates every `val_check_interval`
    steps, so a run whose `max_steps` is not a multiple of it (a short sweep run, a smoke run)
    ended with its last validation steps behind, or with none at all. Asking the loop to stop at
    `max_steps` makes Lightning run its validation there (its early-stopping path); at a step
    that validates anyway it runs once."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True
        # likewise when the run ends on max_epochs: at the last batch of the last epoch
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
        if 0 < max_epochs <= trainer.current_epoch + 1 and trainer.is_last_batch:
            trainer.should_stop = True


def default_peak_flops(accelerator: str) -> float:
    if accelerator in ("gpu", "cuda") and torch.cuda.is_available():
        return 312e12  # A100 bf16 dense; set trainer.peak_tflops for other hardware
    return 1e12


class LineProgress(pl.callbacks.ProgressBar):
    """Progress as plain lines, for logs that are not a terminal (CI, SLURM, `| tee`): a redrawn
    bar there is one run-on line of carriage returns and cursor codes. Prints, on global rank 0,
    `<prefix>: step 120/500 (24%) | train/loss 4.912 | 1.21 steps/s | eta 5 min 13 s` at most every
    `every_s` seconds and at the last step, a line after each validation with its metrics, and
    `<prefix>: batch 12/40 (30%) | ...` while predicting (plm-export)."""

    def __init__(self, prefix: str, every_s: float = 30.0, stream=None):
        super().__init__()
        self.prefix, self.every_s, self.stream = prefix, every_s, stream
        self._enabled = True
        self._t0 = self._last = 0.0
        self._start_step = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _say(self, text: str) -> None:
        if self._enabled and self.trainer.is_global_zero:
            print(f"{self.prefix}: {text}", file=self.stream or sys.stdout, flush=True)

    @staticmethod
    def _eta(seconds: float) -> str:
        s = int(round(seconds))
        return f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s"

    def _metrics(self, trainer, pl_module, prefix: str) -> str:
        items = [(k, v) for k, v in self.get_metrics(trainer, pl_module).items() if k.startswith(prefix)]
        return "".join(f" | {k} {float(v):.4g}" for k, v in sorted(items) if k != "v_num")

    def on_train_start(self, trainer, pl_module):
        self._t0 = self._last = time.perf_counter()
        self._start_step = trainer.global_step

    def _elapsed_if_due(self, last: bool) -> float | None:
        """Seconds since the start when a line is due (`every_s` since the previous one, or the
        last step / batch), else None."""
        now = time.perf_counter()
        if now - self._last < self.every_s and not last:
            return None
        self._last = now
        return max(now - self._t0, 1e-9)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        last = total is not None and step >= total
        elapsed = self._elapsed_if_due(last)
        if elapsed is None:
            return
        rate = (step - self._start_step) / elapsed
        where = f"step {step}/{total} ({100 * step // total}%)" if total else f"step {step}"
        eta = f" | eta {self._eta((total - step) / rate)}" if total and rate > 0 and not last else ""
        self._say(f"{where}{self._metrics(trainer, pl_module, 'train/')} | {rate:.3g} steps/s{eta}")

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._say(f"validation at step {trainer.global_step}{self._metrics(trainer, pl_module, 'val/')}")

    def on_predict_start(self, trainer, pl_module):
        self._t0 = self._last = time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        totals = trainer.num_predict_batches
        total = totals[dataloader_idx] if dataloader_idx < len(totals) else float("inf")
        done = batch_idx + 1
        elapsed = self._elapsed_if_due(total != float("inf") and done >= total)
        if elapsed is None:
            return
        of = f"/{int(total)} ({100 * done // int(total)}%)" if total != float("inf") else ""
        self._say(f"batch {done}{of} | {done / elapsed:.3g} batches/s")


def progress_callbacks(enabled: bool, prefix: str, refresh_rate: int = 1, stream=None) -> list[pl.Callback]:
    """The progress display: Lightning's bar on a terminal, `LineProgress` lines otherwise (a log
    file, CI, SLURM); nothing when `enabled` is false. Decided by whether `stream` (stdout, where
    Lightning's bar writes) is a terminal."""
    if not enabled:
        return []
    stream = stream or sys.stdout
    if stream.isatty():
        from lightning.pytorch.callbacks import TQDMProgressBar

        return [TQDMProgressBar(refresh_rate=max(1, refresh_rate))]
    return [LineProgress(prefix, stream=stream)]
