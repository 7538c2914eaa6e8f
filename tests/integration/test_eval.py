"""plm-eval end to end: a 300-user synthetic world (data_prep.synth), fake embeddings (random
plus a noisy copy of `churn`), run_eval, and the report folder as a user reads it; then the
hydra CLI (`python -m plm.cli.eval`) on the same inputs, including a bad input."""

import json
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.synth import SynthConfig, generate_world, write_world
from plm.eval.config import EvalConfig, LGBMConfig
from plm.eval.run import run_eval

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_e2e")
    world = generate_world(SynthConfig(out=str(root / "raw"), users=300, seed=5, dirty_fraction=0.01))
    write_world(world, root / "raw")
    labels = world["labels"]
    n = labels.num_rows
    rng = np.random.default_rng(0)
    E = rng.normal(size=(n, 16)).astype(np.float32)
    E[:, 0] += 2.0 * np.asarray(labels.column("churn"), dtype=np.float32)  # a noisy copy of churn
    cutoff = np.datetime64(world["meta"]["cutoff"].replace("Z", "").replace("+00:00", ""), "us")
    emb = pa.table(
        {
            "user_id": labels.column("user_id"),
            "embedding": pa.array(list(E), pa.list_(pa.float32())),  # list<float32> variant
            "model": pa.array(["plm-encoder-tiny"] * n),
            "checkpoint": pa.array(["final.pt@150"] * n),
            "as_of": pa.array(np.full(n, cutoff)).cast(pa.timestamp("us", tz="UTC")),
        }
    ).replace_schema_metadata({"tokenizer": "sha256:abc"})
    (root / "emb").mkdir()
    pq.write_table(emb.slice(0, 150), root / "emb" / "part-00000.parquet")  # a folder of parts
    pq.write_table(emb.slice(150), root / "emb" / "part-00001.parquet")
    return root


def test_report_folder(inputs, tmp_path):
    out = tmp_path / "report"
    cfg = EvalConfig(embeddings=str(inputs / "emb"), raw=str(inputs / "raw"), out=str(out), bootstrap=100,
                     lgbm=LGBMConfig(n_estimators=40), progress=False)
    rep = run_eval(cfg, extra_sections={"next-event": {"mcc": {"accuracy": 0.4}}})
    md = (out / "report.md").read_text()
    js = json.loads((out / "report.json").read_text())
    assert js == rep
    assert set(js) >= {"embeddings", "labels", "users", "cutoff", "baseline", "config", "tasks", "figures", "warnings",
                       "extra_sections"}
    assert js["embeddings"]["identity"]["model"] == "plm-encoder-tiny"
    assert js["embeddings"]["identity"]["schema.tokenizer"] == "sha256:abc"
    assert js["users"]["evaluated"] == 300 and js["embeddings"]["dim"] == 16
    assert {t: v["type"] for t, v in js["tasks"].items()} == {
        "segment": "multiclass", "churn": "binary", "ato": "binary", "future_spend": "regression"}
    churn = js["tasks"]["churn"]["results"]
    assert churn["embedding_linear"]["roc_auc"]["value"] > 0.8
    for fs in churn.values():
        for m in ("roc_auc", "pr_auc", "accuracy", "ece", "brier"):
            assert fs[m]["ci_low"] <= fs[m]["ci_high"]
    seg = js["tasks"]["segment"]["results"]["aggregates_lgbm"]
    assert set(seg) == {"accuracy", "roc_auc_macro_ovr", "log_loss", "ece_top_label"}
    assert seg["roc_auc_macro_ovr"]["value"] > 0.7  # the baseline sees the persona's category mix
    assert set(js["tasks"]["future_spend"]["results"]["combined_lgbm"]) == {"r2", "mae", "spearman"}
    assert js["baseline"]["features"] > 150
    # markdown: a header with identity and counts, one table per task, the extra section
    assert "plm-encoder-tiny" in md and "**300 evaluated**" in md
    for task in ("segment", "churn", "ato", "future_spend"):
        assert f"## Task `{task}`" in md
    assert md.count("| `combined_lgbm` |") == 4
    assert "## next-event" in md and "| mcc | 0.400 |" in md
    # figures exist, are PNGs and are not blank
    figs = sorted(p.name for p in (out / "figures").iterdir())
    assert figs == ["calibration_ato.png", "calibration_churn.png", "calibration_segment.png", "embedding_map.png",
                    "roc_ato.png", "roc_churn.png"]
    for name in figs:
        data = (out / "figures" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 15_000, name
        assert f"figures/{name}" in md


def _cli(monkeypatch, *args) -> int:
    """Run `plm-eval ARGS` in this process (hydra composes conf/eval.yaml); returns the exit code."""
    from plm.cli.eval import main

    monkeypatch.setattr(sys, "argv", ["plm-eval", *args])
    try:
        main()
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def test_cli(inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    base = [f"embeddings={inputs / 'emb'}", f"raw={inputs / 'raw'}", "bootstrap=50", "lgbm.n_estimators=10",
            "progress=false", "plots=false", "folds=3"]
    assert _cli(monkeypatch, *base, f"out={tmp_path / 'cli'}", "tasks=[churn]") == 0
    out = capsys.readouterr().out
    assert "churn" in out and "plm-eval: report" in out
    assert json.loads((tmp_path / "cli" / "report.json").read_text())["config"]["tasks"] == ["churn"]
    assert not (tmp_path / "outputs").exists() and not (tmp_path / ".hydra").exists()  # no hydra run dir
    assert _cli(monkeypatch, *base, f"out={tmp_path / 'bad'}", "tasks=[nope]") == 2
    err = capsys.readouterr().err
    assert "plm-eval: error" in err and "'nope'" in err
    assert _cli(monkeypatch, *base, f"out={tmp_path / 'typo'}", "fodls=3") == 1  # hydra names an unknown key
    assert "Key 'fodls' not in 'EvalConfig'" in capsys.readouterr().err
