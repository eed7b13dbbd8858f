"""Frozen-feature extraction throughput: extract_features over synthetic device-resident batches.

    python -m benchmarks.extract --arch vit_small --patch 16 --batch 256 [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.device import device_name, peak_memory_gib, synchronize
from stages.dino.backbones import build_backbone
from stages.extract import extract_features


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.extract")
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--pooling", default="cls")
    parser.add_argument("--embed-dim", type=int, default=None)
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    backbone = build_backbone(args.arch, patch_size=args.patch, img_size=args.size, embed_dim=args.embed_dim,
                              depth=args.depth, num_heads=args.heads)
    batches = [torch.randn(args.batch, 3, args.size, args.size, device=device) for _ in range(2)]
    extract_features(backbone, batches, args.pooling, device=device, progress=False)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    features, _, _ = extract_features(backbone, batches * (args.batches // 2), args.pooling, device=device,
                                      progress=False)
    synchronize(device)
    seconds = time.perf_counter() - start
    result = {
        "benchmark": "extract",
        "device": device_name(device),
        "torch": torch.__version__,
        "config": vars(args),
        "images_per_second": features.shape[0] / seconds,
        "seconds": seconds,
        "peak_memory_gib": peak_memory_gib(device),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
