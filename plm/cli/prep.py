"""`plm-prep raw=DIR out=DIR [cutoff=ISO-TIME] [key=value ...]`: raw events -> prepared sequences.

Runs a local Spark session by default (`spark.master=local[*]`); point `spark.master` and
`spark.conf` at a cluster to run the same job there. See `data_prep.prep` and the README.
"""

from __future__ import annotations

from plm.cli.app import cli_errors, hydra_app
from plm.config import PrepConfig


@hydra_app("prep")
def main(cfg: PrepConfig) -> None:
    from data_prep.prep import run_prep

    with cli_errors("plm-prep"):
        m = run_prep(cfg)
    print(f"plm-prep: wrote {cfg.out} (cutoff {m['cutoff']}); manifest: {cfg.out}/manifest.json")


if __name__ == "__main__":
    main()
