"""The report folder of `plm-eval`: `report.md`, `report.json` and `figures/*.png`.

* `report.md`: a header (embeddings source, model/checkpoint identity from the Parquet
  metadata, users on each side of the join, cut-off, baseline), one table per task (rows =
  feature set/probe, columns = metrics as `value [ci_low, ci_high]`, plus the paired
  difference of the headline metric against the aggregate baseline), warnings, and one table
  per extra section (`extra_sections`, e.g. next-event metrics of a decoder).
* `report.json`: every number of the report (NaN written as null).
* `figures/`: `roc_<task>.png` (binary tasks, every feature set on one plot),
  `calibration_<task>.png` (binary: P(1); multi-class: top-label confidence),
  `embedding_map.png` (2-D PCA or t-SNE of the embeddings, one panel per label).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from plm.eval.probes import BINARY, MULTICLASS, REGRESSION

REPORT_FORMAT_VERSION = "1.0"


# ---------------------------------------------------------------------------------- helpers


def fmt(x) -> str:
    """A number for a Markdown cell (NaN/None -> '–')."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if not math.isfinite(x):
            return "–"
        if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
            return f"{x:.3g}"
        return f"{x:.3f}" if abs(x) < 100 else f"{x:.1f}"
    s = str(x)
    return s.replace("|", "\\|").replace("\n", " ")


def fmt_ci(m: dict, one=fmt) -> str:
    """`value [ci_low, ci_high]`, each number written by `one` (the value alone without a finite CI)."""
    v = one(m.get("value"))
    lo, hi = m.get("ci_low"), m.get("ci_high")
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return v
    return f"{v} [{one(lo)}, {one(hi)}]"


def _signed(x) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:+.3f}".replace("-0.000", "+0.000")


def fmt_delta(m: dict) -> str:
    """A paired difference [CI], signed with three decimals (`+0.012 [-0.004, +0.027]`): the
    figures of one row line up and a tiny difference reads as about zero, not as `0.000486`."""
    return fmt_ci(m, _signed)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def jsonable(x):
    """Numpy scalars/arrays -> Python; NaN/inf -> None (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return [jsonable(v) for v in x.tolist()]
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    return x


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _cell(v) -> str:
    if isinstance(v, (list, tuple)):
        return fmt(json.dumps(jsonable(v)))
    return fmt(v)


def render_section(name: str, data: dict, level: int = 2) -> str:
    """An extra section as Markdown.

    Scalar entries -> one `key | value` table; entries whose value is a dict of scalars (or
    of deeper dicts, flattened to `a.b` columns) -> one row each of a second table; entries
    whose value is a dict of dicts only -> their own sub-section (`### name / key`), recursively.
    """
    if not isinstance(data, dict):
        raise TypeError(f"extra section {name!r} must be a dict, got {type(data).__name__}")
    parts = [f"{'#' * min(level, 6)} {name}"]
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    subs = {k: v for k, v in data.items() if isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values())}
    nested = {k: _flatten(v) for k, v in data.items() if isinstance(v, dict) and k not in subs}
    if scalars:
        parts.append(table(["key", "value"], [[str(k), _cell(v)] for k, v in scalars.items()]))
    if nested:
        cols: list[str] = []
        for row in nested.values():
            cols += [c for c in row if c not in cols]
        parts.append(table(["", *cols], [[str(k), *(_cell(row.get(c)) for c in cols)] for k, row in nested.items()]))
    for k, v in subs.items():
        parts.append(render_section(f"{name} / {k}", v, level + 1))
    if not data:
        parts.append("(empty)")
    return "\n\n".join(parts)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


# ---------------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_roc(path: Path, task: str, y: np.ndarray, preds: dict[str, np.ndarray], results: dict) -> None:
    from sklearn.metrics import roc_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, p in preds.items():
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, lw=1.6, label=f"{name} (AUC {fmt(results[name]['roc_auc']['value'])})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC: {task} (out-of-fold)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reliability(correct: np.ndarray, conf: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean confidence, observed frequency, count) per non-empty equal-width bin."""
    b = np.clip((conf * n_bins).astype(np.int64), 0, n_bins - 1)
    cnt = np.bincount(b, minlength=n_bins)
    keep = cnt > 0
    mc = np.bincount(b, weights=conf, minlength=n_bins)[keep] / cnt[keep]
    acc = np.bincount(b, weights=correct.astype(np.float64), minlength=n_bins)[keep] / cnt[keep]
    return mc, acc, cnt[keep]


def plot_calibration(path: Path, task: str, kind: str, y: np.ndarray, preds: dict[str, np.ndarray], n_bins: int) -> None:
    plt = _plt()
    fig, (ax, axh) = plt.subplots(2, 1, figsize=(5.5, 6.5), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    for name, p in preds.items():
        if kind == BINARY:
            correct, conf = y == 1, np.clip(p, 0, 1)
        else:
            correct, conf = p.argmax(1) == y, p.max(1)
        mc, acc, cnt = reliability(correct, conf, n_bins)
        ax.plot(mc, acc, marker="o", ms=3, lw=1.4, label=name)
        axh.hist(conf, bins=n_bins, range=(0, 1), histtype="step", lw=1.2)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    what = "P(y=1)" if kind == BINARY else "top-label confidence"
    ax.set(ylabel="observed frequency" if kind == BINARY else "accuracy", title=f"Reliability: {task} ({what})")
    ax.legend(fontsize=8, loc="upper left")
    axh.set(xlabel=f"predicted {what}", ylabel="users")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def embedding_map(E: np.ndarray, method: str, max_points: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(row indices of the seeded subsample, 2-D coordinates) of the embeddings."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(E.shape[0], size=min(max_points, E.shape[0]), replace=False))
    X = E[idx].astype(np.float64)
    X = X - X.mean(0)
    if method == "tsne" and X.shape[0] > 5:
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE

        pre = PCA(n_components=min(30, X.shape[1], X.shape[0]), random_state=seed).fit_transform(X)
        xy = TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30.0, (X.shape[0] - 1) / 3)).fit_transform(pre)
    else:
        _, _, vt = np.linalg.svd(X, full_matrices=False)
        xy = X @ vt[:2].T if vt.shape[0] >= 2 else np.c_[X @ vt[:1].T, np.zeros(X.shape[0])]
        xy = xy * np.sign(xy[np.abs(xy).argmax(0), range(2)] + 1e-30)  # fixed sign convention
    return idx, xy


def plot_embedding_map(path: Path, xy: np.ndarray, labels: dict[str, tuple[str, np.ndarray, list | None]],
                       method: str) -> None:
    """`labels`: task -> (kind, values aligned with xy rows (NaN = unlabelled), class names of a
    string label whose values index them, else None)."""
    plt = _plt()
    k = max(1, len(labels))
    cols = min(k, 3)
    rows = math.ceil(k / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.ravel()[k:]:
        ax.axis("off")
    if not labels:
        axes[0, 0].scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.5)
    for ax, (task, (kind, v, names)) in zip(axes.ravel(), labels.items()):
        ok = np.isfinite(v)
        ax.scatter(xy[~ok, 0], xy[~ok, 1], s=3, c="lightgrey", alpha=0.4)
        if kind == REGRESSION:
            sc = ax.scatter(xy[ok, 0], xy[ok, 1], s=4, c=v[ok], cmap="viridis", alpha=0.7)
            fig.colorbar(sc, ax=ax, fraction=0.046)
        else:
            classes = np.unique(v[ok])
            cmap = plt.get_cmap("tab10" if classes.size <= 10 else "tab20")
            for j, c in enumerate(classes):
                m = ok & (v == c)
                ax.scatter(xy[m, 0], xy[m, 1], s=5 if classes.size > 2 or j == 0 else 9, color=cmap(j % cmap.N),
                           alpha=0.6, label=str(names[int(c)] if names else int(c)))
            ax.legend(fontsize=7, markerscale=2, loc="best")
        ax.set_title(f"{task} ({kind})", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"Embeddings, 2-D {method.upper()} ({xy.shape[0]:,} users)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------- markdown


def _header(rep: dict) -> list[str]:
    emb, users, cut = rep["embeddings"], rep["users"], rep["cutoff"]
    out = ["# plm-eval report", ""]
    out.append(f"- **Embeddings**: `{emb['source']}` ({fmt(emb['rows'])} rows, dimension {emb['dim']})")
    ident = emb.get("identity") or {}
    if ident:
        out.append("- **Model / checkpoint / tokenizer** (Parquet columns and schema metadata):")
        out += [f"  - `{k}`: {fmt(v)}" for k, v in ident.items()]
    else:
        out.append("- **Model / checkpoint**: not recorded in the embeddings file")
    out.append(f"- **Labels**: `{rep['labels']['source']}` ({fmt(rep['labels']['rows'])} rows; tasks: "
               + ", ".join(f"`{t}`" for t in rep["tasks"]) + ")")
    out.append(
        f"- **Users**: {fmt(users['embedded'])} with embeddings, {fmt(users['labelled'])} with labels, "
        f"**{fmt(users['evaluated'])} evaluated** (both); {fmt(users['labelled_without_embeddings'])} labelled "
        f"without embeddings, {fmt(users['embedded_without_labels'])} embedded without labels"
    )
    cmin, cmax = cut.get("min"), cut.get("max")
    when = cmin if cmin == cmax else f"{cmin} .. {cmax} (per user)"
    out.append(f"- **Cut-off**: {when} (from {cut['source']}); baseline uses raw events strictly before it")
    base = rep.get("baseline")
    if base:
        acc = base["accounting"]
        used = ", ".join(f"{s} {fmt(a['used_rows'])}" for s, a in acc.items())
        out.append(f"- **Baseline**: {base['features']} hand-built aggregates from `{base['raw']}` (events used: {used})")
    else:
        out.append("- **Baseline**: none (no `raw` folder given)")
    c = rep["config"]
    out.append(
        f"- **Protocol**: {c['folds']}-fold stratified out-of-fold predictions (seed {c['seed']}), "
        f"{c['bootstrap']} bootstrap resamples of users, {int(round(c['ci'] * 100))}% percentile intervals, "
        f"ECE with {c['ece_bins']} equal-width bins"
    )
    return out


def render_markdown(rep: dict, extra_sections: dict | None) -> str:
    out = _header(rep)
    for name, t in rep["tasks"].items():
        out += ["", f"## Task `{name}` ({t['type']})", ""]
        if t["status"] != "ok":
            out.append(f"**Skipped**: {t['reason']}")
            continue
        desc = f"{fmt(t['n_users'])} users"
        if t["n_null_skipped"]:
            desc += f" ({fmt(t['n_null_skipped'])} with a null or non-finite label skipped)"
        if t["type"] != REGRESSION:
            desc += "; class counts " + ", ".join(f"{k}: {fmt(v)}" for k, v in t["class_counts"].items())
        else:
            s = t["label_stats"]
            desc += f"; label mean {fmt(s['mean'])}, std {fmt(s['std'])}"
        out += [desc, ""]
        metrics = list(next(iter(t["results"].values())).keys())
        rows = []
        for fs, res in t["results"].items():
            row = [f"`{fs}`", *(fmt_ci(res[m]) for m in metrics)]
            if t["deltas_vs_aggregates"]:
                d = t["deltas_vs_aggregates"].get(fs)
                row.append(fmt_delta(d) if d else "(baseline)")
            rows.append(row)
        header = ["feature set / probe", *metrics]
        if t["deltas_vs_aggregates"]:
            header.append(f"Δ {t['primary_metric']} vs aggregates_lgbm")
        out.append(table(header, rows))
        figs = [f for f in t.get("figures", [])]
        if figs:
            out += ["", " ".join(f"![{Path(f).stem}]({f})" for f in figs)]
    if rep.get("figures", {}).get("embedding_map"):
        out += ["", "## Embedding map", "", f"![embedding map]({rep['figures']['embedding_map']})"]
    if rep["warnings"]:
        out += ["", "## Warnings", ""] + [f"- {w}" for w in rep["warnings"]]
    for name, data in (extra_sections or {}).items():
        out += ["", render_section(name, data)]
    out += [
        "",
        "Metrics: higher is better except `ece`, `ece_top_label`, `brier`, `log_loss`, `mae`. "
        "Intervals: percentile bootstrap over users of the out-of-fold predictions; Δ: paired "
        "bootstrap (same resamples) of the headline metric minus the baseline's.",
        "",
    ]
    return "\n".join(out)


def write_report(out: Path, rep: dict, extra_sections: dict | None) -> tuple[Path, Path]:
    """Write report.md and report.json (figures are written by the caller into out/figures)."""
    rep = dict(rep)
    if extra_sections:
        rep["extra_sections"] = extra_sections
    js = jsonable(rep)
    md_path, json_path = out / "report.md", out / "report.json"
    json_path.write_text(json.dumps(js, indent=1, allow_nan=False) + "\n")
    md_path.write_text(render_markdown(js, js.get("extra_sections")))
    return md_path, json_path


def figure_name(kind: str, task: str) -> str:
    return f"figures/{kind}_{_slug(task)}.png"


__all__ = [
    "BINARY", "MULTICLASS", "REGRESSION", "REPORT_FORMAT_VERSION", "embedding_map", "fmt", "fmt_ci",
    "figure_name", "jsonable", "plot_calibration", "plot_embedding_map", "plot_roc", "render_markdown",
    "render_section", "table", "write_report",
]
