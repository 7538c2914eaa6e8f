"""`plm.cli.app.cli_errors`: the one place every console script turns bad input into one line."""

import os
import re

import pytest
from conftest import cli

from plm.cli.app import cli_errors
from plm.data.schema import ContractError


@pytest.mark.parametrize("exc", [ValueError("stride=0 must be >= 1"), ContractError("stride=0 must be >= 1"),
                                 FileNotFoundError("stride=0 must be >= 1")])
def test_bad_input_is_one_line_and_exit_2(monkeypatch, capsys, exc):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as e, cli_errors("plm-x"):
        raise exc
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("plm-x: error: stride=0 must be >= 1") and "HYDRA_FULL_ERROR=1" in err


def test_full_error_and_other_exceptions_pass_through(monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ValueError, match="kept"), cli_errors("plm-x"):
        raise ValueError("kept")
    monkeypatch.delenv("HYDRA_FULL_ERROR")
    with pytest.raises(RuntimeError), cli_errors("plm-x"):  # a bug is not bad input: full trace
        raise RuntimeError("bug")


def test_hydra_override_errors_exit_2_and_crashes_exit_1(monkeypatch, tmp_path, capsys):
    """An override hydra cannot apply is bad input (exit 2, like ours); an error raised while the
    tool runs that is not bad input is a crash (hydra's exit 1)."""
    import sys

    from plm.cli.app import hydra_app

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    seen = []

    @hydra_app("synth")
    def tool(cfg):
        seen.append(cfg.users)
        raise RuntimeError("a bug")

    run = [f"hydra.run.dir={tmp_path}", "hydra.output_subdir=null"]
    for bad in ("users=abc", "userz=3", "+nope=1"):
        monkeypatch.setattr(sys, "argv", ["plm-synth", *run, "out=o", bad])
        with pytest.raises(SystemExit) as e:
            tool()
        assert e.value.code == 2, bad
    assert seen == []
    # `+key=value` (what hydra's error for a misspelt key suggests) used to be accepted and ignored
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("plm-synth: error: nope: not a key of plm-synth's config (a `+key=value` override adds a key "
                   "no tool reads; `plm-synth --help` shows the config)")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # the stack trace instead of the line; still refused
    monkeypatch.setattr(sys, "argv", ["plm-synth", *run, "out=o", "+nope=1"])
    with pytest.raises(ValueError, match="nope: not a key of plm-synth's config"):
        tool()
    monkeypatch.delenv("HYDRA_FULL_ERROR")
    assert seen == []
    monkeypatch.setattr(sys, "argv", ["plm-synth", *run, "out=o", "users=7"])
    with pytest.raises(SystemExit) as e:
        tool()
    assert e.value.code == 1 and seen == [7]


def test_unquoted_brackets_are_named_with_the_quoting_to_use(monkeypatch, capsys):
    """`spark.master=local[2]` made hydra fail with "mismatched input '['", naming no override."""
    import sys

    from plm.cli.app import hydra_app, unquoted_brackets

    assert unquoted_brackets(["raw=x", "spark.master=local[2]", "a=b[1]"]) == "spark.master=local[2]"
    for fine in ("spark.master='local[2]'", "train_overrides=['trainer.max_steps=5']", "x=[1,2]", "+sweep=positions",
                 "spark.conf={a: '[1]'}", "model.d_model=choice(64,128)", "--help", "out=s3a://b/p"):
        assert unquoted_brackets([fine]) is None, fine
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    @hydra_app("prep")
    def tool(cfg):
        raise AssertionError("not reached")

    monkeypatch.setattr(sys, "argv", ["plm-prep", "raw=x", "out=y", "spark.master=local[2]"])
    with pytest.raises(SystemExit) as e:
        tool()
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == ("plm-prep: error: spark.master=local[2]: hydra reads brackets in a "
                                               "value as a list; quote the value: \"spark.master='local[2]'\"")


def test_keys_added_with_plus_are_named_not_ignored():
    """`+key=value` on a typed config: every key the schema lacks is named, at any depth; dict
    fields (spark.conf) take any key. plm-pipeline's train_overrides go through the same check."""
    from hydra import compose, initialize_config_dir

    from plm.cli.app import conf_dir, unknown_keys
    from plm.pipeline import compose_train

    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        assert unknown_keys(compose("pipeline", overrides=["raw=r", "out=o"])) == []
        cfg = compose("pipeline", overrides=["raw=r", "out=o", "+prep.spark.conf={spark.x: '1'}", "+prep.vocab.mincount=2",
                                             "+eval.fold=3", "+colour=1"])
        assert cfg.prep.spark.conf["spark.x"] == "1"
        assert sorted(unknown_keys(cfg)) == ["colour", "eval.fold", "prep.vocab.mincount"]
    with pytest.raises(ValueError, match=r"trainer\.max_step: not a key of plm-train's config"):
        compose_train("prepared", "train", "cpu-small", ["+trainer.max_step=5"])


def test_export_refuses_training_keys_of_the_trainer_group():
    from plm.export.config import check_trainer_overrides

    check_trainer_overrides(["ckpt=x", "trainer=ddp", "trainer.compile=true", "trainer.num_threads=2",
                             "+trainer.precision=32-true"])
    with pytest.raises(ValueError, match=r"^trainer.max_steps, trainer.logger.x: plm-export reads only"):
        check_trainer_overrides(["trainer.max_steps=5", "trainer.compile=true", "+trainer.logger.x=1"])


def test_missing_required_keys_are_named_in_one_line():
    """A required key left unset (`???` in conf/) ends the tool in one line naming every such key."""
    r = cli("export", "pooling=mean", env={k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "plm-export: error: ckpt=... data=... out=... are required (`plm-export --help` shows the config)")
    assert "Traceback" not in r.stderr


def test_misspelt_training_preset_fails_before_any_stage(tmp_path):
    """`experiment=` / plm-pipeline's `preset=` with an unknown name fails at composition (it used
    to be skipped silently: `optional experiment`), and plm-pipeline checks it before prep."""
    from plm.pipeline import PipelineConfig, compose_train, run_pipeline

    with pytest.raises(ValueError, match=r"preset=cpu_small .*Could not find 'experiment/cpu_small'"):
        compose_train("prepared", "train", "cpu_small", [])
    assert compose_train("prepared", "train", "cpu-small", []).trainer.max_steps == 500
    (tmp_path / "raw").mkdir()
    with pytest.raises(ValueError, match="cpu_small"):
        run_pipeline(PipelineConfig(raw=str(tmp_path / "raw"), out=str(tmp_path / "out"), preset="cpu_small"))
    assert not (tmp_path / "out").exists()
    # an earlier run's folder is not emptied by overwrite=true before the preset is checked
    (tmp_path / "out" / "train").mkdir(parents=True)
    (tmp_path / "out" / "pipeline.json").write_text("{}")
    with pytest.raises(ValueError, match="cpu_small"):
        run_pipeline(PipelineConfig(raw=str(tmp_path / "raw"), out=str(tmp_path / "out"), preset="cpu_small",
                                    overwrite=True))
    assert (tmp_path / "out" / "pipeline.json").exists()
    # likewise prep's own settings (here: fitting settings beside an existing tokenizer)
    from plm.config import PrepConfig, VocabConfig

    with pytest.raises(ValueError, match="vocab.min_count set with tokenizer="):
        run_pipeline(PipelineConfig(raw=str(tmp_path / "raw"), out=str(tmp_path / "out"), overwrite=True,
                                    prep=PrepConfig(tokenizer="elsewhere.json", vocab=VocabConfig(min_count=2))))
    assert (tmp_path / "out" / "pipeline.json").exists()


def test_pipeline_overwrite_replaces_only_its_own_outputs(tmp_path):
    from plm.pipeline import PipelineConfig, run_pipeline

    (tmp_path / "raw").mkdir()
    for stages in ([], ["train", "prep"], ["eval", "eval"]):
        with pytest.raises(ValueError, match="once each, in that order"):
            run_pipeline(PipelineConfig(raw=str(tmp_path / "raw"), out=str(tmp_path / "o"), stages=stages))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("x")
    with pytest.raises(FileExistsError, match=r"holds other data \(thesis.tex\)"):
        run_pipeline(PipelineConfig(raw=str(tmp_path / "raw"), out=str(tmp_path / "out"), overwrite=True))
    assert (tmp_path / "out" / "thesis.tex").read_text() == "x"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        run_pipeline(PipelineConfig(raw=str(tmp_path / "raw"), out=str(tmp_path / "afile"), overwrite=True))


def test_pipeline_stages_must_be_consecutive_and_start_after_an_existing_output(tmp_path):
    """stages=[prep,export,eval] ran prep (a Spark job) and then failed for want of a checkpoint;
    [train,eval] would evaluate an earlier model's embeddings. Both are refused before any stage,
    and a rerun that starts after prep needs OUT's prepared data."""
    from plm.pipeline import PipelineConfig, run_pipeline

    (tmp_path / "raw").mkdir()
    for stages, skipped in ((["prep", "export", "eval"], "['train']"), (["train", "eval"], "['export']")):
        with pytest.raises(ValueError, match=re.escape(f"skips {skipped}: each stage reads the output of the one before")):
            run_pipeline(PipelineConfig(raw=str(tmp_path / "raw"), out=str(tmp_path / "out"), stages=stages))
    for stages, before, need in ((["train", "export"], "prep", "prepared/manifest.json"),
                                 (["export"], "train", "train/final.pt"), (["eval"], "export", "embeddings/_export.json")):
        with pytest.raises(FileNotFoundError, match=re.escape(f"starts after {before}, but {tmp_path / 'out' / need} does not exist")):
            run_pipeline(PipelineConfig(raw=str(tmp_path / "raw"), out=str(tmp_path / "out"), stages=stages))
    assert not (tmp_path / "out").exists()


def test_pipeline_names_an_empty_val_split_in_its_own_terms(tmp_path):
    """A small world whose users all hash into train: the pipeline says to pass
    trainer.limit_val_batches=0 through train_overrides (plm-train's own message names plm-train's
    key), before training starts."""
    import json

    from plm.pipeline import PipelineConfig, run_pipeline

    (tmp_path / "raw").mkdir()
    (tmp_path / "out" / "prepared").mkdir(parents=True)
    splits = {"train": {"users": 5, "windows": 5}, "val": {"users": 0, "windows": 0}, "test": {"users": 0, "windows": 0}}
    (tmp_path / "out" / "prepared" / "manifest.json").write_text(json.dumps({"splits": splits}))
    with pytest.raises(ValueError, match=re.escape("none of the 5 users in the val split: train without validation with "
                                                   "\"train_overrides=['trainer.limit_val_batches=0']\"")):
        run_pipeline(PipelineConfig(raw=str(tmp_path / "raw"), out=str(tmp_path / "out"), stages=["train"]))
    assert not (tmp_path / "out" / "train").exists()


def test_help_shows_the_tools_own_keys_only():
    """`plm-prep --help`: its usage line and config, not plm-train's config groups."""
    r = cli("prep", "--help")
    assert r.returncode == 0
    assert r.stdout.startswith("plm-prep raw=DIR out=DIR")
    assert "max_events: 512" in r.stdout and "tokenizer: null" in r.stdout
    assert "Configuration groups" not in r.stdout and "objective:" not in r.stdout


def test_pipeline_refuses_stage_keys_it_sets_itself(tmp_path):
    """plm-pipeline fills each stage's inputs and outputs from raw= and out=: setting one of them
    otherwise, or a training key of the export's trainer group, is an error, not ignored."""
    from plm.eval.config import EvalConfig
    from plm.pipeline import PipelineConfig, run_pipeline

    (tmp_path / "raw").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    base = [f"raw={tmp_path / 'raw'}", f"out={tmp_path / 'out'}", "stages=[eval]"]
    r = cli("pipeline", *base, f"eval.out={tmp_path / 'elsewhere'}", "export.data=x", env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-2].startswith(
        f"plm-pipeline: error: export.data=x, eval.out={tmp_path / 'elsewhere'}: plm-pipeline sets these itself")
    with pytest.raises(FileNotFoundError, match="eval.labels"):  # the same folder written another way passes
        run_pipeline(PipelineConfig(raw=str(tmp_path / "raw"), out=str(tmp_path / "out"), stages=["eval"],
                                    eval=EvalConfig(out=str(tmp_path / "out" / ".." / "out" / "report"),
                                                    labels=str(tmp_path / "nope.parquet"))))
    r = cli("pipeline", *base, "export.trainer.max_steps=5", env=env)
    assert r.returncode == 2 and "trainer.max_steps: plm-export reads only" in r.stderr, r.stderr[-2000:]
    # eval.labels is honoured (labels kept elsewhere), and a wrong path is named
    with pytest.raises(FileNotFoundError, match=r"eval.labels=.*nope.parquet does not exist"):
        run_pipeline(PipelineConfig(raw=str(tmp_path / "raw"), out=str(tmp_path / "out"), stages=["eval"],
                                    eval=EvalConfig(labels=str(tmp_path / "nope.parquet"))))
    assert not (tmp_path / "out").exists() and not (tmp_path / "elsewhere").exists()


def test_pipeline_checks_the_label_file_before_any_stage(tmp_path):
    """A label file eval would refuse (duplicate users, a task named in eval.tasks that it lacks)
    stops plm-pipeline before prep, not after prep, training and export."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from plm.eval.config import EvalConfig
    from plm.eval.run import EvalInputError
    from plm.pipeline import PipelineConfig, run_pipeline

    (tmp_path / "raw").mkdir()
    pq.write_table(pa.table({"user_id": ["a", "b", "a"], "churn": [0, 1, 1]}), tmp_path / "raw" / "labels.parquet")
    with pytest.raises(EvalInputError, match=r"1 duplicate user_id values .*\(e.g. a\)"):
        run_pipeline(PipelineConfig(raw=str(tmp_path / "raw"), out=str(tmp_path / "out")))
    pq.write_table(pa.table({"user_id": ["a", "b"], "churn": [0, 1]}), tmp_path / "raw" / "labels.parquet")
    with pytest.raises(EvalInputError, match=r"no column \['ato'\] \(label columns: churn\)"):
        run_pipeline(PipelineConfig(raw=str(tmp_path / "raw"), out=str(tmp_path / "out"),
                                    eval=EvalConfig(tasks=["churn", "ato"])))
    assert not (tmp_path / "out").exists()
    # without the eval stage the label file is not read
    with pytest.raises(FileExistsError):
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "x").write_text("x")
        run_pipeline(PipelineConfig(raw=str(tmp_path / "raw"), out=str(tmp_path / "out"), stages=["prep"],
                                    eval=EvalConfig(tasks=["ato"])))


def test_export_names_an_unknown_split_before_anything_loads():
    from plm.export.config import ExportConfig
    from plm.export.run import check_config

    base = {"ckpt": "c", "data": "d", "out": "o"}
    check_config(ExportConfig(**base, splits="test, val"))
    for splits, msg in [("tset", r"splits='tset': unknown \['tset'\]; a comma list of train, val, test"),
                        (",", "names no split")]:
        with pytest.raises(ValueError, match=msg):
            check_config(ExportConfig(**base, splits=splits))
