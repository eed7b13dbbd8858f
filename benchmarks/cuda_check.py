"""CUDA checks that CPU tests cannot make (run on a GPU machine; prints one JSON line).

1. One training step on CUDA in fp32 equals the same step on the CPU (loss, center, teacher).
2. The tiny DAG through the stage functions on CUDA with bf16 and batched augmentation:
   shard → pretrain → extract → knn, loss finite, k-NN above chance.

    python -m benchmarks.cuda_check [--workdir DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.device import device_name
from stages import extract, knn, pretrain, shard
from stages.distributed import init_distributed
from stages.params import validate_params

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_config import tiny_params  # noqa: E402


def one_step(raw: dict, device: str, views: list[torch.Tensor]) -> dict:
    raw = copy.deepcopy(raw)
    raw["pretrain"].update(device=device, precision="fp32")
    trainer = pretrain.Trainer(validate_params(raw), init_distributed(), steps_per_epoch=10)
    loss = trainer.train_step([v.clone() for v in views])
    return {"loss": float(loss), "center": trainer.loss.center.cpu(),
            "teacher": {k: v.cpu() for k, v in trainer.teacher.state_dict().items()}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cuda_check")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="dino-cuda-"))
    raw = tiny_params(root)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(32, 3, 16, 16, generator=g) for _ in range(2)] + [torch.randn(32, 3, 8, 8, generator=g) for _ in range(2)]
    cpu, gpu = one_step(raw, "cpu", views), one_step(raw, "cuda", views)
    teacher_diff = max(float((cpu["teacher"][k].float() - gpu["teacher"][k].float()).abs().max()) for k in cpu["teacher"])
    result = {
        "benchmark": "cuda_check",
        "device": device_name(torch.device("cuda")),
        "torch": torch.__version__,
        "step_loss_cpu": cpu["loss"], "step_loss_cuda": gpu["loss"],
        "step_center_max_diff": float((cpu["center"] - gpu["center"]).abs().max()),
        "step_teacher_max_diff": teacher_diff,
    }
    raw["pretrain"].update(device="cuda", precision="bf16", augment="batch", epochs=4)
    raw["extract"].update(device="cuda")
    params = validate_params(raw)
    start = time.perf_counter()
    shard.run(params)
    trainer = pretrain.Trainer(params, init_distributed())  # pretrain.run minus dvclive logging
    result["pretrain"] = trainer.fit(live=None)
    pretrain.export_teacher(trainer, params.paths.teacher_backbone)
    extract.run(params)
    result["knn"] = knn.run(params)
    result["dag_seconds"] = time.perf_counter() - start
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
