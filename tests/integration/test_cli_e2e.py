"""plm-synth + plm-prep as a user runs them (console scripts, hydra overrides), determinism."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_prep.prep import run_prep

pytestmark = [pytest.mark.spark, pytest.mark.slow]

BIN = Path(sys.executable).parent
SPARK = ["spark.master='local[2]'", "+spark.conf={spark.ui.enabled: 'false', spark.sql.shuffle.partitions: '4'}"]


def run(*args, check=True):
    env = {**os.environ, "WANDB_MODE": "offline"}
    p = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, env=env, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    run("plm-synth", f"out={root / 'raw'}", "users=120", "seed=7", "dirty_fraction=0.02")
    p = run("plm-prep", f"raw={root / 'raw'}", f"out={root / 'prep'}", "max_events=64", "stride=32",
            "vocab.min_count=2", *SPARK)
    return root, p.stdout + p.stderr


def test_cli_end_to_end(world):
    root, stdout = world
    m = json.loads((root / "prep" / "manifest.json").read_text())
    assert "plm-prep: wrote" in stdout and "quarantined" in stdout
    # no log lines a user cannot act on: py4j's connection life, Spark's truncated plan text
    assert "clientserver" not in stdout and "Truncated the string" not in stdout, stdout[-3000:]
    # nor local-mode JVM start-up chatter (data_prep/log4j2-local.properties, SPARK_LOCAL_IP)
    for chatter in ("log4j profile", "NativeCodeLoader", "loopback address", "setLogLevel"):
        assert chatter not in stdout, stdout[-3000:]
    for source, acc in m["accounting"].items():
        assert acc["input_rows"] == acc["kept_rows"] + acc["quarantined_total"] + acc["duplicate_rows"], source
    assert sum(a["quarantined_total"] for a in m["accounting"].values()) > 0
    assert sum(a["duplicate_rows"] for a in m["accounting"].values()) > 0
    world_meta = json.loads((root / "raw" / "world.json").read_text())
    users = sum(m["splits"][s]["users"] for s in ("train", "val", "test"))
    assert users == 120  # every user with a valid event is present
    assert m["config"]["max_events"] == 64
    assert m["cutoff"].replace("Z", "") <= world_meta["cutoff"].replace("Z", "").replace("+00:00", "")
    assert m["labels"]["users_with_sequences_and_labels"] == 120
    shard = pq.read_table(root / "prep" / m["splits"]["train"]["shards"][0]["path"])
    assert max(shard.column("n_events").to_pylist()) <= 64


def test_same_input_same_shards_and_tokenizer(world, tmp_path, spark, prep_config):
    """A second run (in-process, another partition count) writes identical shards and tokenizer."""
    root, _ = world
    from plm.config import BinsConfig, VocabConfig

    cfg = prep_config(root / "raw", tmp_path / "again", max_events=64, stride=32,
                      vocab=VocabConfig(min_count=2), bins=BinsConfig())
    run_prep(cfg, spark=spark)
    first, second = root / "prep", tmp_path / "again"
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
    files = sorted(p.relative_to(first) for p in first.rglob("*.parquet"))
    assert files == sorted(p.relative_to(second) for p in second.rglob("*.parquet"))
    for f in files:  # compared by value (repr: NaN in the quarantine equals itself)
        a, b = pq.read_table(first / f), pq.read_table(second / f)
        assert a.schema == b.schema and repr(a.to_pylist()) == repr(b.to_pylist()), f


def test_given_tokenizer_is_applied_not_refitted(world, tmp_path, spark, prep_config, capsys):
    """`tokenizer=<earlier prep folder>`: the earlier tokenizer is applied unchanged, so the shards
    equal the earlier run's; fitting settings beside it are refused (they would do nothing). The
    log lists its fields in the schema's order, as for a fitted one (not the file's sorted keys)."""
    root, _ = world
    from plm.config import BinsConfig, VocabConfig

    first = root / "prep"
    with pytest.raises(ValueError, match=r"^vocab.min_count, .*bins.n_bins.* set with tokenizer=.*drop them"):
        run_prep(prep_config(root / "raw", tmp_path / "given", tokenizer=str(first)), spark=spark)  # tiny-data fit settings
    given = {"vocab": VocabConfig(), "bins": BinsConfig()}  # the defaults: nothing to fit
    m = run_prep(prep_config(root / "raw", tmp_path / "given", max_events=64, stride=32, tokenizer=str(first), **given),
                 spark=spark)
    assert m["tokenizer"]["fitted"] is False and m["tokenizer"]["source"].endswith("tokenizer.json")
    line = next(x for x in capsys.readouterr().out.splitlines() if "tokenizer (given" in x)
    assert line.split("): ", 1)[1].startswith("event_type="), line
    assert (first / "tokenizer.json").read_bytes() == (tmp_path / "given" / "tokenizer.json").read_bytes()
    for split in ("train", "test"):
        f = first / m["splits"][split]["shards"][0]["path"]
        g = tmp_path / "given" / m["splits"][split]["shards"][0]["path"]
        assert repr(pq.read_table(f).to_pylist()) == repr(pq.read_table(g).to_pylist())
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        run_prep(prep_config(root / "raw", tmp_path / "x", tokenizer=str(tmp_path), **given), spark=spark)
    old = json.loads((first / "tokenizer.json").read_text()) | {"format_version": "1.1"}
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"^tokenizer=.*old.json: tokenizer format '1.1' is not supported.*prepare the data again"):
        run_prep(prep_config(root / "raw", tmp_path / "x", tokenizer=str(tmp_path / "old.json"), **given), spark=spark)
    assert not (tmp_path / "x").exists()


def test_a_spark_master_that_cannot_start_is_one_line(tmp_path):
    """A master URL Spark cannot use ends plm-prep with one line naming it (a py4j stack trace
    from inside the JVM before), and nothing is written."""
    from conftest import payment, source_table, ts

    (tmp_path / "raw" / "payments").mkdir(parents=True)
    pq.write_table(source_table("payments", [payment("p1", "u1", ts(1))]), tmp_path / "raw" / "payments" / "p.parquet")
    p = run("plm-prep", f"raw={tmp_path / 'raw'}", f"out={tmp_path / 'o'}", "spark.master=nonsense", check=False)
    last = p.stderr.strip().splitlines()[-2]
    assert p.returncode == 2 and last.startswith("plm-prep: error: Spark could not start a session with "
                                                 "spark.master='nonsense'"), p.stderr[-3000:]
    assert "Traceback" not in p.stderr and not (tmp_path / "o").exists()


def test_bad_overrides_fail_with_a_message_naming_them(tmp_path):
    # hydra's own errors (an override it cannot apply) exit with 2 like ours: bad input, not a crash
    p = run("plm-prep", "raw=x", "out=y", "max_evnts=3", check=False)
    assert p.returncode == 2 and "max_evnts" in p.stderr, (p.returncode, p.stderr[-3000:])
    p = run("plm-prep", "raw=x", "out=y", "max_events=many", check=False)
    assert p.returncode == 2 and "max_events" in p.stderr, (p.returncode, p.stderr[-3000:])
    p = run("plm-prep", f"raw={tmp_path / 'nope'}", f"out={tmp_path / 'o'}", check=False)
    assert p.returncode == 2 and "does not exist" in p.stderr, (p.returncode, p.stderr[-3000:])
    assert not (tmp_path / "o").exists()
    p = run("plm-prep", f"raw={tmp_path}", f"out={tmp_path / 'o'}", "stride=0", check=False)
    assert p.returncode == 2 and "stride=0" in p.stderr, (p.returncode, p.stderr[-3000:])
    # plm-train: a bad value is one line naming it, not a stack trace
    p = run("plm-train", f"data.path={tmp_path}", f"run_dir={tmp_path / 't'}", "trainer.strategy=zero",
            "logger.wandb=false", check=False)
    assert p.returncode == 2 and "trainer.strategy='zero'" in p.stderr, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
