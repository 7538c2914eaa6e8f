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
        extra = None
        if cfg.ckpt:
            from plm.eval.next_event import decoder_sections

            if not cfg.data:
                raise ValueError("ckpt= needs data= (the prepared folder the decoder was trained on)")
            extra = decoder_sections(cfg.ckpt, cfg.data, cfg.next_split, cfg.next_max_batches, cfg.generate_users,
                                     cfg.generate_horizon, cfg.seed)
        run_eval(cfg, extra_sections=extra)


if __name__ == "__main__":
    main()
