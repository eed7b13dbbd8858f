"""Recipe probe: pretrain on the full Fashion-MNIST shards and score the teacher's CLS features
with the knn stage's protocol (weighted 20-NN, T = 0.07, all 60k train against the 10k test)
after chosen epochs, in one process. The rows of EXPERIMENTS.md's probe table come from it.

    python -m benchmarks.recipe_probe NAME [section.key=value ...] [eval=1,2]

Shards: runs/probes/shards (made on first use; $RECIPE_PROBES moves runs/probes). Each epoch's
row (seconds of training so far, loss, teacher entropies, k-NN top-1 when evaluated) is printed
and appended to runs/probes/NAME/log.jsonl. Evaluation time is not counted as training time.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from stages import shard
from stages.dino.augment import IMAGENET_MEAN, IMAGENET_STD
from stages.distributed import init_distributed
from stages.knn import knn_classify
from stages.params import validate_params
from stages.pretrain import Trainer
from stages.sources.fashion_mnist import FashionMNIST

ROOT = Path(__file__).resolve().parents[1]
PROBES = Path(os.environ.get("RECIPE_PROBES", ROOT / "runs" / "probes"))


def probe_params(name: str, overrides: list[str]) -> tuple[dict, set[int] | None]:
    cfg = yaml.safe_load((ROOT / "params.yaml").read_text())
    cfg["dataset"]["subset"] = {"train": None, "val": None}
    cfg["paths"]["shards"] = str(PROBES / "shards")
    for key in ("checkpoints", "teacher_backbone", "metrics", "dvclive"):
        cfg["paths"][key] = str(PROBES / name / key)
    eval_epochs = None
    for override in overrides:
        key, value = override.split("=", 1)
        if key == "eval":
            eval_epochs = {int(e) for e in value.split(",")}
            continue
        *sections, last = key.split(".")
        target = cfg
        for section in sections:
            target = target[section]
        target[last] = yaml.safe_load(value)
    return cfg, eval_epochs


def ensure_shards(params) -> None:
    """The shared probe shards, made on first use (by the caller's params: e.g. its encode workers)."""
    if not (PROBES / "shards" / "manifest.json").exists():
        shard.run(params)


@torch.no_grad()
def cls_features(backbone: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> CLS features, prepared as the extract stage does for 28² inputs
    (bf16 autocast on CUDA, as its `precision: auto`)."""
    device = next(backbone.parameters()).device
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    backbone.eval()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = [backbone((batch.to(device).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1) - mean) / std).float()
               for batch in images.split(1000)]
    backbone.train()
    return torch.cat(out).cpu()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    name, overrides = argv[0], argv[1:]
    cfg, eval_epochs = probe_params(name, overrides)
    params = validate_params(cfg)
    ensure_shards(params)
    source = FashionMNIST(params.dataset.root)
    data = {}
    for split in ("train", "val"):
        labels = source.labels(split)
        images = np.stack([source.load(split, i) for i in range(len(labels))])
        data[split] = torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
    eval_epochs = eval_epochs or {params.pretrain.epochs}

    log_path = PROBES / name / "log.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(params, init_distributed())
    clock = {"trained": 0.0, "since": time.perf_counter()}

    def after_epoch() -> None:  # replaces the checkpoint: probes are not resumed
        clock["trained"] += time.perf_counter() - clock["since"]
        epoch = trainer.progress.epoch
        row = {"name": name, "epoch": epoch, "train_s": round(clock["trained"], 1),
               "loss": trainer.progress.history[-1],
               **{k: round(v, 3) for k, v in trainer.last_stats.items()}}
        if epoch in eval_epochs:
            train = cls_features(trainer.teacher.backbone, data["train"][0])
            val = cls_features(trainer.teacher.backbone, data["val"][0])
            row["knn20"] = knn_classify(train, data["train"][1], val, data["val"][1], 20, 0.07, 10)["top1"]
        print(json.dumps(row), flush=True)
        with log_path.open("a") as log:
            log.write(json.dumps(row) + "\n")
        clock["since"] = time.perf_counter()

    trainer.save = after_epoch
    trainer.fit(None)


if __name__ == "__main__":
    main()
