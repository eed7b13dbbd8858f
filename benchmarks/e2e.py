"""End-to-end pretraining throughput on real JPEG shards: decode → multi-crop → step.

    python -m benchmarks.e2e --images 2048 --workers 12 --augment pil|batch [--arch vit_small]

Makes an ImageNet-like ImageFolder of 500×375 JPEGs (crops of bundled photos), shards it with the
`shard` stage, then times the real pretraining loader + Trainer.train_step. With --augment pil
the workers decode and crop per sample (the reference's pipeline); with batch the workers only
decode and the crops are made on the training device.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.device import device_name, peak_memory_gib, synchronize
from stages import shard
from stages.dino.graphed_step import WARM_STEPS
from stages.distributed import init_distributed
from stages.params import validate_params
from stages.pretrain import Trainer

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


def make_imagefolder(root: Path, images: int, classes: int = 8, seed: int = 0) -> None:
    import skimage.data

    rng = np.random.default_rng(seed)
    photos = [np.asarray(Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((1000, 750)))
              for name in PHOTOS]
    for split, count in (("train", images), ("val", max(images // 8, classes))):
        for i in range(count):
            photo = photos[i % len(photos)]
            y, x = rng.integers(0, 750 - 375), rng.integers(0, 1000 - 500)
            folder = root / split / f"class{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(photo[y:y + 375, x:x + 500]).save(folder / f"{i:06d}.jpg", quality=90)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.e2e")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--augment", choices=("pil", "batch"), default="pil")
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--cuda-graphs", action="store_true", help="record the step as a CUDA graph")
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--embed-dim", type=int, default=None, help="tiny CPU smoke runs")
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--out-dim", type=int, default=65536)
    parser.add_argument("--local-crops", type=int, default=8)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dino-e2e-"))
    if not (workdir / "images").exists():
        make_imagefolder(workdir / "images", args.images)
    raw = {
        "paths": {k: str(workdir / v) for k, v in {
            "shards": "shards", "checkpoints": "ckpt", "teacher_backbone": "teacher.pth",
            "features": "features", "metrics": "metrics", "plots": "plots", "dvclive": "dvclive"}.items()},
        "dataset": {"source": "imagefolder", "root": str(workdir / "images"), "image_format": "jpg",
                    "num_workers": args.workers},
        "model": {"arch": args.arch, "patch_size": args.patch, "img_size": args.global_size,
                  "embed_dim": args.embed_dim, "depth": args.depth, "num_heads": args.heads},
        "pretrain": {"batch_size_per_gpu": args.batch, "num_workers": args.workers, "augment": args.augment,
                     "decoded_cache_mib": 0,  # the data path under test reads the shards
                     "compile": args.compile, "cuda_graphs": args.cuda_graphs, "warmup_epochs": 0,
                     "epochs": 1, "out_dim": args.out_dim,
                     "global_crops_size": args.global_size, "local_crops_size": args.local_size,
                     "local_crops_number": args.local_crops},
    }
    params = validate_params(raw)
    if not (workdir / "shards" / "manifest.json").exists():
        shard.run(params)
    trainer = Trainer(params, init_distributed())
    device = trainer.device
    timed, start = 0, None
    warmup = max(args.warmup, WARM_STEPS + 2) if args.cuda_graphs else args.warmup  # recording untimed
    for step, batch in enumerate(trainer.batches(0, 0)):
        if step == warmup:
            trainer.check_losses()
            synchronize(device)
            start = time.perf_counter()
        if step == warmup + args.steps:
            break
        trainer.train_step(trainer.views(batch))
        trainer.progress.global_step += 1
        timed = step - warmup + 1
    if timed < 1:
        raise SystemExit(f"e2e: {args.images} images make {trainer.schedules.steps_per_epoch} steps of "
                         f"{args.batch}, not the {warmup} warm-up steps plus timed ones; use more --images")
    trainer.check_losses()
    synchronize(device)
    seconds = time.perf_counter() - start
    result = {
        "benchmark": "e2e",
        "device": device_name(device),
        "torch": torch.__version__,
        "config": vars(args) | {"precision": trainer.precision},
        "images_per_second": timed * args.batch / seconds,
        "ms_per_step": seconds / timed * 1000,
        "peak_memory_gib": peak_memory_gib(device),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
