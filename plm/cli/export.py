"""`plm-export ckpt=RUN/final.pt data=PREPARED out=PATH [key=value ...]`: user embeddings
(Parquet per spec/outputs.md), or `format=onnx` for the encoder as an ONNX graph. See
`plm.export.run` and the README. Multi-process: `torchrun --nproc_per_node=N -m plm.cli.export ...
trainer=ddp` (one Parquet part per rank). Raw tables on a Spark cluster: `raw=DIR` (with
`spark.master=...`; plm.export.spark)."""

from __future__ import annotations

from plm.cli.app import cli_errors, hydra_app


@hydra_app("export")
def main(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from plm.export.config import check_trainer_overrides
    from plm.export.run import run_export

    with cli_errors("plm-export"):
        check_trainer_overrides(list(HydraConfig.get().overrides.task), raw=bool(cfg.raw))
        rec = run_export(cfg)
    if "rank" in rec:  # not rank 0
        return
    if cfg.format == "onnx":
        agr = ", ".join(f"{k} cosine min {v['cosine_min']:.5f}" for k, v in rec["agreement"].items())
        print(f"plm-export: wrote {cfg.out}/{rec['files']['fp32']} ({agr}); details {cfg.out}/onnx.json")
        return
    thr = rec["throughput"]
    extra = "".join(f"; {k.replace('_vs_', ' vs ').replace('_', ' ')} cosine min {v['cosine_min']:.5f}"
                    for k, v in rec["agreement"].items())
    print(f"plm-export: {rec['outputs']['users']} users x {rec['outputs']['dim']} -> {cfg.out} "
          f"({len(rec['outputs']['parts'])} part(s); {thr['users_per_s']:.0f} users/s, "
          f"{thr['events_per_s']:.0f} events/s{extra}); record {cfg.out}/_export.json")


if __name__ == "__main__":
    main()
