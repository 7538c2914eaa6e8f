"""Worker of tests/dist/test_dist.py: the contrastive loss's all-gather with gradients.

    torchrun --nproc_per_node=2 tests/dist/gather_worker.py OUT

Each rank holds its rows (rank::world) of the same two views and computes `info_nce` against the
gathered batch; writes its loss and the gradient of its rows to OUT/gather-<rank>.json, and
whether a FutureWarning (a deprecated collective) was raised."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from plm.train.objectives import info_nce

N, D = 8, 5


def views() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    z1, z2 = (z[rank::world].clone().requires_grad_(True) for z in views())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss, _ = info_nce(z1, z2, 0.1, gather=True)
        loss.backward()
    future = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    (out / f"gather-{rank}.json").write_text(json.dumps({"loss": loss.item(), "g1": z1.grad.tolist(),
                                                          "g2": z2.grad.tolist(), "future_warnings": future}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
