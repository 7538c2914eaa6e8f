"""`plm-eval embeddings=PATH raw=DIR out=DIR [labels=PATH] [cutoff=ISO] [key=value ...]`.

Frozen-probe evaluation of exported user embeddings against a hand-built aggregate baseline
(see `plm.eval.run.run_eval` and docs/evaluation.md). Writes `out/report.md`,
`out/report.json` and `out/figures/*.png`; prints a summary table.
"""

from __future__ import annotations

import plm.eval.config  # noqa: F401  (registers eval_schema before hydra composes)
from plm.cli.app import cli_errors, hydra_app
from plm.eval.config import EvalConfig


@hydra_app("eval")
def main(cfg: EvalConfig) -> None:
    from plm.eval.run import run_eval

    with cli_errors("plm-eval"):
        run_eval(cfg)


if __name__ == "__main__":
    main()
