"""The tiny, fast configuration every end-to-end test uses (digits, a 2-block 32-dim ViT).

A module of its own (not conftest.py) so that tests in sub-folders, which have a conftest.py of
their own, import it unambiguously: `from tiny_config import tiny_params`."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

TINY = {
    "dataset": {
        "source": "digits",
        "root": None,
        "subset": {"train": 300, "val": 100},
        "seed": 0,
        "shard_max_samples": 100,
    },
    "model": {
        "arch": "vit_tiny",
        "patch_size": 4,
        "img_size": 16,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
    },
    "pretrain": {
        "epochs": 2,
        "batch_size_per_gpu": 32,
        "device": "cpu",
        "precision": "fp32",
        "num_workers": 0,
        "out_dim": 64,
        "head_hidden_dim": 64,
        "head_bottleneck_dim": 16,
        "lr": 0.002,
        "warmup_epochs": 0,
        "global_crops_size": 16,
        "local_crops_size": 8,
        "local_crops_number": 2,
        "global_crops_scale": [0.5, 1.0],
        "local_crops_scale": [0.2, 0.5],
    },
    "extract": {"resize": 16, "crop_size": 16, "batch_size": 64, "num_workers": 0, "device": "cpu"},
    "knn": {"k": [5, 10]},
}


def tiny_params(root: Path, **overrides: dict) -> dict:
    """The tiny params with every path under `root`; `overrides` maps section -> {key: value}."""
    params = copy.deepcopy(TINY)
    params["paths"] = {
        "shards": str(root / "data/shards/digits"),
        "checkpoints": str(root / "checkpoints"),
        "teacher_backbone": str(root / "models/teacher_backbone.pth"),
        "features": str(root / "features/digits"),
        "metrics": str(root / "metrics"),
        "plots": str(root / "plots"),
        "dvclive": str(root / "dvclive"),
    }
    for section, values in overrides.items():
        params.setdefault(section, {}).update(values)
    return params


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def save_random_teacher(params, seed: int = 0):
    """A randomly initialised teacher backbone of ``params.model`` (validated params), seeded with
    `seed` through torch's global RNG, saved to ``paths.teacher_backbone`` as the pretrain stage
    exports it ({"teacher_backbone": state_dict, "model": the model section}); returns it in
    eval mode."""
    import torch

    from stages.atomic import torch_save
    from stages.dino.backbones import build_backbone_from_params

    torch.manual_seed(seed)
    backbone = build_backbone_from_params(params.model, drop_path_rate=0.0)
    torch_save({"teacher_backbone": backbone.state_dict(), "model": params.model.model_dump(mode="json")},
               params.paths.teacher_backbone)
    return backbone.eval()
