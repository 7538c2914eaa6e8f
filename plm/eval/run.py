"""`run_eval(cfg)`: the whole of `plm-eval` as a plain function (no hydra).

Steps: read the embeddings (one row per user) and the labels, join them by `user_id` (the
counts on each side of the join are reported, never silently dropped), compute the
hand-built aggregate baseline from the raw events before the cut-off, then per task and
feature set collect stratified k-fold out-of-fold predictions, score them with bootstrap
intervals, and write the report folder (`plm.eval.report`).

Example::

    from plm.eval.config import EvalConfig
    from plm.eval.run import run_eval
    rep = run_eval(EvalConfig(embeddings="runs/demo/pipeline/embeddings", raw="runs/demo/raw", out="runs/demo/eval"),
                   extra_sections={"next-event (decoder)": {"mcc": {"accuracy": 0.41, "top5": 0.77}}})
    rep["tasks"]["churn"]["results"]["embedding_linear"]["roc_auc"]["value"]
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shutil
import sys
import time
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_prep.storage import Location
from plm.eval import report as R
from plm.eval.config import FEATURE_SETS, EvalConfig
from plm.eval.probes import (
    BINARY,
    MAX_CLASSES,
    MULTICLASS,
    PRIMARY,
    REGRESSION,
    evaluate,
    fold_ids,
    lgbm_dataset,
    make_task,
    oof_predict,
)

BASELINE = "aggregates_lgbm"
_RESERVED = ("user_id", "embedding")


class EvalInputError(ValueError):
    """An input of plm-eval is unusable (names the file and column)."""


# ----------------------------------------------------------------------------------- inputs


def _parquet_files(path: str, what: str) -> tuple[Location, list[str]]:
    loc = Location.of(path)
    if not loc.exists():
        raise FileNotFoundError(f"{what}={path}: not found")
    files = loc.list_files(".parquet") if loc.is_dir() else [loc.path]
    if not files:
        raise FileNotFoundError(f"{what}={path}: folder holds no *.parquet file")
    return loc, files


def _read_parquet(path: str, what: str) -> tuple[pa.Table, dict]:
    """A Parquet file or folder of parts -> (table, schema metadata of the first file)."""
    loc, files = _parquet_files(path, what)
    parts, meta = [], {}
    for i, f in enumerate(files):
        try:
            with loc.fs.open_input_file(f) as fh:
                t = pq.read_table(fh)
        except (pa.ArrowInvalid, OSError) as e:
            raise EvalInputError(f"{what}={path}: {f} is not a readable Parquet file ({e})") from e
        if i == 0:
            meta = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in (t.schema.metadata or {}).items()}
        parts.append(t.replace_schema_metadata(None))
    try:
        table = pa.concat_tables(parts, promote_options="default") if len(parts) > 1 else parts[0]
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        hint = ""
        if loc.is_dir() and loc.child("manifest.json").exists():
            hint = "; this is a plm-prep output folder (manifest.json), pass plm-export's output instead"
        raise EvalInputError(f"{what}={path}: its {len(files)} Parquet files have incompatible schemas ({e}){hint}") from e
    return table, meta


def _user_ids(table: pa.Table, path: str, what: str) -> np.ndarray:
    if "user_id" not in table.column_names:
        raise EvalInputError(f"{what}={path}: no 'user_id' column (columns: {', '.join(table.column_names)})")
    col = table.column("user_id")
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_dictionary(col.type)):
        col = col.cast(pa.string())
    if col.null_count:
        raise EvalInputError(f"{what}={path}: column 'user_id' has {col.null_count} null values")
    ids = np.asarray(col.cast(pa.string()).to_pylist(), dtype=object)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1]
        raise EvalInputError(
            f"{what}={path}: {dup.size} duplicate user_id values in column 'user_id' "
            f"(e.g. {', '.join(map(str, dup[:3]))}); expected one row per user"
        )
    return ids


def _embedding_matrix(table: pa.Table, path: str) -> np.ndarray:
    if "embedding" not in table.column_names:
        raise EvalInputError(f"embeddings={path}: no 'embedding' column (columns: {', '.join(table.column_names)})")
    col = table.column("embedding").combine_chunks()
    t = col.type
    if col.null_count:
        raise EvalInputError(f"embeddings={path}: column 'embedding' has {col.null_count} null rows")
    if pa.types.is_fixed_size_list(t):
        d = t.list_size
        flat = col.flatten()
    elif pa.types.is_list(t) or pa.types.is_large_list(t):
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        if lengths.size and (lengths != lengths[0]).any():
            raise EvalInputError(
                f"embeddings={path}: column 'embedding' has rows of different lengths "
                f"({int(lengths.min())}..{int(lengths.max())}); expected a fixed dimension"
            )
        d = int(lengths[0]) if lengths.size else 0
        flat = pc.list_flatten(col)
    else:
        raise EvalInputError(f"embeddings={path}: column 'embedding' has type {t}; expected fixed_size_list<float32> or list<float32>")
    if not pa.types.is_floating(flat.type) and not pa.types.is_integer(flat.type):
        raise EvalInputError(f"embeddings={path}: column 'embedding' holds {flat.type}; expected float32")
    E = flat.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), d)
    bad = ~np.isfinite(E).all(1)
    if bad.any():
        raise EvalInputError(f"embeddings={path}: column 'embedding' has {int(bad.sum())} rows with NaN/inf values")
    return E


def _ts_to_us(value) -> int:
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, dt.datetime):
        v = value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
        return int(round(v.timestamp() * 1e6))
    s = str(value).strip()
    try:
        t = dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError as e:
        raise EvalInputError(f"{value!r} is not an ISO time (e.g. 2024-07-01T00:00:00Z)") from e
    return _ts_to_us(t)


def _iso(us: int) -> str:
    return dt.datetime.fromtimestamp(us / 1e6, tz=dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _as_of_us(table: pa.Table, path: str) -> np.ndarray | None:
    if "as_of" not in table.column_names:
        return None
    col = table.column("as_of")
    if pa.types.is_timestamp(col.type):
        col = col.cast(pa.timestamp(col.type.unit, tz="UTC") if col.type.tz is None else col.type, safe=False)
        us = col.cast(pa.timestamp("us", tz="UTC"), safe=False).cast(pa.int64())
        arr = us.to_numpy(zero_copy_only=False)
        if col.null_count:
            raise EvalInputError(f"embeddings={path}: column 'as_of' has {col.null_count} null values; pass cutoff=")
        return arr.astype(np.int64)
    vals = col.to_pylist()
    if any(v is None for v in vals):
        raise EvalInputError(f"embeddings={path}: column 'as_of' has null values; pass cutoff=")
    try:
        return np.array([_ts_to_us(v) for v in vals], dtype=np.int64)
    except EvalInputError as e:
        raise EvalInputError(f"embeddings={path}: column 'as_of': {e}") from None


def _identity(table: pa.Table, meta: dict) -> tuple[dict, list[str]]:
    """Model/checkpoint/tokenizer identity: the columns holding one value for every row, and
    the schema metadata (a JSON object value, like plm-export's `plm.embeddings`, is expanded
    to `schema.<key>.<field>`). Also returns the names of the other (per-user) columns."""
    ident: dict[str, object] = {}
    per_user: list[str] = []
    for name in table.column_names:
        if name in _RESERVED or name == "as_of":
            continue
        col = table.column(name)
        if pa.types.is_nested(col.type) or table.num_rows == 0:
            per_user.append(name)
            continue
        uniq = pc.unique(col)
        if len(uniq) == 1:
            v = uniq[0].as_py()
            ident[name] = v if isinstance(v, (str, int, float, bool)) or v is None else str(v)
        else:
            per_user.append(name)
    for k, v in sorted(meta.items()):
        if k.startswith(("ARROW:", "org.apache.spark.")) or k == "pandas":
            continue  # the writer's own schema records, not the model's identity
        try:
            obj = json.loads(v)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            for kk, vv in sorted(obj.items()):
                s = vv if isinstance(vv, str) else json.dumps(vv, sort_keys=True)
                if kk in ident and str(ident[kk]) == s:
                    continue  # already shown from the column of the same name
                ident[f"schema.{k}.{kk}"] = s if len(s) <= 300 else s[:297] + "..."
        else:
            ident[f"schema.{k}"] = v if len(v) <= 300 else v[:297] + "..."
    return ident, per_user


def _load_labels(path: str) -> tuple[pa.Table, np.ndarray]:
    loc = Location.of(path)
    if not loc.exists():
        raise FileNotFoundError(f"labels={path}: not found")
    table, _ = _read_parquet(path, "labels")
    ids = _user_ids(table, path, "labels")
    return table, ids


class Labels(NamedTuple):
    ids: np.ndarray  # user ids, one per row
    values: dict[str, np.ndarray]  # task -> float64 values, NaN for null
    names: dict[str, list[str] | None]  # task -> class names of a string column, else None
    columns: list[str]  # every label column of the file
    skipped: list[str]  # a warning per column no task could be made of
    floating: dict[str, bool]  # task -> the column is floating-point (see probes.infer_kind)


def read_labels(path: str, tasks: list[str] | None = None) -> Labels:
    """The label file `path` checked and read. `tasks` None takes every column but
    `user_id` and skips (with a warning) those no task can be made of; named `tasks` must all
    exist and be usable. Raises EvalInputError naming what is wrong (plm-pipeline calls this
    before its first stage, so a bad label file fails before hours of prep and training)."""
    lab_table, lab_ids = _load_labels(path)
    all_tasks = [c for c in lab_table.column_names if c != "user_id"]
    names = list(tasks) if tasks is not None else all_tasks
    unknown = [t for t in names if t not in all_tasks]
    if unknown:
        raise EvalInputError(f"labels={path}: no column {unknown} (label columns: {', '.join(all_tasks)})")
    label_cols: dict[str, np.ndarray] = {}
    label_names: dict[str, list[str] | None] = {}  # class names of a string label column
    skipped: list[str] = []
    for t in names:
        col = lab_table.column(t)
        if col.null_count == len(col):
            raise EvalInputError(f"labels={path}: label column '{t}' is entirely null; drop it or pass tasks= without it")
        try:
            label_cols[t], label_names[t] = _label_values(t, col)
        except LabelTypeError as e:
            if tasks is not None:
                raise EvalInputError(f"labels={path}: {e}") from None
            skipped.append(f"task `{t}` skipped: {e}")
    floating = {t: pa.types.is_floating(lab_table.column(t).type) for t in label_cols}
    return Labels(lab_ids, label_cols, label_names, all_tasks, skipped, floating)


class LabelTypeError(ValueError):
    """A label column that no task can be made of (the message says why)."""


def _label_values(name: str, col: pa.ChunkedArray) -> tuple[np.ndarray, list[str] | None]:
    """A label column -> (float64 values with NaN for null, class names or None).

    Numbers and booleans are the values themselves (`make_task` infers binary / multi-class /
    regression). Strings (or dictionary-encoded strings) are class names: the values are indices
    into the sorted distinct names, at most `MAX_CLASSES` of them. Anything else raises
    `LabelTypeError`."""
    t = col.type
    if pa.types.is_dictionary(t) and (pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)):
        col, t = col.cast(t.value_type), t.value_type
    names = None
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        names = sorted(pc.unique(col.drop_null()).to_pylist())
        if len(names) > MAX_CLASSES:
            raise LabelTypeError(f"label column '{name}' has {len(names):,} distinct strings; a class label has "
                                 f"at most {MAX_CLASSES} (numbers are evaluated as a regression)")
        col = pc.index_in(col.cast(pa.string()), value_set=pa.array(names, pa.string()))
    elif pa.types.is_boolean(t):
        col = col.cast(pa.int8())
    elif not (pa.types.is_integer(t) or pa.types.is_floating(t)):
        raise LabelTypeError(f"label column '{name}' has type {t}; expected 0/1, small integers, numbers "
                             "or class names (strings)")
    return pc.fill_null(col.cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False).astype(np.float64), names


# -------------------------------------------------------------------------------- checking


def check_config(cfg: EvalConfig) -> None:
    """Reject bad values with a message naming the key (before any work)."""
    bad = {k: v for k, v in cfg.task_types.items() if v not in (BINARY, MULTICLASS, REGRESSION)}
    if bad:
        raise ValueError(f"task_types={bad}: each must be one of {BINARY}, {MULTICLASS}, {REGRESSION}")
    if cfg.folds < 2:
        raise ValueError(f"folds={cfg.folds} must be >= 2")
    if cfg.data and not cfg.ckpt:
        raise ValueError(f"data={cfg.data} is the prepared folder of a decoder checkpoint: it needs ckpt= "
                         "(the decoder's next-event metrics); drop it otherwise")
    if cfg.bootstrap < 0:
        raise ValueError(f"bootstrap={cfg.bootstrap} must be >= 0")
    if not 0 < cfg.ci < 1:
        raise ValueError(f"ci={cfg.ci} must be in (0, 1)")
    if cfg.ece_bins < 2:
        raise ValueError(f"ece_bins={cfg.ece_bins} must be >= 2")
    unknown = [f for f in cfg.feature_sets if f not in FEATURE_SETS]
    if unknown or not cfg.feature_sets:
        raise ValueError(f"feature_sets={list(cfg.feature_sets)}: choose from {list(FEATURE_SETS)}")
    if cfg.map_method not in ("pca", "tsne"):
        raise ValueError(f"map_method={cfg.map_method!r}: pca or tsne")
    if cfg.labels is None and cfg.raw is None:
        raise ValueError("labels: give labels=PATH (or raw=DIR holding labels.parquet)")
    for key in ("cutoff", "ts_min", "ts_max"):
        v = getattr(cfg, key)
        if v is not None:
            try:
                _ts_to_us(v)
            except EvalInputError as e:
                raise ValueError(f"{key}={v!r} is not an ISO time (e.g. 2024-07-01T00:00:00Z)") from e


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out={out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"out={out} is not empty; pass overwrite=true to replace the report")
        for name in ("report.md", "report.json"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "figures", ignore_errors=True)
    (out / "figures").mkdir(parents=True, exist_ok=True)


# ------------------------------------------------------------------------------------- main


def run_eval(cfg: EvalConfig, extra_sections: dict[str, dict] | None = None) -> dict:
    """Evaluate the embeddings of `cfg.embeddings`; write the report folder `cfg.out`.

    `extra_sections`: {section name: dict} rendered after the tasks, each as a Markdown table
    (scalar values -> `key | value` rows; dict values -> one row per key with their flattened
    keys as columns) and stored under `report.json["extra_sections"]`. Returns the report
    (the content of report.json, NaN as None).
    """
    t0 = time.perf_counter()
    check_config(cfg)
    if cfg.ckpt:  # a decoder: its next-event metrics and generated futures join the report
        from plm.eval.next_event import decoder_sections

        if not cfg.data:
            raise EvalInputError("ckpt= needs data= (the prepared folder the decoder was trained on)")
        extra_sections = {**decoder_sections(cfg.ckpt, cfg.data, cfg.next_split, cfg.next_max_batches,
                                             cfg.generate_users, cfg.generate_horizon, cfg.seed),
                          **(extra_sections or {})}
    if extra_sections is not None:
        for name, data in extra_sections.items():
            if not isinstance(data, dict):
                raise TypeError(f"extra_sections[{name!r}] must be a dict, got {type(data).__name__}")
    out = Path(cfg.out)
    labels_path = cfg.labels or f"{cfg.raw.rstrip('/')}/labels.parquet"
    warnings: list[str] = []

    # ---- embeddings and labels
    emb_table, emb_meta = _read_parquet(cfg.embeddings, "embeddings")
    emb_ids = _user_ids(emb_table, cfg.embeddings, "embeddings")
    E_all = _embedding_matrix(emb_table, cfg.embeddings)
    as_of_all = _as_of_us(emb_table, cfg.embeddings)
    lab = read_labels(labels_path, cfg.tasks)
    lab_ids, label_cols, label_names, all_tasks = lab.ids, lab.values, lab.names, lab.columns
    unknown = sorted(set(cfg.task_types) - set(label_cols))
    if unknown:
        raise EvalInputError(f"task_types: {', '.join(unknown)}: not a label column evaluated here "
                             f"({', '.join(label_cols)})")
    warnings.extend(lab.skipped)
    _prepare_out(out, cfg.overwrite)

    # ---- the join (never silent)
    users = np.array(sorted(set(emb_ids) & set(lab_ids)), dtype=object)
    n_lab_only = len(set(lab_ids) - set(emb_ids))
    n_emb_only = len(set(emb_ids) - set(lab_ids))
    if n_lab_only:
        warnings.append(f"{n_lab_only:,} labelled users have no embedding (not evaluated)")
    if n_emb_only:
        warnings.append(f"{n_emb_only:,} embedded users have no labels (not evaluated)")
    if users.size == 0:
        raise EvalInputError(
            f"no user_id in common between embeddings={cfg.embeddings} ({len(emb_ids):,} users, e.g. "
            f"{', '.join(map(str, sorted(emb_ids)[:3]))}) and labels={labels_path} ({len(lab_ids):,} users, e.g. "
            f"{', '.join(map(str, sorted(lab_ids)[:3]))})"
        )
    emb_pos = {u: i for i, u in enumerate(emb_ids)}
    lab_pos = {u: i for i, u in enumerate(lab_ids)}
    ei = np.array([emb_pos[u] for u in users], dtype=np.int64)
    li = np.array([lab_pos[u] for u in users], dtype=np.int64)
    E = E_all[ei]

    # ---- cut-off
    if cfg.cutoff is not None:
        cutoff_us, cut_src = np.full(users.size, _ts_to_us(cfg.cutoff), dtype=np.int64), "config `cutoff`"
    elif as_of_all is not None:
        cutoff_us, cut_src = as_of_all[ei], "the embeddings' `as_of` column"
    elif "as_of" in emb_meta:
        cutoff_us, cut_src = np.full(users.size, _ts_to_us(emb_meta["as_of"]), dtype=np.int64), "the embeddings' schema metadata `as_of`"
    elif cfg.raw is not None and any(f in cfg.feature_sets for f in ("aggregates_lgbm", "combined_lgbm")):
        raise EvalInputError(f"embeddings={cfg.embeddings}: no 'as_of' column or metadata; pass cutoff=ISO-TIME")
    else:
        cutoff_us, cut_src = None, "not needed (no baseline)"
    cutoff_info = {"source": cut_src}
    if cutoff_us is not None:
        cutoff_info.update(min=_iso(int(cutoff_us.min())), max=_iso(int(cutoff_us.max())))

    # ---- baseline aggregates
    feature_sets = list(cfg.feature_sets)
    baseline_info = None
    A = None
    needs_agg = any(f in feature_sets for f in ("aggregates_lgbm", "combined_lgbm"))
    if needs_agg and cfg.raw is None:
        feature_sets = [f for f in feature_sets if f not in ("aggregates_lgbm", "combined_lgbm")]
        warnings.append("no raw folder given: the aggregate baseline and the combined feature set are not evaluated")
    elif needs_agg:
        from plm.eval.aggregates import compute_aggregates

        ts_max = cfg.ts_max or _iso(int((time.time() + 86400) * 1e6))
        t_agg = time.perf_counter()
        agg = compute_aggregates(cfg.raw, users, cutoff_us, cfg.ts_min, ts_max)
        A = agg.X
        no_events = int((A[:, agg.names.index("n_events")] == 0).sum())
        if no_events:
            warnings.append(f"{no_events:,} evaluated users have no valid raw event before the cut-off (aggregates empty)")
        baseline_info = {
            "raw": cfg.raw,
            "features": len(agg.names),
            "feature_names": agg.names,
            "accounting": agg.accounting,
        }
        print(f"plm-eval: {len(agg.names)} baseline aggregates for {users.size:,} users in {time.perf_counter() - t_agg:.1f}s")
    if not feature_sets:
        raise EvalInputError("no feature set left to evaluate (aggregates need raw=DIR)")

    cache: dict[str, np.ndarray] = {}

    def features(fs: str) -> np.ndarray:
        if fs.startswith("embedding"):
            return E
        if fs.startswith("aggregates"):
            return A
        if "combined" not in cache:
            cache["combined"] = np.hstack([E.astype(np.float64), A])
        return cache["combined"]

    # ---- probes
    from tqdm.auto import tqdm

    results: dict[str, dict] = {}
    curves: dict[str, tuple] = {}
    datasets: dict = {}  # feature set -> LightGBM Dataset (bins shared by tasks and folds)
    total = len(label_cols) * len(feature_sets)
    bar = tqdm(total=total, disable=not cfg.progress, file=sys.stderr, desc="plm-eval") if sys.stderr.isatty() \
        else _LineBar(total, cfg.progress)  # a log file or CI: one plain line per probe, no carriage returns
    for name, values in label_cols.items():
        task = make_task(name, values[li], label_names[name], cfg.task_types.get(name))
        if lab.floating[name] and task.kind == MULTICLASS and name not in cfg.task_types:
            warnings.append(f"task `{name}`: a floating-point column of {len(task.classes)} whole values is evaluated "
                            f"as {len(task.classes)} classes; +task_types.{name}=regression evaluates it as a number")
        entry: dict = {"type": task.kind, "status": "ok", "n_users": int(task.y.size), "n_null_skipped": task.n_null,
                       "primary_metric": PRIMARY[task.kind]}
        if task.kind != REGRESSION:
            entry["classes"] = task.classes
            counts = np.bincount(task.y, minlength=len(task.classes))
            entry["class_counts"] = {str(c): int(k) for c, k in zip(task.classes, counts)}
        else:
            entry["label_stats"] = {"mean": float(task.y.mean()) if task.y.size else None,
                                    "std": float(task.y.std()) if task.y.size else None}
        if task.n_null:
            warnings.append(f"task `{name}`: {task.n_null:,} users with embeddings have a null or non-finite label (left out of this task)")
        reason = None
        if task.y.size < 2 * cfg.folds:
            reason = f"{task.y.size} labelled users with embeddings, fewer than folds x 2 = {2 * cfg.folds}"
        elif task.kind == REGRESSION and np.unique(task.y).size < 2:
            reason = f"constant label (every value is {task.y[0]:g}): nothing to predict"
        elif task.kind != REGRESSION:
            counts = np.bincount(task.y, minlength=len(task.classes))
            if (counts > 0).sum() < 2:
                reason = f"only one class present ({entry['class_counts']})"
            elif counts[counts > 0].min() < cfg.folds:
                warnings.append(f"task `{name}`: a class has fewer users than folds ({entry['class_counts']}); some folds lack it")
        if reason is not None:
            entry.update(status="skipped", reason=reason)
            warnings.append(f"task `{name}` skipped: {reason}")
            results[name] = entry
            bar.set_postfix_str(f"{name}: skipped")
            bar.update(len(feature_sets))
            continue
        folds = fold_ids(task, cfg.folds, cfg.seed)
        preds: dict[str, np.ndarray] = {}
        for fs in feature_sets:
            bar.set_postfix_str(f"{name}/{fs}")
            model = "linear" if fs.endswith("linear") else "lgbm"
            if model == "lgbm" and fs not in datasets:
                datasets[fs] = lgbm_dataset(features(fs), cfg.lgbm)
            preds[fs] = oof_predict(task, features(fs), folds, model, cfg, dataset=datasets.get(fs))
            bar.update(1)
        boot_seed = [cfg.seed, zlib.crc32(name.encode())]
        res, deltas = evaluate(task.kind, task.y, preds, cfg.bootstrap, boot_seed, cfg.ece_bins, cfg.ci,
                               baseline=BASELINE)
        entry["results"] = res
        entry["deltas_vs_aggregates"] = deltas
        entry["figures"] = []
        results[name] = entry
        curves[name] = (task, preds)
    bar.close()

    # ---- figures
    figures: dict[str, str] = {}
    if cfg.plots:
        for name, (task, preds) in curves.items():
            if task.kind == BINARY:
                f = R.figure_name("roc", name)
                R.plot_roc(out / f, name, task.y, preds, results[name]["results"])
                results[name]["figures"].append(f)
            if task.kind in (BINARY, MULTICLASS):
                f = R.figure_name("calibration", name)
                R.plot_calibration(out / f, name, task.kind, task.y, preds, cfg.ece_bins)
                results[name]["figures"].append(f)
        idx, xy = R.embedding_map(E, cfg.map_method, cfg.map_max_points, cfg.seed)
        map_labels = {}
        for name, values in label_cols.items():
            kind = results[name]["type"]
            map_labels[name] = (kind, values[li][idx], label_names[name])
        f = "figures/embedding_map.png"
        R.plot_embedding_map(out / f, xy, map_labels, cfg.map_method)
        figures["embedding_map"] = f

    # ---- report
    identity, per_user_cols = _identity(emb_table, emb_meta)
    config = dataclasses.asdict(cfg)
    config.pop("out")
    config["feature_sets_evaluated"] = feature_sets
    rep = {
        "format_version": R.REPORT_FORMAT_VERSION,
        "embeddings": {
            "source": cfg.embeddings,
            "rows": int(len(emb_ids)),
            "dim": int(E_all.shape[1]),
            "identity": identity,
            "per_user_columns": per_user_cols,
        },
        "labels": {"source": labels_path, "rows": int(len(lab_ids)), "columns": all_tasks},
        "users": {
            "embedded": int(len(emb_ids)),
            "labelled": int(len(lab_ids)),
            "evaluated": int(users.size),
            "labelled_without_embeddings": n_lab_only,
            "embedded_without_labels": n_emb_only,
        },
        "cutoff": cutoff_info,
        "baseline": baseline_info,
        "config": config,
        "tasks": results,
        "figures": figures,
        "warnings": warnings,
    }
    md_path, _ = R.write_report(out, rep, extra_sections)
    rep = R.jsonable({**rep, **({"extra_sections": extra_sections} if extra_sections else {})})
    print(summary(rep))
    from plm.eval.next_event import decoder_line

    line = decoder_line(extra_sections or {})  # a decoder's sections (plm-eval ckpt=, or plm-pipeline's)
    if line:
        print(line)
    for w in warnings:  # also in report.md / report.json
        print(f"plm-eval: warning: {w}")
    print(f"plm-eval: report {md_path} ({time.perf_counter() - t0:.1f}s)")
    return rep


def summary(rep: dict) -> str:
    """A compact text table: task, feature set, headline metric [CI], delta vs the baseline."""
    lines = [f"{'task':<16} {'type':<10} {'n':>6}  {'feature set':<17} {'metric':<18} {'value [95% CI]':<26} Δ vs baseline"]
    for name, t in rep["tasks"].items():
        if t["status"] != "ok":
            lines.append(f"{name:<16} {t['type']:<10} {t['n_users']:>6}  skipped: {t['reason']}")
            continue
        m = t["primary_metric"]
        for fs, res in t["results"].items():
            d = t["deltas_vs_aggregates"].get(fs)
            lines.append(
                f"{name:<16} {t['type']:<10} {t['n_users']:>6}  {fs:<17} {m:<18} {R.fmt_ci(res[m]):<26} "
                + (R.fmt_delta(d) if d else ("(baseline)" if fs == BASELINE else ""))
            )
    return "\n".join(lines)


class _LineBar:
    """tqdm's `update` / `set_postfix_str` / `close` as plain lines on stderr (`plm-eval: 3/16
    churn/embedding_lgbm`), for output that is not a terminal."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.n, self.what = total, enabled, 0, ""

    def set_postfix_str(self, what: str) -> None:
        self.what = what

    def update(self, k: int) -> None:
        self.n += k
        if self.enabled:
            print(f"plm-eval: {self.n}/{self.total} probes done ({self.what})", file=sys.stderr, flush=True)
            self.what = ""

    def close(self) -> None:
        pass
