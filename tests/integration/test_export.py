"""plm-export on tiny hand-written shards and a tiny trained model: the embeddings contract
(schema, identity columns and metadata, every user exactly once), determinism, pooling choices,
int8 and ONNX agreement, the FAISS index, the Spark-free path equal to the batch path, and clear
errors. The 2-process DDP export is in tests/dist/test_dist_export.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from unit.shards import CUTOFF, write_prepared

import plm.config  # noqa: F401  (registers the schemas)
from plm.cli.app import conf_dir
from plm.export import ExportConfig, UserEmbedder, load_checkpoint, read_identity, run_export
from plm.export.model import Embedder, int8_engine, masked_pool
from plm.train.run import train

pytestmark = pytest.mark.slow
os.environ["WANDB_MODE"] = "offline"


def compose_cfg(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return OmegaConf.to_object(compose(name, overrides=overrides))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("export")
    prep = write_prepared(root / "prepared", {"train": [int(x) for x in np.arange(1, 41)], "val": [3, 30, 17],
                                               "test": [1, 2, 25, 5]})
    cfg = compose_cfg("train", [f"data.path={prep}", f"run_dir={root / 'run'}", "data.max_len=16",
                                "data.max_tokens=64", "trainer=cpu", "logger=csv", "trainer.max_steps=3",
                                "trainer.enable_progress_bar=false", "trainer.val_check_interval=0",
                                "trainer.limit_val_batches=1"])
    train(cfg)
    return prep, root / "run" / "final.pt"


def export_cfg(prep: Path, ckpt: Path, out: Path, **kw) -> ExportConfig:
    return replace(ExportConfig(ckpt=str(ckpt), data=str(prep), out=str(out), progress=False), **kw)


def test_contract_every_user_once_with_identity(trained, tmp_path):
    prep, ckpt = trained
    rec = run_export(export_cfg(prep, ckpt, tmp_path / "emb"))
    t = pq.read_table(tmp_path / "emb")
    assert t.schema.field("user_id").type == pa.string()
    typ = t.schema.field("embedding").type
    # default pooling model+recent = [mean, recent14d] of the tiny encoder (d_model 64)
    assert pa.types.is_fixed_size_list(typ) and typ.list_size == 128 and typ.value_type == pa.float32()
    assert t.schema.field("as_of").type == pa.timestamp("us", tz="UTC")
    manifest = json.loads((prep / "manifest.json").read_text())
    want = sorted(f"{s}-u{i:04d}" for s in ("train", "val", "test") for i in range(100)
                  if f"{s}-u{i:04d}" in {u for u in t.column("user_id").to_pylist()})
    assert t.num_rows == sum(v["users"] for v in manifest["splits"].values()) == 47 == len(set(want))
    ident = read_identity(tmp_path / "emb")
    sha = ident["model_sha256"]
    assert set(t.column("model_sha256").to_pylist()) == {sha} and len(sha) == 64
    assert ident["tokenizer_sha256"] == t.column("tokenizer_sha256")[0].as_py()
    assert ident["as_of"] == CUTOFF and ident["pooling"] == "mean+recent14d" and ident["model"] == "encoder:tiny"
    assert str(t.column("as_of")[0].as_py().isoformat()).startswith("2024-01-01T00:00:00")
    # n_events = min(history, max_len of training = 16) for each user's most recent window
    lens = dict(zip(t.column("user_id").to_pylist(), t.column("n_events").to_pylist()))
    assert lens["val-u0041"] == 16 and lens["val-u0040"] == 3 and lens["test-u0043"] == 1
    assert np.isfinite(np.stack(t.column("embedding").to_numpy(zero_copy_only=False))).all()
    record = json.loads((tmp_path / "emb" / "_export.json").read_text())
    assert record["outputs"]["users"] == 47 and record["throughput"]["users_per_s"] > 0
    assert record["inputs"]["max_tokens"] == 4096  # max_tokens=0: the CPU budget of d_model 64
    assert rec["identity"] == ident
    # deterministic: a second export writes the same bytes
    run_export(export_cfg(prep, ckpt, tmp_path / "emb2"))
    assert (tmp_path / "emb" / "part-00000.parquet").read_bytes() == (tmp_path / "emb2" / "part-00000.parquet").read_bytes()


def test_splits_and_existing_output(trained, tmp_path):
    prep, ckpt = trained
    run_export(export_cfg(prep, ckpt, tmp_path / "e", splits="val,test"))
    assert pq.read_table(tmp_path / "e").num_rows == 7
    with pytest.raises(FileExistsError, match="overwrite=true"):
        run_export(export_cfg(prep, ckpt, tmp_path / "e"))
    run_export(export_cfg(prep, ckpt, tmp_path / "e", splits="test", overwrite=True))
    assert pq.read_table(tmp_path / "e").num_rows == 4
    # overwrite=true replaces an earlier export only: other data and files are refused, untouched
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    (tmp_path / "afile").write_text("x")
    for target, msg in (("other", "holds other data"), ("afile", "is a file")):
        with pytest.raises(FileExistsError, match=msg):
            run_export(export_cfg(prep, ckpt, tmp_path / target, splits="test", overwrite=True))
    assert (tmp_path / "other" / "keep.txt").read_text() == "x" and (tmp_path / "afile").read_text() == "x"
    # ... and so is an earlier export with someone's file put in it (it was deleted with the export)
    (tmp_path / "e" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds files plm-export did not write \(notes.txt\)"):
        run_export(export_cfg(prep, ckpt, tmp_path / "e", splits="test", overwrite=True))
    assert (tmp_path / "e" / "notes.txt").read_text() == "mine" and (tmp_path / "e" / "_export.json").exists()


def test_poolings_differ_and_match_a_direct_computation(trained, tmp_path):
    prep, ckpt = trained
    loaded = load_checkpoint(ckpt)
    h = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.allclose(masked_pool(h, mask, "mean")[0], h[0, :3].mean(0))
    assert torch.allclose(masked_pool(h, mask, "last")[0], h[0, 2])
    assert torch.allclose(masked_pool(h, mask, "max")[1], h[1].amax(0))
    # recent<N>d: weights exp(-age / N days), age from the row's last real event; padding ignored;
    # events ten years old underflow to weight 0 without a NaN
    day = 86_400_000_000
    t0 = 1_700_000_000_000_000
    ts = torch.tensor([[t0, t0 + 7 * day, t0 + 14 * day, 0, 5], [t0 - 3650 * day, t0, t0, t0 + day, t0 + 2 * day]])
    w0 = torch.tensor([np.exp(-2.0), np.exp(-1.0), 1.0], dtype=torch.float32)
    assert torch.allclose(masked_pool(h, mask, "recent7d", ts)[0], (w0[:, None] * h[0, :3]).sum(0) / w0.sum())
    w1 = torch.tensor([0.0, np.exp(-2 / 14), np.exp(-2 / 14), np.exp(-1 / 14), 1.0], dtype=torch.float32)
    assert torch.allclose(masked_pool(h, mask, "recent14d", ts)[1], (w1[:, None] * h[1]).sum(0) / w1.sum())
    assert torch.allclose(masked_pool(h, mask, "recent1000d", ts)[0], h[0, :3].mean(0), atol=1e-2)  # long -> mean
    outs = {}
    for pooling in ("mean", "last", "max"):
        run_export(export_cfg(prep, ckpt, tmp_path / pooling, pooling=pooling, splits="val"))
        t = pq.read_table(tmp_path / pooling).sort_by("user_id")
        outs[pooling] = np.stack(t.column("embedding").to_numpy(zero_copy_only=False))
    assert not np.allclose(outs["mean"], outs["last"]) and not np.allclose(outs["mean"], outs["max"])
    with pytest.raises(ValueError, match="pooling=cls needs an encoder trained with pooling=cls"):
        Embedder(loaded.model, "cls")


def test_as_of_pooling_is_the_state_of_a_masked_query_at_the_cutoff(trained, tmp_path):
    """pooling=mean_asof = [mean, state of an all-MASK event appended at the as-of time]: equal to
    a hand-built query batch, independent of padding, sensitive to the as-of time, the same
    through the service and ONNX; refused where it cannot mean anything."""
    from plm.data.collate import collate_windows
    from plm.data.tokenizer import iso_us
    from plm.export.model import append_as_of
    from plm.model import PLMEncoder
    from plm.model.batch import MASK

    prep, ckpt = trained
    rec = run_export(export_cfg(prep, ckpt, tmp_path / "ma", pooling="mean_asof", splits="val"))
    assert rec["identity"]["dim"] == 128 and rec["identity"]["pooling"] == "mean+asof"  # older spelling accepted
    t = pq.read_table(tmp_path / "ma").sort_by("user_id")
    x = np.stack(t.column("embedding").to_numpy(zero_copy_only=False))
    assert t.schema.field("embedding").type.list_size == 128

    loaded = load_checkpoint(ckpt)
    windows = pa.concat_tables([pq.read_table(p) for p in sorted(prep.glob("val/part-*.parquet"))])
    w0 = windows.filter(pa.compute.equal(windows.column("window_index"), 0))
    batch = next(iter(collate_windows(w0, 16, mode="bucketed", max_tokens=4096)))
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    emb = Embedder(loaded.model, "mean_asof", as_of_us=iso_us(CUTOFF))
    with torch.no_grad():
        got = emb(tensors)
        exported = dict(zip(t.column("user_id").to_pylist(), x))
        np.testing.assert_allclose(got.numpy(), np.stack([exported[u] for u in batch["user_id"]]), rtol=1e-5, atol=1e-6)
        for i in range(len(batch["user_id"])):  # one user alone, query written by hand
            n = int(batch["lengths"][i])
            one = {k: v[i : i + 1, :n] for k, v in tensors.items() if v.dim() == 2}
            q = {k: torch.cat([v, v[:, -1:]], 1) for k, v in one.items()}
            for f in loaded.vocab_sizes:
                q[f][0, n] = MASK
                if f"{f}_value" in q:
                    q[f"{f}_value"][0, n] = 0.0
            q["ts"][0, n] = iso_us(CUTOFF)
            if "positions" in q:
                q["positions"][0, n] = n
            h = loaded.model(q).hidden[0]  # one forward: history and query see each other
            torch.testing.assert_close(got[i], torch.cat([h[:n].mean(0), h[n]]), rtol=1e-4, atol=1e-5)
        later = Embedder(loaded.model, "asof", as_of_us=iso_us(CUTOFF) + 30 * 86_400_000_000)(tensors)
    assert not torch.allclose(got[:, 64:], later, atol=1e-4)  # the elapsed time is seen
    q, n = append_as_of(tensors, torch.full((got.shape[0],), 7), list(loaded.vocab_sizes))
    assert torch.equal(n, tensors["attention_mask"].sum(1)) and q["ts"].shape[1] == tensors["ts"].shape[1] + 1

    svc = UserEmbedder.from_files(str(ckpt), str(prep), pooling="mean_asof")
    with pytest.raises(ValueError, match="embeds users as of a time"):
        svc.embed_windows(windows)
    got = svc.embed_windows(windows.filter(pa.compute.equal(windows.column("split"), "val")), as_of=CUTOFF)
    np.testing.assert_allclose(np.stack(got.column("embedding").to_numpy(zero_copy_only=False)), x, rtol=1e-5, atol=1e-6)

    onnx = run_export(export_cfg(prep, ckpt, tmp_path / "onnx", format="onnx", pooling="mean_asof"))
    assert onnx["agreement"]["onnx_fp32_vs_fp32"]["cosine_min"] > 0.99999
    assert onnx["inputs"][-1] == {"name": "as_of", "shape": ["batch"], "dtype": "int64"}

    # a time-gap encoder (the cpu-small preset) through ONNX with the as-of input
    import onnxruntime as ort

    from plm.export.model import export_onnx, onnx_input_names

    cfg_gap = replace(loaded.model.cfg, embedding=replace(loaded.model.cfg.embedding, time_gap="periodic"))
    torch.manual_seed(0)
    gap_emb = Embedder(PLMEncoder(cfg_gap, loaded.vocab_sizes, loaded.numeric_fields).eval(), "mean_asof",
                       as_of_us=iso_us(CUTOFF))
    names = onnx_input_names(loaded.vocab_sizes, loaded.numeric_fields, as_of=True)
    sample = dict(tensors, as_of=torch.full((len(batch["user_id"]),), iso_us(CUTOFF)))
    assert not bool(sample["attention_mask"].all())
    export_onnx(gap_emb, sample, names, tmp_path / "gap.onnx")
    sess = ort.InferenceSession(str(tmp_path / "gap.onnx"), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in sess.get_inputs()}
    got_onnx = sess.run(None, {n: sample[n].numpy() for n in names if n in wanted})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got_onnx, gap_emb(sample).numpy(), rtol=1e-4, atol=1e-4)

    assert not loaded.as_of_query and Embedder(loaded.model, "model").pooling == "mean"
    assert Embedder(loaded.model, "model", as_of_query=True).pooling == "mean+asof"  # trained with last_prob
    both = Embedder(loaded.model, "model+recent", as_of_us=iso_us(CUTOFF), as_of_query=True)
    assert both.pooling == "mean+asof+recent14d" and both.dim == 192
    with torch.no_grad():  # one forward pass: the first two thirds are the mean+asof vector
        np.testing.assert_allclose(both(tensors)[:, :128].numpy(), emb(tensors).numpy(), rtol=1e-5, atol=1e-6)
    for bad, msg in (("mean+mean", "gives mean twice"), ("model+mean", r"gives mean twice \(model means mean\+asof\)"),
                     ("recent0d", "time constant > 0")):
        with pytest.raises(ValueError, match=msg):
            Embedder(loaded.model, bad, as_of_query=True)
    cfg = loaded.model.cfg
    cfg2 = replace(cfg, position=replace(cfg.position, rope="index"))
    with pytest.raises(ValueError, match="needs time-aware positions"):
        Embedder(PLMEncoder(cfg2, loaded.vocab_sizes, loaded.numeric_fields), "asof")


def test_int8_and_normalize_and_faiss(trained, tmp_path):
    prep, ckpt = trained
    rec = run_export(export_cfg(prep, ckpt, tmp_path / "q", quantize="int8", normalize=True, index="flat"))
    agr = rec["agreement"]["int8_vs_fp32"]
    assert agr["cosine_min"] >= 0.99 and agr["n"] > 0 and agr["engine"] == int8_engine()
    t = pq.read_table(tmp_path / "q")
    x = np.stack(t.column("embedding").to_numpy(zero_copy_only=False))
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    import faiss

    index = faiss.read_index(str(tmp_path / "q" / "_faiss" / "index.faiss"))
    ids = pq.read_table(tmp_path / "q" / "_faiss" / "user_ids.parquet").column("user_id").to_pylist()
    assert index.ntotal == t.num_rows == len(ids)
    _, nn = index.search(x[:5], 1)  # every vector's nearest neighbour is itself
    assert [ids[i] for i in nn[:, 0]] == t.column("user_id").to_pylist()[:5]
    with pytest.raises(RuntimeError, match="below min_cosine"):
        run_export(export_cfg(prep, ckpt, tmp_path / "q2", quantize="int8", min_cosine=1.0))
    assert not (tmp_path / "q2").exists()


def test_compiled_int8_export_matches_eager(trained, tmp_path):
    """trainer.compile=true: the embedder runs under torch.compile (here int8 + compile), is checked
    against eager fp32 like int8, and writes the same users with vectors agreeing with the eager
    int8 export; with format=onnx the option is refused, not ignored."""
    prep, ckpt = trained
    cfg = export_cfg(prep, ckpt, tmp_path / "c", quantize="int8")
    cfg.trainer.compile = True
    rec = run_export(cfg)
    agr = rec["agreement"]["int8_vs_fp32"]
    assert agr["compiled"] is True and agr["cosine_min"] >= 0.99 and agr["compile_and_check_s"] > 0
    eager = run_export(export_cfg(prep, ckpt, tmp_path / "e", quantize="int8"))
    assert eager["agreement"]["int8_vs_fp32"]["compiled"] is False
    a = pq.read_table(tmp_path / "c").sort_by("user_id")
    b = pq.read_table(tmp_path / "e").sort_by("user_id")
    assert a.column("user_id").to_pylist() == b.column("user_id").to_pylist()
    x = np.stack(a.column("embedding").to_numpy(zero_copy_only=False))
    y = np.stack(b.column("embedding").to_numpy(zero_copy_only=False))
    cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    assert cos.min() > 0.999, cos.min()
    ddp_onnx = export_cfg(prep, ckpt, tmp_path / "o", format="onnx")
    ddp_onnx.trainer.devices, ddp_onnx.trainer.strategy = 2, "ddp"
    with pytest.raises(ValueError, match="format=onnx writes one graph in one process"):
        run_export(ddp_onnx)
    with pytest.raises(ValueError, match="row_group_size=7 sizes the Parquet embeddings"):
        run_export(export_cfg(prep, ckpt, tmp_path / "o", format="onnx", row_group_size=7))
    onnx = export_cfg(prep, ckpt, tmp_path / "o", format="onnx")
    onnx.trainer.compile = True
    with pytest.raises(ValueError, match="trainer.compile=true compiles the eager model"):
        run_export(onnx)


def test_compile_failure_is_one_clear_error():
    from plm.export.model import first_call

    class InductorLike(Exception):
        pass

    InductorLike.__module__ = "torch._inductor.exc"

    def fails():
        raise InductorLike("CppCompileError: g++ not found\nlong trace")

    with pytest.raises(RuntimeError, match=r"trainer.compile=true: torch.compile failed \(InductorLike: "
                                           r"CppCompileError: g\+\+ not found\).*trainer.compile=false"):
        first_call("trainer.compile=true", fails)
    with pytest.raises(KeyError):  # not a compiler error: raised as it is
        first_call("trainer.compile=true", lambda: {}["x"])


def test_checkpoint_refuses_data_of_another_tokenizer(trained, tmp_path):
    """final.pt records the training data's tokenizer.json (sha256): data prepared with another
    tokenizer of the same vocabulary sizes (its ids would mean other things) is refused."""
    import hashlib
    import shutil

    prep, ckpt = trained
    assert torch.load(ckpt, weights_only=True)["tokenizer_sha256"] == hashlib.sha256(
        (prep / "tokenizer.json").read_bytes()).hexdigest()
    other = tmp_path / "other"
    shutil.copytree(prep, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["categorical"]["merchant"] = tok["categorical"]["merchant"][::-1]  # same sizes, other ids
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="trained on another tokenizer.json than data=.*other"):
        run_export(export_cfg(other, ckpt, tmp_path / "e", splits="test"))
    with pytest.raises(ValueError, match="trained on another tokenizer.json"):
        UserEmbedder.from_files(str(ckpt), str(other))
    assert not (tmp_path / "e").exists()


def test_onnx_export_agrees_with_eager(trained, tmp_path):
    prep, ckpt = trained
    rec = run_export(export_cfg(prep, ckpt, tmp_path / "onnx", format="onnx", quantize="int8", normalize=True))
    assert rec["normalize"] is True and rec["identity"]["normalized"] is True  # applied in the graph
    assert (tmp_path / "onnx" / "model.onnx").exists() and (tmp_path / "onnx" / "model.int8.onnx").exists()
    assert (tmp_path / "onnx" / "tokenizer.json").exists()
    for k in ("onnx_fp32_vs_fp32", "onnx_int8_vs_fp32"):
        assert rec["agreement"][k]["cosine_min"] >= 0.99, rec["agreement"]
    assert rec["agreement"]["onnx_fp32_vs_fp32"]["cosine_min"] > 0.99999
    meta = json.loads((tmp_path / "onnx" / "onnx.json").read_text())
    assert meta["output"]["shape"] == ["batch", 128] and meta["inputs"][-1]["name"] == "attention_mask"


def test_spark_free_path_equals_batch_path(trained, tmp_path):
    """Windows re-tokenised by the service (here: the prepared windows themselves) give the
    exported vectors; the raw-event path is checked on a real prepared world in test_pipeline."""
    prep, ckpt = trained
    run_export(export_cfg(prep, ckpt, tmp_path / "b"))
    batch = pq.read_table(tmp_path / "b").sort_by("user_id")
    svc = UserEmbedder.from_files(str(ckpt), str(prep))
    windows = pa.concat_tables([pq.read_table(p) for p in sorted(prep.glob("*/part-*.parquet"))])
    got = svc.embed_windows(windows)
    assert got.column("user_id").to_pylist() == batch.column("user_id").to_pylist()
    a = np.stack(got.column("embedding").to_numpy(zero_copy_only=False))
    b = np.stack(batch.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # a batch budget below one sequence is refused, as plm-export refuses it (it was raised silently)
    with pytest.raises(ValueError, match=r"max_tokens=8 is smaller than one sequence of max_len=\d+ events"):
        UserEmbedder.from_files(str(ckpt), str(prep), max_tokens=8)
    assert UserEmbedder.from_files(str(ckpt), str(prep), max_tokens=svc.max_len).max_tokens == svc.max_len


def test_errors_are_clear(trained, tmp_path):
    prep, ckpt = trained
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_export(export_cfg(prep, tmp_path / "nope.pt", tmp_path / "x"))
    with pytest.raises(ValueError, match="format='csv' is not one of"):
        run_export(export_cfg(prep, ckpt, tmp_path / "x", format="csv"))
    with pytest.raises(ValueError, match="opset=17: ONNX export needs opset >= 18"):
        run_export(export_cfg(prep, ckpt, tmp_path / "x", format="onnx", opset=17))
    with pytest.raises(ValueError, match="opset=20 is the ONNX graph's opset: use it with format=onnx"):
        run_export(export_cfg(prep, ckpt, tmp_path / "x", opset=20))
    with pytest.raises(ValueError, match="max_tokens=-1 must be >= 0"):
        run_export(export_cfg(prep, ckpt, tmp_path / "x", max_tokens=-1))
    with pytest.raises(ValueError, match="max_tokens=8 is smaller than one sequence of max_len=16"):
        run_export(export_cfg(prep, ckpt, tmp_path / "x", max_tokens=8))
    other = write_prepared(tmp_path / "other")
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["categorical"]["merchant"] = tok["categorical"]["merchant"][:5]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="trained on another tokenizer.*merchant"):
        run_export(export_cfg(other, ckpt, tmp_path / "x"))
    bad = tmp_path / "bad.pt"
    torch.save({"weights": 1}, bad)
    with pytest.raises(ValueError, match="neither a plm-train final.pt nor a Lightning checkpoint"):
        run_export(export_cfg(prep, bad, tmp_path / "x"))


def test_lightning_checkpoint_loads_like_final(trained):
    _, ckpt = trained
    a = load_checkpoint(ckpt)
    b = load_checkpoint(ckpt.parent / "checkpoints" / "last.ckpt")
    assert a.arch == b.arch == "encoder"
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k


def test_cli(trained, tmp_path):
    prep, ckpt = trained
    exe = Path(sys.executable).parent / "plm-export"
    r = subprocess.run([str(exe), f"ckpt={ckpt}", f"data={prep}", f"out={tmp_path / 'cli'}", "progress=false"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "47 users x 128" in r.stdout and "users/s" in r.stdout
    r = subprocess.run([str(exe), f"ckpt={ckpt}", f"data={prep}", f"out={tmp_path / 'cli2'}", "pooling=mean+recent30d+max"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and "47 users x 192" in r.stdout, r.stderr[-3000:]
    assert read_identity(tmp_path / "cli2")["pooling"] == "mean+recent30d+max"
    r = subprocess.run([str(exe), f"ckpt={ckpt}", f"data={prep}", f"out={tmp_path / 'cli'}", "pooling=mean+avg"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2 and "pooling='mean+avg': 'avg' is not one of" in r.stderr
    # a training-only key of the shared trainer group is refused, not ignored
    r = subprocess.run([str(exe), f"ckpt={ckpt}", f"data={prep}", f"out={tmp_path / 'cli3'}", "trainer.max_steps=5",
                        "trainer.num_threads=1"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2 and "trainer.max_steps: plm-export reads only trainer.{accelerator," in r.stderr, r.stderr
    assert not (tmp_path / "cli3").exists()


def test_decoder_export_and_next_event_report(trained, tmp_path):
    """A decoder exports (pooling=model -> last) and plm-eval adds its next-event sections."""
    prep, _ = trained
    cfg = compose_cfg("train", [f"data.path={prep}", f"run_dir={tmp_path / 'dec'}", "experiment=next_tiny",
                                "data.max_len=16", "data.max_tokens=64", "trainer=cpu", "logger=csv",
                                "trainer.max_steps=2", "trainer.enable_progress_bar=false",
                                "trainer.val_check_interval=0", "trainer.limit_val_batches=1"])
    train(cfg)
    ckpt = tmp_path / "dec" / "final.pt"
    rec = run_export(export_cfg(prep, ckpt, tmp_path / "emb"))
    assert rec["identity"]["model"] == "decoder:tiny" and rec["identity"]["pooling"] == "last+recent14d"
    with pytest.raises(ValueError, match="pooling=asof needs an encoder"):
        run_export(export_cfg(prep, ckpt, tmp_path / "emb2", pooling="asof"))
    users = pq.read_table(tmp_path / "emb", columns=["user_id"]).column("user_id").to_pylist()
    rng = np.random.default_rng(0)
    pq.write_table(pa.table({"user_id": users, "flag": rng.integers(0, 2, len(users))}), tmp_path / "labels.parquet")
    exe = Path(sys.executable).parent / "plm-eval"
    r = subprocess.run([str(exe), f"embeddings={tmp_path / 'emb'}", f"labels={tmp_path / 'labels.parquet'}",
                        f"out={tmp_path / 'rep'}", f"ckpt={ckpt}", f"data={prep}", "next_split=val", "folds=2",
                        "bootstrap=10", "progress=false", "plots=false", "generate_users=3", "generate_horizon=2"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "Next-event prediction (decoder)" in md and "Generated vs real" in md and "perplexity" in md
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("plm-eval: next events"))
    assert line.startswith("plm-eval: next events (val split, ") and "mean perplexity" in line, line
    assert re.search(r"; [1-3] generated futures of 2 events: median gap [0-9.e+-]+ h \(real [0-9.e+-]+ h\)$", line), line
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    per_field = rep["extra_sections"]["Next-event per field (teacher forcing)"]
    assert 0.0 <= per_field["merchant"]["accuracy"] <= 1.0 and per_field["merchant"]["perplexity"] > 1.0
    # an encoder checkpoint is refused with a clear message
    r = subprocess.run([str(exe), f"embeddings={tmp_path / 'emb'}", f"labels={tmp_path / 'labels.parquet'}",
                        f"out={tmp_path / 'rep2'}", f"ckpt={trained[1]}", f"data={prep}"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2 and "next-event metrics need a decoder" in r.stderr


def test_auto_max_tokens_sizes_cpu_batches_by_width():
    """max_tokens=0: on CPU ~2^18 / d_model padded events (a layer's activations stay in cache),
    never below one sequence; on a GPU 32768."""
    from plm.export.run import auto_max_tokens

    assert auto_max_tokens(64, 256) == 4096
    assert auto_max_tokens(256, 256) == 1024
    assert auto_max_tokens(96, 16) == 2048  # 2730 -> the nearest power of two
    assert auto_max_tokens(1024, 512) == 512  # one sequence at least
    assert auto_max_tokens(64, 256, gpu=True) == 32768
    assert auto_max_tokens(64, 65536, gpu=True) == 65536
