"""`plm-synth out=DIR users=N seed=S`: write a synthetic payment world (see `data_prep.synth`).

Goes in: the fields of `data_prep.synth.SynthConfig` as hydra overrides. Comes out:
`DIR/{payments,logins,orders}/part-*.parquet` in the raw contract, `DIR/labels.parquet` (one row
per user: segment, churn, ato, future_spend) and `DIR/world.json` (cut-off, counts, label docs).
Example: `plm-synth out=runs/demo/raw users=3000 seed=0 dirty_fraction=0.01`.
"""

from __future__ import annotations

import time

from data_prep.synth import SynthConfig, check_out_dir, generate_world, validate, write_world
from plm.cli.app import cli_errors, hydra_app


def run(cfg: SynthConfig) -> dict:
    """Generate and write the world; print a short summary; return the world's meta."""
    t0 = time.perf_counter()
    with cli_errors("plm-synth"):
        validate(cfg)
        check_out_dir(cfg.out, cfg.overwrite)
    world = generate_world(cfg)
    t_gen = time.perf_counter() - t0
    write_world(world, cfg.out, overwrite=cfg.overwrite, part_rows=cfg.part_rows)
    elapsed = time.perf_counter() - t0
    meta = world["meta"]
    events = meta["events"]
    total = sum(events.values())
    print(f"plm-synth: {meta['users']} users, {meta['merchants']} merchants, cut-off {meta['cutoff']}")
    print("  events: " + ", ".join(f"{s} {n:,}" for s, n in events.items()) + f" (total {total:,})")
    dirty = {s: sum(k.values()) for s, k in meta["dirty"].items() if k}
    if dirty:
        print("  dirty rows: " + ", ".join(f"{s} {n:,}" for s, n in dirty.items()))
    labels = meta["labels"]
    shares = " ".join(f"{c}={p:.2f}" for c, p in zip(labels["segment"]["classes"], labels["segment"]["shares"]))
    print(
        f"  labels: churn {labels['churn']['prevalence']:.3f}, ato {labels['ato']['prevalence']:.3f}, "
        f"future_spend mean {labels['future_spend']['mean']:.2f}, segment {shares}"
    )
    print(f"  {elapsed:.2f}s ({total / max(t_gen, 1e-9):,.0f} events/s generated); written to {cfg.out}")
    return meta


@hydra_app("synth")
def main(cfg: SynthConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
