"""Collect a sweep's runs into a Markdown table and a plot.

    python -m plm.train.sweep_report runs/sweep/2026-01-01_00-00-00 [--name NAME] [--out experiments]

Reads every `<dir>/<job>/.hydra/overrides.yaml`, `<dir>/<job>/csv/metrics.csv` and
`<dir>/<job>/run.json` (the steps a run trained; a run still going, or one that failed, has none
and shows the steps of its last logged metric) and, when there, `<dir>/<job>/report/report.json`
(plm-eval of the job's exported embeddings); writes `experiments/<name>/README.md` (one row per
run: its own overrides, steps, last train/val loss, best val loss, events/s, and the linear
probe's headline metric per task) and `experiments/<name>/val_loss.png`. Also installed as the
console script `plm-sweep-report`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from plm.train.callbacks import read_metrics_csv


def probe_results(report_json: Path, probe: str) -> dict[str, tuple[str, float, float, float]]:
    """{task: (primary metric, value, CI low, CI high)} of `probe` in a plm-eval report.json
    (tasks it skipped, or that lack the probe, are left out)."""
    rep = json.loads(report_json.read_text())
    out = {}
    for name, t in (rep.get("tasks") or {}).items():
        metric = t.get("primary_metric")
        res = (t.get("results") or {}).get(probe, {}).get(metric) if t.get("status") == "ok" else None
        if isinstance(res, dict) and res.get("value") is not None:
            lo, hi = (res.get(k) for k in ("ci_low", "ci_high"))
            out[name] = (metric, float(res["value"]), float("nan") if lo is None else float(lo),
                         float("nan") if hi is None else float(hi))
    return out


def collect(sweep_dir: Path, report: str = "report/report.json", probe: str = "embedding_linear") -> list[dict]:
    """One row per job of the sweep. `report`: a plm-eval report.json, relative to each job's
    folder, whose `probe` results join the row (jobs without one get none)."""
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
        resolved = run / ".hydra" / "config.yaml"
        objective = (yaml.safe_load(resolved.read_text()) or {}).get("objective") if resolved.exists() else None
        rows.append({
            "run": run.name, "overrides": " ".join(overrides), "steps": steps,
            "objective": json.dumps(objective, sort_keys=True) if objective else "",
            "objective_name": (objective or {}).get("name", ""),
            "train_loss": last("train/loss"), "val_loss": last("val/loss"),
            "best_val_loss": min((v for _, v in s.get("val/loss", [])), default=float("nan")),
            "events_per_s": last("perf/events_per_s"), "curve": s.get("val/loss", []),
            "probe": probe_results(run / report, probe) if report and (run / report).exists() else {},
        })
    return rows


def write_report(rows: list[dict], out: Path, title: str, probe: str = "embedding_linear") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tasks: dict[str, str] = {}  # task -> metric, in first-seen order
    for r in rows:
        for task, (metric, *_rest) in r.get("probe", {}).items():
            tasks.setdefault(task, metric)
    # the overrides every run shares are said once; each row shows what sets it apart
    common = set.intersection(*(set(r["overrides"].split()) for r in rows)) if len(rows) > 1 else set()
    own = {r["run"]: " ".join(o for o in r["overrides"].split() if o not in common) for r in rows}
    head = ["run", "overrides", "steps", "train loss", "val loss", "best val loss", "events/s"]
    head += [f"{task} ({metric})" for task, metric in tasks.items()]
    lines = [f"# Sweep {title}", ""]
    if common:
        lines += ["Every run: `" + " ".join(o for o in rows[0]["overrides"].split() if o in common) + "`", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    # a loss is comparable only between runs of one objective: rows are grouped by objective (in
    # the order of each group's best run), then sorted by best validation loss
    def rank(r):
        return (r["best_val_loss"] != r["best_val_loss"], r["best_val_loss"])

    groups: dict[str, list[dict]] = {}
    for r in sorted(rows, key=rank):
        groups.setdefault(r.get("objective", ""), []).append(r)
    for r in (r for g in groups.values() for r in g):
        cells = [r["run"], f"`{own[r['run']]}`" if own[r["run"]] else "", str(r["steps"]), f"{r['train_loss']:.4f}", f"{r['val_loss']:.4f}",
                 f"{r['best_val_loss']:.4f}", f"{r['events_per_s']:.0f}"]
        for task in tasks:
            got = r.get("probe", {}).get(task)
            cells.append(f"{got[1]:.3f} [{got[2]:.3f}, {got[3]:.3f}]" if got else "-")
        lines.append("| " + " | ".join(cells) + " |")
    if len(groups) > 1:
        names = [g[0].get("objective_name") or "?" for g in groups.values()]
        lines += ["", f"The runs differ in their objective ({', '.join(names)}): a loss compares runs of one "
                  "objective only, so rows are grouped by objective, then sorted by best validation loss."
                  + (" Compare objectives by the task columns." if tasks else "")]
    if tasks:
        lines += ["", f"Task columns: `{probe}` from each run's plm-eval report (value [its bootstrap interval])."]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if len(rows) > 10:  # the default cycle repeats its 10 colours
        ax.set_prop_cycle(color=[plt.cm.tab20(i % 20) for i in range(len(rows))])
    for r in rows:
        if r["curve"]:
            xs, ys = zip(*r["curve"])
            ax.plot(xs, ys, marker=".", label=own[r["run"]] or r["run"])
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
    p.add_argument("--report", default="report/report.json",
                   help="each job's plm-eval report.json, relative to its folder; its probe results become columns")
    p.add_argument("--probe", default="embedding_linear", help="the feature set / probe of the report to show")
    a = p.parse_args(argv)
    d = Path(a.sweep_dir)
    rows = collect(d, a.report, a.probe)
    if not rows:
        raise SystemExit(f"plm-sweep-report: no runs (*/.hydra/overrides.yaml) under {d}")
    with_report = sum(bool(r["probe"]) for r in rows)
    if with_report and with_report < len(rows):
        print(f"plm-sweep-report: {len(rows) - with_report} of {len(rows)} runs have no {a.report} with {a.probe}",
              file=sys.stderr)
    path = write_report(rows, Path(a.out) / (a.name or d.name), a.name or d.name, a.probe)
    print(f"plm-sweep-report: {len(rows)} runs -> {path}")


if __name__ == "__main__":
    main()
