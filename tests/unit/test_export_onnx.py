"""ONNX export of the encoder's time inputs (seconds since the sequence start, gap since the
previous event) and of a tiny untrained `embedding.time_gap=periodic` encoder: ONNX Runtime must
agree with eager on batches whose shapes, padding and gaps differ from the export example,
including gaps of 2**31 to 2**32 µs (36 to 72 minutes), which ONNX Runtime's int64 Clip zeroed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from plm.data.schema import CATEGORICAL_FIELDS, NUMERIC_FIELDS
from plm.export.model import Embedder, cosine_agreement, export_onnx, onnx_input_names
from plm.model import AttentionConfig, ModelConfig, PLMEncoder, PositionConfig
from plm.model.batch import previous_gap_seconds, relative_seconds
from plm.model.testing import T0_US, random_batch

ort = pytest.importorskip("onnxruntime")

VOCAB = {f.name: 9 for f in CATEGORICAL_FIELDS} | {f.name: 11 for f in NUMERIC_FIELDS}
NUMERIC = [f.name for f in NUMERIC_FIELDS]
MIN_US = 60 * 10**6


def padded(batch: dict[str, torch.Tensor], lengths: list[int]) -> dict[str, torch.Tensor]:
    """Right padding: events past each row's length are zeroed (ids PAD, ts 0) and masked."""
    T = batch["ts"].shape[1]
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    out = {k: torch.where(mask, v, torch.zeros_like(v)) for k, v in batch.items()}
    out["attention_mask"] = mask
    out["positions"] = torch.where(mask, torch.arange(T)[None], 0)
    return out


def with_gaps(batch: dict[str, torch.Tensor], gaps_us: torch.Tensor) -> dict[str, torch.Tensor]:
    """`batch` with ts = T0_US + cumulative (B, T) gaps in µs (gaps[:, 0] is the start offset)."""
    out = dict(batch)
    out["ts"] = T0_US + gaps_us.long().cumsum(1)
    return out


def hard_batch(B: int = 6, T: int = 17, seed: int = 3, empty: bool = True) -> dict[str, torch.Tensor]:
    """Gaps the export example never had: half of them in [2**31, 2**32) µs, ties (0), a
    minute, months; rows of every length (one full row, one single event, one empty row unless
    `empty` is False)."""
    g = torch.Generator().manual_seed(seed)
    gaps = torch.randint(2**31, 2**32, (B, T), generator=g)
    other = torch.tensor([0, MIN_US, 90 * 86_400 * 10**6, 5 * 10**6])[torch.randint(0, 4, (B, T), generator=g)]
    gaps = torch.where(torch.rand(B, T, generator=g) < 0.5, gaps, other)
    gaps[:, 0] = torch.randint(0, 10**12, (B,), generator=g)  # rows start at different times
    lengths = [T, 1, 9, 0 if empty else 2, 12, 16][:B]
    return padded(with_gaps(random_batch(VOCAB, NUMERIC, B=B, T=T, seed=seed), gaps), lengths)


def example_batch() -> dict[str, torch.Tensor]:
    """The 4-row export example: short, one padded row, gaps of a few minutes only."""
    b = random_batch(VOCAB, NUMERIC, B=4, T=6, seed=0)
    return padded(with_gaps(b, torch.full((4, 6), 5 * MIN_US)), [6, 6, 4, 6])


def session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class TimeInputs(torch.nn.Module):
    def forward(self, ts, mask):
        valid = mask.bool()
        return previous_gap_seconds(ts, valid, None), relative_seconds(ts, valid, None)


def test_onnx_time_inputs_are_exact(tmp_path):
    """The gap and the relative seconds come out of ONNX Runtime bit-identical to eager (both are
    int64 µs differences): no int64 Clip (ONNX Runtime's CPU kernel returned 0 for any gap in
    [2**31, 2**32) µs) and no INT64_MAX padding fill (exported as INT64_MIN, which shifted every
    padded row's seconds by -2**63 µs)."""
    ex = example_batch()
    path = tmp_path / "time.onnx"
    torch.onnx.export(TimeInputs(), (ex["ts"], ex["attention_mask"]), str(path), input_names=["ts", "mask"],
                      output_names=["gap", "seconds"], dynamic_axes={"ts": {0: "b", 1: "t"}, "mask": {0: "b", 1: "t"}},
                      opset_version=17, dynamo=False)
    sess = session(path)
    hard = hard_batch()
    gaps = TimeInputs()(hard["ts"], hard["attention_mask"])[0]
    assert ((gaps >= 2**31 / 1e6) & (gaps < 2**32 / 1e6)).sum() > 10  # the gaps ONNX Runtime's Clip zeroed
    for b in (hard, ex, hard_batch(B=3, T=40, seed=5)):
        gap, sec = sess.run(None, {"ts": b["ts"].numpy(), "mask": b["attention_mask"].numpy()})
        want_gap, want_sec = TimeInputs()(b["ts"], b["attention_mask"])
        np.testing.assert_array_equal(gap, want_gap.numpy())
        np.testing.assert_array_equal(sec, want_sec.numpy())


def test_onnx_time_gap_encoder_agrees_with_eager(tmp_path):
    """A tiny untrained encoder with time_gap=periodic and time RoPE, exported from the 4-row
    example, agrees with eager on other shapes, padding and gaps (with the int64 Clip the rows'
    36-72 minute gaps read as 0 and the cosine fell to 0.14 here)."""
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, attention=AttentionConfig(n_heads=4), position=PositionConfig(rope="both"))
    cfg.embedding.time_gap = "periodic"
    enc = PLMEncoder(cfg, VOCAB, NUMERIC).eval()
    with torch.no_grad():  # a gap term as large as a trained model's, not the 0.02-std init
        enc.time_gap.linear.weight.normal_(0.0, 1.0)
    emb = Embedder(enc, "mean").eval()
    names = onnx_input_names(VOCAB, NUMERIC)
    export_onnx(emb, example_batch(), names, tmp_path / "enc.onnx")
    sess = session(tmp_path / "enc.onnx")
    wanted = {i.name for i in sess.get_inputs()}
    assert "ts" in wanted
    for b in (hard_batch(empty=False), hard_batch(B=3, T=40, seed=5)):
        got = torch.from_numpy(sess.run(None, {n: b[n].numpy() for n in names if n in wanted})[0])
        with torch.no_grad():
            ref = emb(b)
        agr = cosine_agreement(ref, got)
        assert agr["cosine_min"] >= 0.9999, agr
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
