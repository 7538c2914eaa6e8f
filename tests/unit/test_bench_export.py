"""bench/export.py on a tiny hand-written prepared folder (no Spark): every variant is timed in
turn within each round, and the JSON lines say what the README quotes (ratio = ours /
reference, agreement with eager fp32)."""

import json

import pytest
import torch
from conftest import bench_module
from shards import write_prepared


@pytest.fixture(scope="module")
def bench():
    yield from bench_module("export")


def test_variants_are_timed_in_turn_after_warm_up_and_an_untimed_round(bench):
    calls = []

    def variant(name):
        def fn(b):
            calls.append(name)
            return torch.zeros(1, 2)
        return fn

    res = bench.timed({"a": variant("a"), "b": variant("b")}, [{}, {}], repeats=3)
    # warm-up: a's two batches, then b's; then an untimed round and 3 timed ones of (a's pass, b's pass)
    assert calls == ["a", "a", "b", "b"] + ["a", "a", "b", "b"] * (1 + 3)
    assert set(res) == {"a", "b"} and all(t > 0 and v.shape == (2, 2) for t, v in res.values())


def test_bench_prints_one_json_line_per_comparison(bench, tmp_path, capsys):
    data = write_prepared(tmp_path / "prepared")
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--data", str(data), "--ckpt", "", "--sizes", "tiny", "--users", "12", "--max-len", "16",
                           "--repeats", "1", "--no-compile"]) == 0
    finally:
        torch.set_num_threads(threads)  # main() sets --threads for the process
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [r["bench"] for r in lines] == ["export_int8_tiny", "export_onnx_tiny", "export_onnx_int8_tiny"]
    for r in lines:
        assert r["unit"] == "users/s" and r["ours"] > 0 and r["reference"] > 0
        assert r["ratio"] == pytest.approx(r["ours"] / r["reference"], abs=2e-3)
        assert r["cosine_min"] >= 0.99  # every variant embeds the same users like eager fp32
    assert {r["target"] for r in lines} == {1.0, 1.5}
