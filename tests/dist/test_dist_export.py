"""plm-export under torchrun with two CPU processes (gloo): one Parquet part per rank, every user
exactly once over the parts, and the same vectors as a one-process export."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from unit.shards import write_prepared

from plm.data.tokenizer import Tokenizer
from plm.model import PLMEncoder, load_model_config

pytestmark = pytest.mark.dist


def make_ckpt(prep: Path, path: Path) -> Path:
    """A seeded, untrained tiny encoder saved like plm-train's final.pt."""
    torch.manual_seed(0)
    tok = Tokenizer.load(prep / "tokenizer.json")
    cfg = load_model_config("tiny")
    numeric = list(tok.numeric)
    model = PLMEncoder(cfg, tok.vocab_sizes(), numeric)
    torch.save({"model": model.state_dict(), "model_config": asdict(cfg), "vocab_sizes": tok.vocab_sizes(),
                "numeric_fields": numeric, "arch": "encoder", "max_len": 16}, path)
    return path


def run(args: list[str], cwd: Path, nproc: int) -> subprocess.CompletedProcess:
    from dist.test_dist import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "-m", "plm.cli.export", *args, "trainer=ddp",
               "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
    else:
        cmd = [sys.executable, "-m", "plm.cli.export", *args]
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def test_two_ranks_write_one_part_each_and_every_user_once(tmp_path):
    rng = np.random.default_rng(3)
    prep = write_prepared(tmp_path / "prep", {"train": [int(x) for x in rng.integers(1, 40, 37)],
                                              "val": [int(x) for x in rng.integers(1, 40, 6)], "test": [4, 9]},
                          users_per_shard=5, row_group_size=3)
    ckpt = make_ckpt(prep, tmp_path / "final.pt")
    common = [f"ckpt={ckpt}", f"data={prep}", "progress=false", "max_tokens=64"]
    r2 = run(common + [f"out={tmp_path / 'two'}"], tmp_path, 2)
    run(common + [f"out={tmp_path / 'one'}"], tmp_path, 1)
    parts = sorted(p.name for p in (tmp_path / "two").glob("*.parquet"))
    assert parts == ["part-00000.parquet", "part-00001.parquet"]
    rows = [pq.read_table(tmp_path / "two" / p).num_rows for p in parts]
    assert min(rows) > 0 and sum(rows) == 45
    two = pq.read_table(tmp_path / "two").sort_by("user_id")
    one = pq.read_table(tmp_path / "one").sort_by("user_id")
    assert two.column("user_id").to_pylist() == one.column("user_id").to_pylist()
    assert len(set(two.column("user_id").to_pylist())) == 45
    a = np.stack(two.column("embedding").to_numpy(zero_copy_only=False))
    b = np.stack(one.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert "45 users x 128" in r2.stdout and "2 part(s)" in r2.stdout


def test_two_ranks_compiled_export_compiles_once(tmp_path):
    """trainer=ddp trainer.compile=true: each rank compiles during its agreement check and its
    predict loop reuses those graphs (no recompilation: with the check under another grad mode than
    the predict loop's, every graph compiled twice and the export ran 15x slower), and the vectors
    are the eager export's."""
    rng = np.random.default_rng(5)
    prep = write_prepared(tmp_path / "prep", {"train": [int(x) for x in rng.integers(1, 40, 30)], "test": [4, 9]},
                          users_per_shard=8, row_group_size=4)
    ckpt = make_ckpt(prep, tmp_path / "final.pt")
    common = [f"ckpt={ckpt}", f"data={prep}", "progress=false", "max_tokens=64"]
    os.environ["TORCH_LOGS"] = "recompiles"
    try:
        r = run(common + [f"out={tmp_path / 'c'}", "trainer.compile=true"], tmp_path, 2)
    finally:
        del os.environ["TORCH_LOGS"]
    assert "compiled vs fp32 cosine min 1.0000" in r.stdout, r.stdout
    # new kinds of batch (a single user: size-1 specialisation) may compile once more; a change of
    # grad mode or of tensor kind (inference tensors) between the check and the predict loop must not
    reasons = [ln for ln in r.stderr.splitlines() if "__recompiles" in ln and " - " in ln]
    assert not [ln for ln in reasons if "dispatch key set mismatch" in ln or "grad_mode" in ln.lower()], reasons[:5]
    run(common + [f"out={tmp_path / 'e'}"], tmp_path, 1)
    c = pq.read_table(tmp_path / "c").sort_by("user_id")
    e = pq.read_table(tmp_path / "e").sort_by("user_id")
    assert c.column("user_id").to_pylist() == e.column("user_id").to_pylist()
    np.testing.assert_allclose(np.stack(c.column("embedding").to_numpy(zero_copy_only=False)),
                               np.stack(e.column("embedding").to_numpy(zero_copy_only=False)), rtol=1e-4, atol=1e-5)
