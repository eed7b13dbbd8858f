"""CUDA checks that CPU tests cannot make (run on a GPU machine; prints one JSON line).

1. One training step on CUDA in fp32 equals the same step on the CPU (loss, center, teacher).
2. Ten steps recorded and replayed as CUDA graphs (`pretrain.cuda_graphs`; two epochs, so both
   graphs, last layer frozen and not) equal ten eager steps on CUDA (fp32, no stochastic depth).
3. The batched augmentation as arranged for a GPU (whole batch, torch.where selection, one blend
   per ColorJitter position, blur as matrices) renders on CUDA the views the CPU renders from the
   same draws (differences in 1/255: the resampling's 8-bit rounding may flip a level).
4. The tiny DAG through the stage functions on CUDA with bf16 and batched augmentation:
   shard → pretrain → extract → knn, loss finite, k-NN above chance; and a new trainer resumes
   from the checkpoint it wrote (`resume_on_cuda`: true).

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
from stages.device import device_constant
from stages.dino import augment_batch as ab
from stages.dino.augment import IMAGENET_MEAN, IMAGENET_STD
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


def ten_steps(raw: dict, cuda_graphs: bool) -> dict:
    """Ten fp32 steps on CUDA over two epochs of 5 (new views every step, no stochastic depth)."""
    raw = copy.deepcopy(raw)
    raw["model"]["drop_path_rate"] = 0.0
    raw["pretrain"].update(device="cuda", precision="fp32", cuda_graphs=cuda_graphs, epochs=2)
    trainer = pretrain.Trainer(validate_params(raw), init_distributed(), steps_per_epoch=5)
    g = torch.Generator().manual_seed(1)
    losses = []
    for it in range(10):
        trainer.progress.epoch = it // 5
        views = [torch.randn(32, 3, 16, 16, generator=g) for _ in range(2)] + [torch.randn(32, 3, 8, 8, generator=g) for _ in range(2)]
        losses.append(trainer.train_step(views))
        trainer.progress.global_step += 1
    return {"losses": [float(loss) for loss in losses], "center": trainer.loss.center.cpu(),
            "teacher": {k: v.cpu() for k, v in trainer.teacher.state_dict().items()}}


def augment_diff() -> dict:
    """Check 3: max and mean |CUDA − CPU| over every view, in 1/255."""
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (16, 3, 120, 160), dtype=torch.uint8, generator=g)
    aug = ab.BatchMultiCrop(local_crops_number=2, global_size=96, local_size=32, resample="matmul")
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    diffs = []
    for view in aug.views:
        draws = ab.draw_views(16, 120, 160, [view], g)
        on_cuda = ab.ViewDraws(*(None if t is None else t.cuda() for t in vars(draws).values()))
        rendered = [ab.render_view(source, d, view[0], "matmul",
                                   device_constant(IMAGENET_MEAN, source.device).view(1, 3, 1, 1),
                                   device_constant(IMAGENET_STD, source.device).view(1, 3, 1, 1))
                    for source, d in ((images, draws), (images.cuda(), on_cuda))]
        diffs.append(((rendered[1].cpu() - rendered[0]) * std * 255).abs().flatten())
    diffs = torch.cat(diffs)
    return {"augment_max_diff": float(diffs.max()), "augment_mean_diff": float(diffs.mean())}


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


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
    teacher_diff = max_diff(cpu["teacher"], gpu["teacher"])
    result = {
        "benchmark": "cuda_check",
        "device": device_name(torch.device("cuda")),
        "torch": torch.__version__,
        "step_loss_cpu": cpu["loss"], "step_loss_cuda": gpu["loss"],
        "step_center_max_diff": float((cpu["center"] - gpu["center"]).abs().max()),
        "step_teacher_max_diff": teacher_diff,
    }
    try:
        eager, graphed = ten_steps(raw, False), ten_steps(raw, True)
        result |= {
            "graphs_losses_eager": eager["losses"], "graphs_losses_graphed": graphed["losses"],
            "graphs_center_max_diff": float((eager["center"] - graphed["center"]).abs().max()),
            "graphs_teacher_max_diff": max_diff(eager["teacher"], graphed["teacher"]),
        }
    except Exception as exc:  # report and go on to the DAG check
        result["graphs_error"] = repr(exc)
    result |= augment_diff()
    raw["pretrain"].update(device="cuda", precision="bf16", augment="batch", epochs=4)
    raw["extract"].update(device="cuda")
    params = validate_params(raw)
    start = time.perf_counter()
    shard.run(params)
    trainer = pretrain.Trainer(params, init_distributed())  # pretrain.run minus dvclive logging
    result["pretrain"] = trainer.fit(live=None)
    try:  # a preempted GPU run resumes from the checkpoint just written (loaded onto the GPU)
        resumed = pretrain.Trainer(params, init_distributed())
        result["resume_on_cuda"] = resumed.try_resume() and resumed.progress.global_step == trainer.progress.global_step
    except Exception as exc:
        result["resume_on_cuda"] = repr(exc)
    pretrain.export_teacher(trainer, params.paths.teacher_backbone)
    extract.run(params)
    result["knn"] = knn.run(params)
    result["dag_seconds"] = time.perf_counter() - start
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
