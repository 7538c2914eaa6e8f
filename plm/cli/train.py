"""`plm-train data.path=PREPARED model=tiny trainer=cpu objective=masked experiment=NAME ...`:
pre-train a model (see docs/training.md). Hydra's `hydra.run.dir` is the run folder."""

from __future__ import annotations

from plm.cli.app import cli_errors, hydra_app


@hydra_app("train")
def main(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from plm.train.run import train

    hc = HydraConfig.get()
    if not cfg.run_dir:
        cfg.run_dir = hc.runtime.output_dir
    if not cfg.name:
        exp = hc.runtime.choices.get("experiment") or "run"
        over = [o for o in hc.overrides.task if not o.startswith(("data.path=", "run_dir=", "experiment="))]
        cfg.name = ",".join([exp] + over)[:128]
    with cli_errors("plm-train"):
        out = train(cfg)
    if out.get("global_rank", 0) == 0:  # once, not once per DDP process
        print(f"plm-train: run folder {out['run_dir']} (step {out['global_step']}); final weights {out['final']}")


if __name__ == "__main__":
    main()
