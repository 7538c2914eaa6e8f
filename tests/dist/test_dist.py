"""Two CPU processes (gloo, torchrun) for DDP and for FSDP2 (ModelParallelStrategy + fully_shard
per block) reach the same losses as one process with the same global batch.

Tolerance: |mean of the ranks' losses - one-process loss| <= 1e-4 (relative) at every one of 6
steps (AdamW, lr 3e-3, grad clipping at 0.5): only float reduction order differs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist
WORKER = Path(__file__).with_name("dist_worker.py")
TOL = 1e-4


def run(strategy: str, out: Path, nproc: int) -> list[list[float]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(WORKER), strategy, str(out)]
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), strategy, str(out)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        _, err = p.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the launcher and its workers (own session)
        _, err = p.communicate()
        raise AssertionError(f"{strategy}: timed out\n{err[-4000:]}") from None
    r = subprocess.CompletedProcess(cmd, p.returncode, "", err)
    assert r.returncode == 0, r.stderr[-4000:]
    return [json.loads((out / f"losses-{i}.json").read_text()) for i in range(nproc)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run("single", tmp_path_factory.mktemp("single"), 1)[0]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_match_one(strategy, single, tmp_path):
    ranks = run(strategy, tmp_path, 2)
    assert len(ranks[0]) == len(single) == 6
    mean = [(a + b) / 2 for a, b in zip(*ranks)]
    for step, (m, s) in enumerate(zip(mean, single)):
        assert abs(m - s) <= TOL * max(1.0, abs(s)), (strategy, step, m, s)
    assert single[-1] < single[0]  # it trains


def test_fsdp2_cli_distributed_checkpoint_resume_is_exact(tmp_path):
    """plm-train under torchrun with trainer=fsdp on CPU/gloo: distributed checkpoints, and a run
    resumed from step 2 logs exactly the losses of the uninterrupted run from step 2 on."""
    from unit.shards import write_prepared

    prep = write_prepared(tmp_path / "prep")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}

    def cli(run: Path, *extra: str) -> dict[int, float]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "-m", "plm.cli.train", f"data.path={prep}", "trainer=fsdp",
               "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true", "trainer.max_steps=4",
               "trainer.checkpoint_every_n_steps=2", "trainer.val_check_interval=0", "trainer.limit_val_batches=2",
               "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "logger=csv", "data.max_len=16",
               "data.max_tokens=64", f"hydra.run.dir={run}", *extra]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             start_new_session=True, cwd=tmp_path)
        try:
            out, err = p.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            raise AssertionError("fsdp cli timed out") from None
        assert p.returncode == 0, err[-4000:]
        # one report per run, not one per process; per-field validation metrics reduced, no
        # Lightning "use sync_dist=True" warning for each of them
        assert out.count("plm-train: run folder") == 1, out
        assert "val/ppl" in (run / "csv" / "metrics.csv").read_text() and "sync_dist" not in err, err[-4000:]
        assert "returned a view tensor" not in err, err[-4000:]  # FSDP2 on the heads' per-field views
        import csv

        with open(run / "csv" / "metrics.csv") as f:
            return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}

    full = cli(tmp_path / "full")
    assert (tmp_path / "full" / "checkpoints" / "step-2.ckpt" / "meta.pt").exists()  # distributed checkpoint
    assert (tmp_path / "full" / "final.pt").exists()
    resumed = cli(tmp_path / "resumed", f"ckpt_path={tmp_path / 'full' / 'checkpoints' / 'step-2.ckpt'}")
    assert sorted(resumed) == [2, 3]
    assert all(resumed[s] == full[s] for s in resumed), (full, resumed)


def test_contrastive_gather_gives_the_one_process_loss_and_gradients(tmp_path):
    """info_nce over two ranks' gathered views: the ranks' mean loss is the one-process loss on
    the whole batch, and each rank's rows get the gradient of the sum of the ranks' losses (the
    gather's backward sums them; DDP then averages), i.e. world x the one-process gradient. No
    deprecation warning from the collective."""
    import torch

    from dist.gather_worker import views
    from plm.train.objectives import info_nce

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(Path(__file__).with_name("gather_worker.py")), str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"gather-{i}.json").read_text()) for i in range(2)]
    z1, z2 = (z.clone().requires_grad_(True) for z in views())
    loss, _ = info_nce(z1, z2, 0.1, gather=False)
    loss.backward()
    assert abs((ranks[0]["loss"] + ranks[1]["loss"]) / 2 - loss.item()) <= 1e-5
    for i, rk in enumerate(ranks):
        torch.testing.assert_close(torch.tensor(rk["g1"]), 2 * z1.grad[i::2], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(torch.tensor(rk["g2"]), 2 * z2.grad[i::2], rtol=1e-4, atol=1e-6)
        assert rk["future_warnings"] == [], rk["future_warnings"]
