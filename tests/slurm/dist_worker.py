"""One rank of the distributed checks: `python tests/slurm/dist_worker.py OUT_DIR [--backend gloo]`.

Started by tests/test_distributed.py (torchrun-style variables) and tests/slurm/test_cluster.py
(srun inside an sbatch -n2 job, and plain python in a batch script). It calls
`stages.distributed.init_distributed`, runs each collective on rank-dependent inputs and writes what
it saw to OUT_DIR/rank<R>.json; the tests compute the expected values themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from stages import distributed as D  # noqa: E402


def rows(rank: int, count: int) -> torch.Tensor:
    """The rows rank `rank` contributes: shape (count, 3), value 100*rank + 3*i + j."""
    return (100 * rank + torch.arange(count * 3, dtype=torch.float32)).reshape(count, 3)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--tag", default="", help="prefix of the output file name")
    args = parser.parse_args()

    info = D.init_distributed(backend=args.backend)
    rank = info.rank
    # Element-wise sum and mean of rank-dependent values.
    summed = torch.full((2,), float(rank + 1))
    if info.initialized:
        dist.all_reduce(summed)
    mean = D.all_reduce_mean(torch.tensor([float(rank + 1), 10.0 * (rank + 1)]))
    # Unequal row counts: rank r holds r + 2 rows; then rank 0 holds none.
    gathered = D.all_gather_cat(rows(rank, rank + 2))
    gathered_empty_first = D.all_gather_cat(rows(rank, 0 if rank == 0 else 3))
    labels = D.all_gather_cat(torch.arange(rank + 1, dtype=torch.long) + 10 * rank)
    D.barrier()
    result = {
        "rank": rank,
        "world_size": info.world_size,
        "local_rank": info.local_rank,
        "is_main": info.is_main,
        "initialized": info.initialized,
        "launcher": info.launcher,
        "backend": info.backend,
        "device": str(info.device),
        "get_rank": D.get_rank(),
        "get_world_size": D.get_world_size(),
        "is_main_process": D.is_main_process(),
        "master_addr": os.environ.get("MASTER_ADDR"),
        "master_port": os.environ.get("MASTER_PORT"),
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "sum": summed.tolist(),
        "mean": mean.tolist(),
        "gathered": gathered.tolist(),
        "gathered_empty_first": gathered_empty_first.tolist(),
        "labels": labels.tolist(),
        "labels_dtype": str(labels.dtype),
    }
    D.cleanup()
    result["initialized_after_cleanup"] = dist.is_initialized()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.tag}rank{rank}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
