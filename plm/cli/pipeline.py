"""`plm-pipeline raw=DIR out=DIR [preset=cpu-small] [key=value ...]`: prep -> pre-train -> export
-> eval (when DIR/labels.parquet exists), each stage as its own CLI would run it. See
`plm.pipeline` for the output layout."""

from __future__ import annotations

import sys

import plm.pipeline  # noqa: F401  (registers pipeline_schema)
from plm.cli.app import hydra_app


@hydra_app("pipeline")
def main(cfg) -> None:
    from plm.data.schema import ContractError
    from plm.pipeline import run_pipeline

    try:
        rec = run_pipeline(cfg)
    except (ContractError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"plm-pipeline: error: {e}", file=sys.stderr)
        sys.exit(2)
    ev = rec["stages"].get("eval", {})
    where = ev.get("report") or f"(no report: {ev.get('skipped', 'eval not run')})"
    print(f"plm-pipeline: done in {rec['seconds']:.0f} s; outputs in {rec['out']}; report: {where}")


if __name__ == "__main__":
    main()
