"""One rank of the DistributedBatchNorm checks, started twice by tests/test_sync_batchnorm.py with
torchrun-style variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and the gloo backend.

    python tests/sync_batchnorm_worker.py bn DIR        # DIR/cases.pt in, DIR/rank<R>.pt out
    python tests/sync_batchnorm_worker.py pretrain DIR  # DIR/params.yaml in, DIR/rank<R>.pt out

`bn`: each rank runs the cases' BatchNorm, converted, on its rows of the batch (two training steps
with backward, then eval) and saves what it saw; the test compares with nn.BatchNorm on the whole
batch. `pretrain`: each rank trains the tiny DINO with the stage's Trainer and saves its teacher.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from stages.distributed import cleanup, init_distributed  # noqa: E402


def run_bn_cases(directory: Path, rank: int) -> dict:
    from stages.dino.sync_batchnorm import DistributedBatchNorm, convert_distributed_batchnorm

    seen = {}
    for name, case in torch.load(directory / "cases.pt").items():
        bn = getattr(torch.nn, case["kind"])(**case["kwargs"])
        bn.load_state_dict(case["state"])
        bn = convert_distributed_batchnorm(bn)
        assert isinstance(bn, DistributedBatchNorm)
        rows = slice(*case["rows"][rank])
        steps = []
        for x, g in zip(case["inputs"], case["output_grads"]):
            x = x[rows].clone().requires_grad_(True)
            bn.zero_grad()
            out = bn(x)
            (out * g[rows]).sum().backward()
            steps.append({"out": out.detach(), "input_grad": x.grad,
                          **{f"{k}_grad": p.grad.clone() for k, p in bn.named_parameters()}})
        state = {k: v.clone() for k, v in bn.state_dict().items()}
        bn.eval()
        seen[name] = {"steps": steps, "state": state, "eval_out": bn(case["inputs"][0][rows]).detach()}
    return seen


def norm_types(module: torch.nn.Module) -> list[str]:
    """The class names of the BatchNorm layers in `module`."""
    return sorted({type(m).__name__ for m in module.modules()
                   if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)})


def run_pretrain(directory: Path, info) -> dict:
    from stages.params import load_params
    from stages.pretrain import Trainer

    params = load_params(directory / "params.yaml")
    trainer = Trainer(params, info)
    trainer.fit()
    resumed = Trainer(params, info)  # a restart: the converted models read the checkpoint
    return {"teacher": trainer.teacher.state_dict(), "steps": trainer.progress.global_step,
            "teacher_norms": norm_types(trainer.teacher), "student_norms": norm_types(trainer.student),
            "resumed": resumed.try_resume(), "resumed_teacher": resumed.teacher.state_dict()}


if __name__ == "__main__":
    mode, directory = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    info = init_distributed(backend="gloo")
    assert dist.is_initialized() and info.world_size == 2
    result = run_bn_cases(directory, info.rank) if mode == "bn" else run_pretrain(directory, info)
    torch.save(result, directory / f"rank{info.rank}.pt")
    cleanup()
