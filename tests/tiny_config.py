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


#: Output folders of the evaluation stages outside `paths:` (section -> {key: path under root}).
OUTPUT_FOLDERS = {
    "retrieval": {"fixture": "data/fixtures/revisitop"},
    "copydetect": {"fixture": "data/fixtures/copydays"},
    "davis": {"fixture": "data/fixtures/davis", "results": "results/davis"},
}

#: Sizes of the evaluation stages for a run of the whole DAG on the tiny config (each stage a few
#: seconds on 2 CPU cores): pass as `tiny_params(root, **TINY_EVALUATIONS)`.
TINY_EVALUATIONS = {
    "knn": {"k": [5, 10], "baselines": False},
    "linear": {"mode": "features", "epochs": 5, "batch_size": 64, "lr": 0.1, "num_workers": 0, "device": "cpu"},
    "fewshot": {"fractions": [0.1], "max_iter": 100},
    "attention": {"image_size": 32, "baselines": False, "device": "cpu"},
    "tsne": {"max_iter": 250},
    "retrieval": {"imsize": 32, "num_workers": 0, "device": "cpu"},
    "copydetect": {"imsize": 32, "batch_size": 64, "num_workers": 0, "device": "cpu"},
    "davis": {"short_side": 32, "long_side_multiple": 16, "n_last_frames": 2, "size_mask_neighborhood": 4,
              "device": "cpu"},
    "transfer": {"epochs": 1, "warmup_epochs": 0, "batch_size": 64, "crop_size": 16, "resize": 16,
                 "num_workers": 0, "device": "cpu"},
    "report": {"title": "DINO on the tiny test configuration"},  # DVC tracks the section: it must be written
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
        "logs": str(root / "logs"),
        "linear": str(root / "models/linear"),
        "fewshot_subsets": str(root / "metrics/fewshot_subsets.json"),
        "transfer": str(root / "models/transfer"),
        "report": str(root / "report"),
    }
    # the evaluation stages' own output folders (fixtures regenerated when their root is null)
    for section, keys in OUTPUT_FOLDERS.items():
        params.setdefault(section, {}).update({key: str(root / rel) for key, rel in keys.items()})
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
