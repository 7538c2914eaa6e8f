"""`plm-pipeline raw=DIR out=DIR [preset=cpu-small] [key=value ...]`: prep -> pre-train -> export
-> eval (when DIR/labels.parquet exists), each stage as its own CLI would run it. See
`plm.pipeline` for the output layout."""

from __future__ import annotations

import plm.pipeline  # noqa: F401  (registers pipeline_schema)
from plm.cli.app import cli_errors, hydra_app


@hydra_app("pipeline")
def main(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from plm.export.config import check_trainer_overrides
    from plm.pipeline import run_pipeline

    with cli_errors("plm-pipeline"):
        # export.trainer.max_steps=... would be ignored by the export stage, as by plm-export
        check_trainer_overrides([o.lstrip("+~").removeprefix("export.") for o in HydraConfig.get().overrides.task
                                 if o.lstrip("+~").startswith("export.trainer.")])
        rec = run_pipeline(cfg)
    ev = rec["stages"].get("eval", {})
    where = (ev.get("report") if "eval" in rec["stages_run"] else None) or f"(no report: {ev.get('skipped', 'eval not run')})"
    print(f"plm-pipeline: done in {rec['seconds']:.0f} s; outputs in {rec['out']}; report: {where}")


if __name__ == "__main__":
    main()
