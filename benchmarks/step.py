"""Throughput of one DINO training step (student fwd+bwd, teacher fwd, loss, clip, AdamW, EMA) on
synthetic device-resident crops, through the same Trainer.train_step that pretraining runs.

    python -m benchmarks.step --arch vit_small --patch 16 --batch 64 [--compile] [--cuda-graphs] [--device cuda]

Prints one JSON line: device, torch version, config, img/s, ms/step, peak memory, MFU.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.device import bf16_peak, device_name, peak_memory_gib, synchronize
from stages.dino.graphed_step import WARM_STEPS
from stages.distributed import init_distributed
from stages.params import validate_params
from stages.pretrain import Trainer


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step")
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--local-crops", type=int, default=8)
    parser.add_argument("--out-dim", type=int, default=65536)
    parser.add_argument("--embed-dim", type=int, default=None, help="tiny CPU smoke runs")
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--cuda-graphs", action="store_true", help="record the step as a CUDA graph")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    return parser.parse_args(argv)


def synthetic_views(args: argparse.Namespace, device: torch.device) -> list[torch.Tensor]:
    """Device-resident random crops: 2 global (args.global_size²), args.local_crops local."""
    views = [torch.randn(args.batch, 3, args.global_size, args.global_size, device=device) for _ in range(2)]
    return views + [torch.randn(args.batch, 3, args.local_size, args.local_size, device=device)
                    for _ in range(args.local_crops)]


def main(argv=None) -> dict:
    args = parse(argv)
    params = validate_params({
        "dataset": {"source": "digits"},
        "model": {"arch": args.arch, "patch_size": args.patch, "img_size": args.global_size,
                  "embed_dim": args.embed_dim, "depth": args.depth, "num_heads": args.heads},
        "pretrain": {"batch_size_per_gpu": args.batch, "out_dim": args.out_dim,
                     "global_crops_size": args.global_size, "local_crops_size": args.local_size,
                     "local_crops_number": args.local_crops, "precision": args.precision,
                     "compile": args.compile, "cuda_graphs": args.cuda_graphs, "device": args.device,
                     "warmup_epochs": 0},
    })
    # Model FLOPs from an eager step: the first with CUDA graphs (later ones are replays the
    # counter cannot see), else one after the warm-up (torch.compile has compiled by then).
    warmup = max(args.warmup, WARM_STEPS + 2) if args.cuda_graphs else args.warmup
    counted = 0 if args.cuda_graphs else warmup
    dist = init_distributed()
    trainer = Trainer(params, dist, steps_per_epoch=warmup + args.steps + 1)
    device = trainer.device
    views = synthetic_views(args, device)

    def step() -> None:
        trainer.train_step(views)
        trainer.progress.global_step += 1

    for index in range(warmup + 1):
        if index == counted:
            with FlopCounterMode(display=False) as counter:
                step()
            flops = counter.get_total_flops()
        else:
            step()
    trainer.check_losses()
    synchronize(device)
    if device.type == "cuda" and not args.cuda_graphs:  # a replay allocates nothing: keep the recording's peak
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    trainer.check_losses()
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    peak = bf16_peak(device)
    result = {
        "benchmark": "step",
        "device": device_name(device),
        "torch": torch.__version__,
        "config": {k: v for k, v in vars(args).items()} | {"precision": trainer.precision},
        "images_per_second": args.batch / seconds,
        "ms_per_step": seconds * 1000,
        "peak_memory_gib": peak_memory_gib(device),
        "model_tflop_per_step": flops / 1e12,
        "mfu": flops / seconds / peak if peak else None,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
