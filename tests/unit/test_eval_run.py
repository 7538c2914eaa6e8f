"""plm.eval.run.run_eval on a tiny synthetic world: join accounting, determinism, extra
sections, skipped tasks and the error messages on bad inputs."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.synth import SynthConfig, generate_world, write_world
from plm.eval.config import EvalConfig, LGBMConfig
from plm.eval.report import fmt_delta, render_section
from plm.eval.run import EvalInputError, run_eval


def fake_embeddings(labels: pa.Table, path, d=8, seed=0, drop=0, as_of="2024-03-01T00:00:00", **extra_cols):
    """Random embeddings with a noisy copy of `churn` in dimension 0 (first `drop` users left out)."""
    rng = np.random.default_rng(seed)
    labels = labels.slice(drop)
    n = labels.num_rows
    E = rng.normal(size=(n, d)).astype(np.float32)
    E[:, 0] += 2.0 * np.asarray(labels.column("churn"), dtype=np.float32)
    cols = {
        "user_id": labels.column("user_id"),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(E.ravel()), d),
        "model": pa.array(["enc-tiny"] * n),
        "as_of": pa.array(np.full(n, np.datetime64(as_of, "us"))).cast(pa.timestamp("us", tz="UTC")),
        **{k: pa.array(v) for k, v in extra_cols.items()},
    }
    t = pa.table(cols).replace_schema_metadata({"checkpoint": "step-7"})
    pq.write_table(t, path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalworld")
    cfg = SynthConfig(out=str(root / "raw"), users=120, seed=3, days=60, churn_rate=0.3, dirty_fraction=0.02)
    w = generate_world(cfg)
    write_world(w, root / "raw")
    fake_embeddings(w["labels"], root / "emb.parquet", drop=5, as_of="2024-03-01T00:00:00")
    return root, w


def cfg_for(root, out, **kw):
    kw.setdefault("lgbm", LGBMConfig(n_estimators=15, num_leaves=7, min_child_samples=5))
    kw.setdefault("bootstrap", 50)
    kw.setdefault("folds", 3)
    kw.setdefault("plots", False)
    kw.setdefault("progress", False)
    kw.setdefault("embeddings", str(root / "emb.parquet"))
    return EvalConfig(raw=str(root / "raw"), out=str(out), **kw)


def test_report_counts_join_and_identity(world, tmp_path):
    root, _ = world
    extra = {"next-event (decoder)": {"mcc": {"accuracy": 0.41, "top5": 0.77}, "dt": {"mae_log_s": 1.2}, "steps": 150}}
    rep = run_eval(cfg_for(root, tmp_path / "r", tasks=["churn", "segment"]), extra_sections=extra)
    u = rep["users"]
    assert (u["embedded"], u["labelled"], u["evaluated"]) == (115, 120, 115)
    assert u["labelled_without_embeddings"] == 5 and u["embedded_without_labels"] == 0
    assert any("5 labelled users have no embedding" in w for w in rep["warnings"])
    assert rep["embeddings"]["identity"] == {"model": "enc-tiny", "schema.checkpoint": "step-7"}
    assert rep["cutoff"]["min"] == "2024-03-01T00:00:00Z"
    assert list(rep["tasks"]) == ["churn", "segment"]
    churn = rep["tasks"]["churn"]
    assert set(churn["results"]) == {"embedding_linear", "embedding_lgbm", "aggregates_lgbm", "combined_lgbm"}
    assert churn["results"]["embedding_linear"]["roc_auc"]["value"] > 0.75  # the planted copy
    assert set(churn["deltas_vs_aggregates"]) == {"embedding_linear", "embedding_lgbm", "combined_lgbm"}
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## next-event (decoder)" in md
    assert "| mcc | 0.410 | 0.770 | – |" in md and "| steps | 150 |" in md
    js = json.loads((tmp_path / "r" / "report.json").read_text())
    assert js["extra_sections"] == extra
    assert js["baseline"]["accounting"]["payments"]["duplicate_rows"] > 0


def test_same_inputs_identical_report_json(world, tmp_path):
    root, _ = world
    a = run_eval(cfg_for(root, tmp_path / "a", tasks=["churn", "future_spend"]))
    b = run_eval(cfg_for(root, tmp_path / "b", tasks=["churn", "future_spend"]))
    assert (tmp_path / "a" / "report.json").read_bytes() == (tmp_path / "b" / "report.json").read_bytes()
    c = run_eval(cfg_for(root, tmp_path / "c", tasks=["churn", "future_spend"], seed=1))
    assert a == b and c["tasks"] != a["tasks"]


def test_task_with_too_few_users_is_skipped_with_a_warning(tmp_path, world, capsys):
    root, w = world
    lab = w["labels"]
    sparse = np.full(lab.num_rows, np.nan)
    sparse[10:14] = [0, 1, 0, 1]
    labels = lab.select(["user_id", "churn"]).append_column("rare", pa.array(sparse))
    labels = labels.append_column("mono", pa.array(np.ones(lab.num_rows, np.int64)))
    labels = labels.append_column("flat", pa.array(np.full(lab.num_rows, 2.5)))
    pq.write_table(labels, tmp_path / "labels.parquet")
    rep = run_eval(cfg_for(root, tmp_path / "r", labels=str(tmp_path / "labels.parquet"), feature_sets=["embedding_linear"],
                           progress=True))
    captured = capsys.readouterr()
    printed = captured.out
    # progress to a non-terminal: one plain line per probe (skipped tasks too), no carriage returns
    assert "\r" not in captured.err
    lines = [ln for ln in captured.err.splitlines() if ln.startswith("plm-eval: ")]
    assert lines == ["plm-eval: 1/4 probes done (churn/embedding_linear)", "plm-eval: 2/4 probes done (rare: skipped)",
                     "plm-eval: 3/4 probes done (mono: skipped)", "plm-eval: 4/4 probes done (flat: skipped)"]
    assert rep["tasks"]["flat"]["status"] == "skipped" and "constant label (every value is 2.5)" in rep["tasks"]["flat"]["reason"]
    assert "plm-eval: warning: task `rare` skipped" in printed  # warnings reach the console too
    rare = rep["tasks"]["rare"]
    assert rare["status"] == "skipped" and "fewer than folds x 2" in rare["reason"]
    assert rare["n_null_skipped"] == 111  # 115 evaluated users, 4 labelled
    assert "plm-eval: warning: task `rare`: 111 users with embeddings have a null or non-finite label" in printed
    assert "task `churn`: " not in printed  # no nulls, no warning
    assert rep["tasks"]["mono"]["status"] == "skipped" and "only one class" in rep["tasks"]["mono"]["reason"]
    assert rep["tasks"]["churn"]["status"] == "ok"
    assert any("`rare` skipped" in x for x in rep["warnings"])
    assert "**Skipped**" in (tmp_path / "r" / "report.md").read_text()


def test_string_labels_are_classes(tmp_path, world):
    """A string label column is a classification over its distinct names: the same task as the
    integer column it names (same classes in the same order, same folds, same figures); two
    names are binary with the later one positive; more than MAX_CLASSES names are skipped (an
    error when asked for by name); dictionary-encoded strings work too."""
    root, w = world
    lab = w["labels"]
    seg = np.asarray(lab.column("segment"))
    churn = np.asarray(lab.column("churn"))
    seg_name = pa.array([None if i % 17 == 0 else f"s{v}" for i, v in enumerate(seg)], pa.string())
    seg_num = pa.array([None if i % 17 == 0 else float(v) for i, v in enumerate(seg)], pa.float64())
    labels = pa.table({
        "user_id": lab.column("user_id"), "segment": seg_num, "seg_name": seg_name,
        "churn": lab.column("churn"), "churned": pa.array(["yes" if c else "no" for c in churn]).dictionary_encode(),
        "account_ref": pa.array([f"acct-{i:04d}" for i in range(lab.num_rows)]),
    })
    pq.write_table(labels, tmp_path / "labels.parquet")
    rep = run_eval(cfg_for(root, tmp_path / "r", labels=str(tmp_path / "labels.parquet"), plots=True,
                           feature_sets=["embedding_linear", "aggregates_lgbm"]))
    t = rep["tasks"]
    assert t["seg_name"]["type"] == "multiclass" and t["seg_name"]["classes"] == [f"s{v}" for v in sorted(set(seg))]
    assert t["seg_name"]["n_null_skipped"] == t["segment"]["n_null_skipped"] > 0
    assert list(t["seg_name"]["class_counts"].values()) == list(t["segment"]["class_counts"].values())
    def values(task):  # point estimates (the bootstrap's draws differ by task)
        return {fs: {m: r[m]["value"] for m in r if isinstance(r[m], dict) and "value" in r[m]}
                for fs, r in t[task]["results"].items()}

    assert values("seg_name") == values("segment")
    # a float column of whole values (pandas' integers with nulls) is classes, said in a warning
    assert any(w.startswith("task `segment`: a floating-point column of 5 whole values is evaluated as 5 classes")
               for w in rep["warnings"]), rep["warnings"]
    assert t["churned"]["type"] == "binary" and t["churned"]["classes"] == ["no", "yes"]
    assert values("churned") == values("churn")  # "yes" is the positive class, like churn=1
    assert t["churned"]["results"]["embedding_linear"]["roc_auc"]["value"] > 0.75
    assert "account_ref" not in t
    assert any("`account_ref` skipped: label column 'account_ref' has 120 distinct strings" in x for x in rep["warnings"])
    assert (tmp_path / "r" / "figures" / "embedding_map.png").stat().st_size > 0
    with pytest.raises(EvalInputError, match="'account_ref' has 120 distinct strings; a class label has at most 50"):
        run_eval(cfg_for(root, tmp_path / "o", labels=str(tmp_path / "labels.parquet"), tasks=["account_ref"]))
    pq.write_table(pa.table({"user_id": lab.column("user_id"), "when": pa.array([b"x"] * lab.num_rows, pa.binary())}),
                   tmp_path / "bin.parquet")
    with pytest.raises(EvalInputError, match="'when' has type binary; expected 0/1, small integers, numbers or class names"):
        run_eval(cfg_for(root, tmp_path / "o", labels=str(tmp_path / "bin.parquet"), tasks=["when"]))


def test_extra_section_rendering():
    md = render_section("dec", {"loss": 1.5, "name": "gpt", "fields": {"mcc": {"acc": 0.5, "top": {"k5": 0.9}}, "amount": {"acc": 0.25}}})
    assert "| loss | 1.500 |" in md and "| name | gpt |" in md
    assert "### dec / fields" in md and "|  | acc | top.k5 |" in md
    assert "| mcc | 0.500 | 0.900 |" in md and "| amount | 0.250 | – |" in md


def test_deltas_are_signed_with_three_decimals():
    assert fmt_delta({"value": 0.000486, "ci_low": -0.0021, "ci_high": 0.0031}) == "+0.000 [-0.002, +0.003]"
    assert fmt_delta({"value": -0.174, "ci_low": -0.21, "ci_high": -0.1419}) == "-0.174 [-0.210, -0.142]"
    assert fmt_delta({"value": -0.0002, "ci_low": float("nan"), "ci_high": 0.1}) == "+0.000"
    assert fmt_delta({"value": None}) == "–"


def _labels(tmp_path, **cols):
    path = tmp_path / "lab.parquet"
    pq.write_table(pa.table(cols), path)
    return str(path)


def test_errors_name_the_file_and_column(world, tmp_path):
    root, w = world
    lab = w["labels"]
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        run_eval(EvalConfig(embeddings=str(tmp_path / "nope.parquet"), raw=str(root / "raw"), out=str(tmp_path / "o")))
    with pytest.raises(FileNotFoundError, match="labels=.*missing.parquet"):
        run_eval(cfg_for(root, tmp_path / "o", labels=str(tmp_path / "missing.parquet")))
    # the decoder keys act through the Python API too (they used to be read by the CLI only)
    with pytest.raises(ValueError, match="data=.* needs ckpt="):
        run_eval(cfg_for(root, tmp_path / "o", data=str(tmp_path)))
    with pytest.raises(EvalInputError, match="ckpt= needs data="):
        run_eval(cfg_for(root, tmp_path / "o", ckpt=str(tmp_path / "final.pt")))
    with pytest.raises(FileNotFoundError, match="final.pt"):
        run_eval(cfg_for(root, tmp_path / "o", ckpt=str(tmp_path / "final.pt"), data=str(tmp_path)))

    no_uid = tmp_path / "no_uid.parquet"
    pq.write_table(pa.table({"uid": ["a"], "embedding": [[1.0, 2.0]]}), no_uid)
    with pytest.raises(EvalInputError, match=r"no_uid.parquet: no 'user_id' column"):
        run_eval(cfg_for(root, tmp_path / "o", embeddings=str(no_uid)))

    no_emb = tmp_path / "no_emb.parquet"
    pq.write_table(pa.table({"user_id": ["a"], "vec": [[1.0, 2.0]]}), no_emb)
    with pytest.raises(EvalInputError, match=r"no_emb.parquet: no 'embedding' column"):
        run_eval(cfg_for(root, tmp_path / "o", embeddings=str(no_emb)))

    dup = tmp_path / "dup.parquet"
    pq.write_table(pa.table({"user_id": ["a", "b", "a"], "embedding": [[1.0], [2.0], [3.0]]}), dup)
    with pytest.raises(EvalInputError, match=r"dup.parquet: 1 duplicate user_id .*e.g. a"):
        run_eval(cfg_for(root, tmp_path / "o", embeddings=str(dup)))

    # labels keyed by numbers while the embeddings' ids are strings: the error shows both kinds
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"user_id": ["u1", "u2"], "embedding": [[1.0], [2.0]]}), other)
    numeric = _labels(tmp_path, user_id=pa.array([1, 2]), churn=pa.array([0, 1]))
    with pytest.raises(EvalInputError, match=r"no user_id in common .*e.g. u1, u2\) and labels=.*e.g. 1, 2\)"):
        run_eval(cfg_for(root, tmp_path / "o", embeddings=str(other), labels=numeric))

    ragged = tmp_path / "ragged.parquet"
    pq.write_table(pa.table({"user_id": ["a", "b"], "embedding": [[1.0, 2.0], [3.0]]}), ragged)
    with pytest.raises(EvalInputError, match="different lengths"):
        run_eval(cfg_for(root, tmp_path / "o", embeddings=str(ragged)))

    null_col = _labels(tmp_path, user_id=lab.column("user_id"), churn=lab.column("churn"),
                       empty=pa.nulls(lab.num_rows, pa.float64()))
    with pytest.raises(EvalInputError, match=r"lab.parquet: label column 'empty' is entirely null"):
        run_eval(cfg_for(root, tmp_path / "o", labels=null_col))
    with pytest.raises(EvalInputError, match=r"no column \['nope'\]"):
        run_eval(cfg_for(root, tmp_path / "o", tasks=["nope"]))
    with pytest.raises(ValueError, match="folds=1"):
        run_eval(cfg_for(root, tmp_path / "o", folds=1))

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite=true"):
        run_eval(cfg_for(root, tmp_path / "busy"))

    # a plm-prep folder passed as embeddings (an easy slip): one message naming it, no traceback
    prepared = tmp_path / "prepared"
    (prepared / "train").mkdir(parents=True)
    (prepared / "manifest.json").write_text("{}")
    pq.write_table(pa.table({"user_id": ["a"], "ts": pa.array([[1, 2]])}), prepared / "train" / "part-0.parquet")
    pq.write_table(pa.table({"user_id": ["b"], "ts": pa.array([1], pa.timestamp("us", tz="UTC"))}), prepared / "q.parquet")
    with pytest.raises(EvalInputError, match="incompatible schemas.*plm-prep output folder"):
        run_eval(cfg_for(root, tmp_path / "o", embeddings=str(prepared)))
    (tmp_path / "empty.parquet").write_bytes(b"")
    with pytest.raises(EvalInputError, match="empty.parquet is not a readable Parquet file"):
        run_eval(cfg_for(root, tmp_path / "o", embeddings=str(tmp_path / "empty.parquet")))


def test_identity_from_columns_and_json_schema_metadata():
    from plm.eval.run import _identity

    t = pa.table({"user_id": ["a", "b"], "embedding": [[1.0], [2.0]], "n_events": [3, 5], "model": ["enc", "enc"]})
    meta = {"plm.embeddings": json.dumps({"model": "enc", "checkpoint": "final.pt", "dim": 64}), "note": "x",
            # Spark's writer's own records (plm-export raw=): not the model's identity
            "org.apache.spark.version": "4.3.0",
            "org.apache.spark.sql.parquet.row.metadata": json.dumps({"type": "struct", "fields": []})}
    ident, per_user = _identity(t, meta)
    assert ident == {"model": "enc", "schema.plm.embeddings.checkpoint": "final.pt",
                     "schema.plm.embeddings.dim": "64", "schema.note": "x"}
    assert per_user == ["n_events"]


def test_task_types_set_a_tasks_type(tmp_path, world):
    """task_types={segment: regression} evaluates a label of whole numbers as a number; a name that
    is not a label column, or a type that is not one, is refused before any work."""
    root, _ = world
    rep = run_eval(cfg_for(root, tmp_path / "r", tasks=["segment"], task_types={"segment": "regression"},
                           feature_sets=["embedding_linear"]))
    assert rep["tasks"]["segment"]["type"] == "regression" and rep["tasks"]["segment"]["primary_metric"] == "r2"
    with pytest.raises(ValueError, match="task_types: spend: not a label column evaluated here"):
        run_eval(cfg_for(root, tmp_path / "r2", tasks=["segment"], task_types={"spend": "regression"}))
    with pytest.raises(ValueError, match=r"task_types=\{'segment': 'numbers'\}: each must be one of"):
        run_eval(cfg_for(root, tmp_path / "r3", task_types={"segment": "numbers"}))
