"""End-to-end pre-training on tiny hand-written shards (no Spark): CLI, run folder, checkpoints
loadable with weights_only=True, exact resume, every experiment config, clear config errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from unit.shards import write_prepared

import plm.config  # noqa: F401  (registers train_schema)
from plm.cli.app import conf_dir
from plm.train.run import train

pytestmark = pytest.mark.slow
torch.set_num_threads(1)
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")

EXPERIMENTS = sorted(p.stem for p in (Path(conf_dir()) / "experiment").glob("*.yaml"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("prep") / "prepared")


def make_cfg(prepared: Path, run_dir: Path, *overrides: str):
    base = [f"data.path={prepared}", f"run_dir={run_dir}", "data.max_len=16", "data.max_tokens=64",
            "trainer=cpu", "logger=csv", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
            "trainer.throughput_every_n_steps=2", "trainer.limit_val_batches=2"]
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        c = compose("train", overrides=base + list(overrides))
    return OmegaConf.to_object(c)


def losses(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    out = {}
    with open(run_dir / "csv" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get(key):
                out[int(row["step"])] = float(row[key])
    return out


def test_run_folder_and_checkpoints(prepared, tmp_path, capfd):
    cfg = make_cfg(prepared, tmp_path / "run", "trainer.max_steps=6", "trainer.checkpoint_every_n_steps=3",
                   "trainer.val_check_interval=3", "logger=wandb", "objective.masked.last_prob=0.5",
                   "objective.masked.last_jitter=true")
    out = train(cfg)
    assert os.environ["WANDB_MODE"] == "offline"  # Lightning's offline mode set it to "dryrun": undone
    run = Path(out["run_dir"])
    assert (run / "config.yaml").exists() and "max_steps: 6" in (run / "config.yaml").read_text()
    assert (run / "csv" / "metrics.csv").exists()
    assert (run / "curves.png").stat().st_size > 1000
    assert (run / "checkpoints" / "last.ckpt").exists() and (run / "checkpoints" / "step-3.ckpt").exists()
    ck = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ck["global_step"] == 6 and "state_dict" in ck
    fin = torch.load(run / "final.pt", weights_only=True)
    assert set(fin) >= {"model", "model_config", "vocab_sizes"} and fin["as_of_query"] is True
    m = losses(run)
    assert len(m) >= 5
    names = open(run / "csv" / "metrics.csv").readline()
    for k in ("train/masked/loss_merchant", "train/masked/acc_merchant", "val/ppl/masked/merchant",
              "perf/events_per_s", "perf/tokens_per_s", "perf/mfu", "data/wait_fraction"):
        assert k in names, k
    assert list((run / "wandb").glob("offline-run-*"))
    rec = json.loads((run / "run.json").read_text())
    assert rec["global_step"] == 6 and rec["data"]["path"] == str(prepared) and rec["resumed_from"] is None
    assert len(rec["data"]["tokenizer_sha256"]) == 64 and rec["outputs"]["final"] == str(run / "final.pt")
    assert rec["metrics"]["val/loss"] > 0 and rec["fit_seconds"] > 0
    printed = capfd.readouterr()
    assert "anonymous setting" not in printed.out + printed.err  # Lightning's anonymous=None, dropped


def test_logging_interval_longer_than_an_epoch_logs_by_step_without_a_warning(prepared, tmp_path):
    """A small world has fewer batches per epoch than `trainer.log_every_n_steps`: Lightning warns
    that it cannot log, yet it logs by global step across epochs. plm-train keeps the logging
    and drops the misleading warning."""
    import warnings

    cfg = make_cfg(prepared, tmp_path / "run", "data.max_tokens=512", "trainer.max_steps=25",  # 5 batches an epoch
                   "trainer.log_every_n_steps=10", "trainer.val_check_interval=0", "trainer.max_epochs=-1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg)
    assert not [w for w in caught if "logging interval" in str(w.message)]
    assert sorted(losses(tmp_path / "run")) == [9, 19, 24]  # every 10 steps, across 5 epochs, and the last


def test_checkpoints_record_the_architecture_the_weights_chose(prepared, tmp_path):
    """`objective=masked` re-weighted into next-event prediction trains a decoder: final.pt and the
    Lightning checkpoints both load as one (the .ckpt used to be read by the preset's name)."""
    from plm.export.model import load_checkpoint

    out = train(make_cfg(prepared, tmp_path / "dec", "objective=masked", "objective.masked.weight=0",
                         "objective.next.weight=1", "trainer.max_steps=2", "trainer.val_check_interval=0"))
    run = Path(out["run_dir"])
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]["arch"] == "decoder"
    assert load_checkpoint(run / "final.pt").arch == "decoder"
    assert load_checkpoint(run / "checkpoints" / "last.ckpt").arch == "decoder"


@pytest.mark.parametrize("objective", ["masked", "next", "masked_contrastive"])
def test_resume_is_exact(prepared, tmp_path, objective):
    # with dropout (the small/base/large presets' 0.1): its masks come from the global RNG, which a
    # resumed run's data loader used to draw from at another point than the uninterrupted run's
    common = [f"objective={objective}", "trainer.max_steps=8", "trainer.checkpoint_every_n_steps=3",
              "trainer.val_check_interval=0", "seed=3", "model.dropout=0.1"]
    full = train(make_cfg(prepared, tmp_path / "full", *common))
    ref = losses(Path(full["run_dir"]))
    resumed = train(make_cfg(prepared, tmp_path / "resumed", *common,
                             f"ckpt_path={tmp_path / 'full' / 'checkpoints' / 'step-3.ckpt'}"))
    got = losses(Path(resumed["run_dir"]))
    assert sorted(got) == [s for s in sorted(ref) if s >= 3]
    for s in got:
        assert got[s] == ref[s], (s, got[s], ref[s])


def test_resume_in_the_same_folder_keeps_the_history_and_a_fresh_run_is_refused(prepared, tmp_path):
    """ckpt_path=last in the run's own folder: Lightning's CSV logger deleted metrics.csv, so the
    curves and plm-sweep-report lost the steps before the resume; and a fresh run into a folder
    with checkpoints wrote last-v1.ckpt beside the old last.ckpt, which run.json then named."""
    from plm.train.callbacks import read_metrics_csv

    run = tmp_path / "run"
    train(make_cfg(prepared, run, "trainer.max_steps=4", "trainer.val_check_interval=0"))
    with pytest.raises(FileExistsError, match=r"holds an earlier run's checkpoints \(last.ckpt.*ckpt_path=last"):
        train(make_cfg(prepared, run, "trainer.max_steps=4"))
    out = train(make_cfg(prepared, run, "trainer.max_steps=7", "trainer.val_check_interval=0", "ckpt_path=last"))
    steps = [int(x) for x, _ in read_metrics_csv(run / "csv" / "metrics.csv")["train/loss"]]
    assert steps == list(range(7)), steps
    assert (run / "csv" / "metrics.part-000.csv").exists()
    rec = json.loads((run / "run.json").read_text())
    assert rec["global_step"] == 7 and rec["outputs"]["last_ckpt"] == out["last_ckpt"]
    assert torch.load(out["last_ckpt"], weights_only=True)["global_step"] == 7


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_fast_dev_run(prepared, tmp_path, experiment):
    cfg = make_cfg(prepared, tmp_path / experiment, f"experiment={experiment}", "trainer.fast_dev_run=true")
    out = train(cfg)
    assert Path(out["final"]).exists()


@pytest.mark.parametrize("trainer", ["gpu", "ddp", "fsdp", "fsdp_multinode"])
def test_gpu_configs_fail_clearly_on_cpu(prepared, tmp_path, trainer):
    if torch.cuda.is_available():
        pytest.skip(reason="a CUDA device is visible: the CPU-only failure message cannot be checked here")
    cfg = make_cfg(prepared, tmp_path / trainer, f"trainer={trainer}")
    with pytest.raises(ValueError, match="no CUDA device"):  # bad input: exit 2 from the CLI, not a crash's 1
        train(cfg)


def test_resume_from_a_missing_checkpoint_says_how(prepared, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=last resumes the run folder's checkpoints/last.ckpt, "
                                                r"and .*fresh has none: pass the earlier run's folder"):
        train(make_cfg(prepared, tmp_path / "fresh", "ckpt_path=last"))
    with pytest.raises(FileNotFoundError, match="ckpt_path=.*nope.ckpt does not exist"):
        train(make_cfg(prepared, tmp_path / "fresh", f"ckpt_path={tmp_path / 'nope.ckpt'}"))


def test_resuming_a_run_of_another_model_names_the_difference(prepared, tmp_path):
    a = train(make_cfg(prepared, tmp_path / "a", "trainer.max_steps=2", "model.n_layers=1"))
    with pytest.raises(ValueError, match=r"another model or data \(model.n_layers: 1 -> 2\)"):
        train(make_cfg(prepared, tmp_path / "b", "trainer.max_steps=4", "model.n_layers=2",
                       f"ckpt_path={a['last_ckpt']}"))
    # how attention is computed may change on resume
    b = train(make_cfg(prepared, tmp_path / "c", "trainer.max_steps=3", "model.n_layers=1",
                       "model.attention.backend=eager", f"ckpt_path={a['last_ckpt']}"))
    assert b["global_step"] == 3


def test_wandb_online_without_a_key_fails_before_training(prepared, tmp_path):
    """logger.wandb_mode=online with no API key: one line naming the fix, before any step (wandb's
    UsageError came from inside Trainer.fit). A fresh process (wandb keeps process-wide settings
    of earlier runs) with an empty HOME: no ~/.netrc key."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "HYDRA_FULL_ERROR")}
    env |= {"HOME": str(tmp_path / "home"), "WANDB_CONFIG_DIR": str(tmp_path / "home" / ".config" / "wandb")}
    exe = Path(sys.executable).parent / "plm-train"
    r = subprocess.run([str(exe), f"data.path={prepared}", f"run_dir={tmp_path / 'run'}", "data.max_len=16",
                        "data.max_tokens=64", "trainer=cpu", "trainer.max_steps=2", "logger=wandb",
                        "logger.wandb_mode=online", "trainer.enable_progress_bar=false"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    assert "plm-train: error: logger.wandb_mode=online: wandb could not start a run" in r.stderr, r.stderr[-2000:]
    assert "wandb login" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "csv" / "metrics.csv").exists()  # no step ran


def test_an_online_job_after_an_offline_one_in_one_process_is_online(prepared, tmp_path, monkeypatch):
    """A sweep in one process (hydra's basic launcher): wandb kept the first run's settings, so an
    online job after an offline one ran offline, silently. Online without a key must fail."""
    for k in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    train(make_cfg(prepared, tmp_path / "off", "logger=wandb", "logger.wandb_mode=offline", "trainer.max_steps=2"))
    assert list((tmp_path / "off" / "wandb").glob("offline-run-*"))
    with pytest.raises(ValueError, match="logger.wandb_mode=online: wandb could not start a run"):
        train(make_cfg(prepared, tmp_path / "on", "logger=wandb", "logger.wandb_mode=online", "trainer.max_steps=2"))
    assert not list((tmp_path / "on").glob("wandb/offline-run-*"))


@pytest.mark.parametrize("backend", ["flex", "xformers"])
def test_gpu_attention_backends_fail_clearly_when_training_on_cpu(prepared, tmp_path, backend):
    cfg = make_cfg(prepared, tmp_path / backend, f"model.attention.backend={backend}")
    with pytest.raises(ValueError, match=f"model.attention.backend={backend} .* use model.attention.backend=sdpa"):
        train(cfg)
    assert not (tmp_path / backend).exists()  # refused before the run folder


@pytest.mark.parametrize("trainer", ["ddp", "fsdp"])
def test_multi_device_configs_compose(prepared, tmp_path, trainer):
    cfg = make_cfg(prepared, tmp_path / trainer, f"trainer={trainer}")
    assert cfg.trainer.strategy in ("ddp", "fsdp2")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "plm-train"
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "WANDB_MODE": "offline"})


def test_cli_runs_and_bad_overrides_fail_naming_the_key(prepared, tmp_path):
    r = run_cli(f"data.path={prepared}", "model=tiny", "trainer=cpu", "trainer.max_steps=2", "logger=csv",
                "data.max_len=16", "data.max_tokens=64", "experiment=masked_tiny", "trainer.enable_progress_bar=false",
                f"hydra.run.dir={tmp_path / 'cli'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "GPU available" in r.stdout and "Tip:" not in r.stdout + r.stderr  # Lightning's lines, without its ads
    # nor its warnings that do not apply (PLMDataLoader's length is exact; its own pytree helper)
    assert "could be inaccurate" not in r.stderr and "LeafSpec" not in r.stderr, r.stderr[-2000:]
    assert (tmp_path / "cli" / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / "cli" / ".hydra" / "config.yaml").exists()
    for bad, name in [("trainer.max_stpes=3", "max_stpes"), ("trainer.max_steps=abc", "max_steps"),
                      ("objective=nope", "nope"), ("trainer.strategy=ddpp", "trainer.strategy")]:
        r = run_cli(f"data.path={prepared}", bad, f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path)
        assert r.returncode == 2, (bad, r.returncode)
        assert name in r.stdout + r.stderr, (bad, (r.stdout + r.stderr)[-2000:])


SWEEPS = sorted(p.stem for p in (Path(conf_dir()) / "sweep").glob("*.yaml"))


@pytest.mark.parametrize("sweep", SWEEPS)
def test_sweeps_compose_every_choice(prepared, tmp_path, sweep):
    """Every conf/sweep/*.yaml composes, and every value of every swept key composes into a valid
    TrainConfig (the model config validates)."""
    from dataclasses import asdict

    from plm.model import model_config_from_dict

    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        c = compose("train", overrides=[f"data.path={prepared}", f"+sweep={sweep}"], return_hydra_config=True)
        params = dict(c.hydra.sweeper.params)
        assert params
        for key, values in params.items():
            for v in str(values).split(","):
                cc = compose("train", overrides=[f"data.path={prepared}", f"{key}={v}"])
                model_config_from_dict(asdict(OmegaConf.to_object(cc).model))


def test_sweep_report(prepared, tmp_path):
    from plm.train.sweep_report import main as report

    sweep = tmp_path / "sweep"
    for i, kv in enumerate([0, 1]):
        train(make_cfg(prepared, sweep / str(i), f"model.attention.n_kv_heads={kv}", "trainer.max_steps=2",
                       "trainer.val_check_interval=1"))
        (sweep / str(i) / ".hydra").mkdir()
        (sweep / str(i) / ".hydra" / "overrides.yaml").write_text(f"- model.attention.n_kv_heads={kv}\n- seed=3\n")
    report([str(sweep), "--name", "kv", "--out", str(tmp_path / "experiments")])
    from plm.train.sweep_report import collect

    assert [r["steps"] for r in collect(sweep)] == [2, 2]  # from run.json (the CSV's last step is 1)
    (sweep / "1" / "run.json").unlink()  # a run without its record (still going, or failed)
    assert [r["steps"] for r in collect(sweep)] == [2, 2]
    # a plm-eval report in a job's folder adds its probe's headline metric per task
    (sweep / "0" / "report").mkdir()
    (sweep / "0" / "report" / "report.json").write_text(json.dumps({"tasks": {
        "churn": {"status": "ok", "primary_metric": "roc_auc",
                  "results": {"embedding_linear": {"roc_auc": {"value": 0.7162, "ci_low": 0.69, "ci_high": 0.7428}}}},
        "flat": {"status": "skipped", "primary_metric": "r2", "results": {}}}}))
    report([str(sweep), "--name", "kv", "--out", str(tmp_path / "experiments")])
    md = (tmp_path / "experiments" / "kv" / "README.md").read_text().splitlines()
    assert md[2] == "Every run: `seed=3`"  # the shared overrides once; each row shows its own
    assert md[4].endswith("| events/s | churn (roc_auc) |") and "flat" not in md[4]
    row = {ln.split(" | ")[0]: ln for ln in md[6:8]}
    assert row["| 0"].startswith("| 0 | `model.attention.n_kv_heads=0` | 2 |")
    assert row["| 0"].endswith("| 0.716 [0.690, 0.743] |") and row["| 1"].endswith("| - |")
    md = (tmp_path / "experiments" / "kv" / "README.md").read_text()
    assert "n_kv_heads=0" in md and "n_kv_heads=1" in md
    assert (tmp_path / "experiments" / "kv" / "val_loss.png").exists()
    assert "differ in their objective" not in md
    # runs of different objectives (hydra's resolved config): their losses are not comparable,
    # so rows are grouped by objective and the report says so
    for i, name in [(0, "masked"), (1, "next")]:
        (sweep / str(i) / ".hydra" / "config.yaml").write_text(f"objective:\n  name: {name}\n")
    report([str(sweep), "--name", "kv", "--out", str(tmp_path / "experiments")])
    md = (tmp_path / "experiments" / "kv" / "README.md").read_text()
    assert "The runs differ in their objective (" in md and "masked" in md and "next" in md, md
    assert "Compare objectives by the task columns." in md


def test_activation_checkpointing_gives_the_same_losses(prepared, tmp_path):
    common = ["trainer.max_steps=3", "trainer.val_check_interval=0", "trainer.limit_val_batches=0"]
    a = train(make_cfg(prepared, tmp_path / "plain", *common))
    b = train(make_cfg(prepared, tmp_path / "ac", *common, "trainer.activation_checkpointing=true"))
    la, lb = losses(Path(a["run_dir"])), losses(Path(b["run_dir"]))
    assert sorted(la) == sorted(lb) == [0, 1, 2]
    for s in la:
        assert abs(la[s] - lb[s]) <= 1e-5 * abs(la[s]), (s, la[s], lb[s])
    sd = torch.load(Path(b["final"]), weights_only=True)["model"]
    assert not any("checkpoint_wrapped" in k for k in sd)


def test_the_last_step_is_validated_and_logged(prepared, tmp_path):
    """max_steps not a multiple of val_check_interval: Lightning validated at step 3 only; the
    run also validates (and logs its train loss) at its last step, so a short run or a sweep's
    report has the final model's validation loss."""
    train(make_cfg(prepared, tmp_path / "run", "trainer.max_steps=5", "trainer.val_check_interval=3",
                   "trainer.log_every_n_steps=3"))
    val = losses(tmp_path / "run", "val/loss")
    assert len(val) == 2 and max(val) > min(val), val  # two validations: step 3 and step 5
    assert max(losses(tmp_path / "run")) == 4  # the last step's train loss (steps are 0-based in the CSV)
    # a run that ends on max_epochs (before max_steps) is validated at its end too
    train(make_cfg(prepared, tmp_path / "epochs", "trainer.max_steps=1000", "trainer.max_epochs=1",
                   "trainer.val_check_interval=500"))
    val = losses(tmp_path / "epochs", "val/loss")
    assert len(val) == 1 and max(val) == max(losses(tmp_path / "epochs")), val
