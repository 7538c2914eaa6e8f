"""Collect a sweep's runs into a Markdown table and a plot.

    python -m plm.train.sweep_report runs/sweep/2026-01-01_00-00-00 [--name NAME] [--out experiments]

Reads every `<dir>/<job>/.hydra/overrides.yaml`, `<dir>/<job>/csv/metrics.csv` and
`<dir>/<job>/run.json` (the steps a run trained; a run still going, or one that failed, has none
and shows the steps of its last logged metric); writes `experiments/<name>/README.md` (one row
per run: overrides, steps, last train/val loss, best val loss, events/s) and
`experiments/<name>/val_loss.png`. Also installed as the console script `plm-sweep-report`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from plm.train.callbacks import read_metrics_csv


def collect(sweep_dir: Path) -> list[dict]:
    rows = []
    for ov in sorted(sweep_dir.glob("*/.hydra/overrides.yaml")):
        run = ov.parent.parent
        overrides = [o for o in (yaml.safe_load(ov.read_text()) or []) if not o.startswith(("data.path=", "+sweep="))]
        m = run / "csv" / "metrics.csv"
        s = read_metrics_csv(m) if m.exists() else {}

        def last(k, s=s):
            return s[k][-1][1] if s.get(k) else float("nan")

        record = run / "run.json"
        if record.exists():  # written at the end of a run: the steps it trained
            steps = int(json.loads(record.read_text())["global_step"])
        else:  # the CSV's steps are 0-based
            steps = int(max((x for v in s.values() for x, _ in v), default=-1)) + 1
        rows.append({
            "run": run.name, "overrides": " ".join(overrides), "steps": steps,
            "train_loss": last("train/loss"), "val_loss": last("val/loss"),
            "best_val_loss": min((v for _, v in s.get("val/loss", [])), default=float("nan")),
            "events_per_s": last("perf/events_per_s"), "curve": s.get("val/loss", []),
        })
    return rows


def write_report(rows: list[dict], out: Path, title: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Sweep {title}", "", "| run | overrides | steps | train loss | val loss | best val loss | events/s |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["best_val_loss"] != r["best_val_loss"], r["best_val_loss"])):
        lines.append(f"| {r['run']} | `{r['overrides']}` | {r['steps']} | {r['train_loss']:.4f} | {r['val_loss']:.4f} "
                     f"| {r['best_val_loss']:.4f} | {r['events_per_s']:.0f} |")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        if r["curve"]:
            xs, ys = zip(*r["curve"])
            ax.plot(xs, ys, marker=".", label=r["overrides"] or r["run"])
    ax.set_xlabel("step")
    ax.set_ylabel("val/loss")
    if any(r["curve"] for r in rows):
        ax.legend(fontsize=6)
    else:
        ax.text(0.5, 0.5, "no validation logged", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(out / "val_loss.png", dpi=90)
    plt.close(fig)
    return out / "README.md"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep_dir")
    p.add_argument("--name", default=None)
    p.add_argument("--out", default="experiments")
    a = p.parse_args(argv)
    d = Path(a.sweep_dir)
    rows = collect(d)
    if not rows:
        raise SystemExit(f"plm-sweep-report: no runs (*/.hydra/overrides.yaml) under {d}")
    path = write_report(rows, Path(a.out) / (a.name or d.name), a.name or d.name)
    print(f"plm-sweep-report: {len(rows)} runs -> {path}")


if __name__ == "__main__":
    main()
