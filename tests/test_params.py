"""The params contract: a bad params file stops a stage with exit status 2 and the key named,
before anything is written; the schema's defaults are the paper's; params.yaml validates and
spells out every key (so DVC, which tracks values written in params.yaml, sees all of them)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tiny_config import tiny_params, write_params
from stages.params import Params, load_params

REPO = Path(__file__).resolve().parents[1]


def _set(params: dict, dotted: str, value: Any) -> dict:
    """Set `a.b.c` in a nested params dict (creating mappings on the way)."""
    *parents, leaf = dotted.split(".")
    node = params
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return params


def _rename(params: dict, dotted: str, new_leaf: str) -> dict:
    *parents, leaf = dotted.split(".")
    node = params
    for key in parents:
        node = node[key]
    node[new_leaf] = node.pop(leaf)
    return params


def _run_stage(stage: str, params_file: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", "--params", str(params_file)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )


def _files_under(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


# (case id, how to break the tiny params, the key path the message must name)
BAD_CASES = [
    ("misspelt key", lambda p: _rename(p, "pretrain.lr", "learning_rate"), "pretrain.learning_rate"),
    ("unknown key", lambda p: _set(p, "knn.temprature", 0.07), "knn.temprature"),
    ("wrong type", lambda p: _set(p, "pretrain.epochs", "ten"), "pretrain.epochs"),
    ("float for int", lambda p: _set(p, "pretrain.batch_size_per_gpu", 32.5), "pretrain.batch_size_per_gpu"),
    ("negative lr", lambda p: _set(p, "pretrain.lr", -0.001), "pretrain.lr"),
    ("teacher_temp zero", lambda p: _set(p, "pretrain.teacher_temp", 0.0), "pretrain.teacher_temp"),
    ("teacher_temp negative", lambda p: _set(p, "pretrain.teacher_temp", -0.04), "pretrain.teacher_temp"),
    ("global crop scale > 1", lambda p: _set(p, "pretrain.global_crops_scale", [0.4, 1.5]), "pretrain.global_crops_scale"),
    ("local crop scale 0", lambda p: _set(p, "pretrain.local_crops_scale", [0.0, 0.4]), "pretrain.local_crops_scale"),
    ("global_crops_number 3", lambda p: _set(p, "pretrain.global_crops_number", 3), "pretrain.global_crops_number"),
    ("warm-up longer than training", lambda p: _set(p, "pretrain.warmup_epochs", 5), "pretrain.warmup_epochs"),
    (
        "missing dataset directory",
        lambda p: _set(_set(p, "dataset.source", "fashion-mnist"), "dataset.root", "/nonexistent/fashion-mnist"),
        "dataset.root",
    ),
    ("section typo", lambda p: _rename(p, "pretrain", "pretrian"), "pretrian"),
    ("resources typo", lambda p: _set(p, "resources.pretrain", {"gpus": 4}), "resources.pretrain.gpus"),
]


STAGE_CASES = [(f"stage {stage}", stage) for stage in ("pretrain", "extract", "knn")]


@dataclass
class BadRun:
    root: Path
    out: Path
    before: set[Path]
    result: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BadRun]:
    """Every bad-params case run as a real `python -m stages.<name> --params bad.yaml`, the
    processes started together (each one mostly waits on imports)."""
    jobs = [(case, "shard", breaker) for case, breaker, _ in BAD_CASES]
    jobs += [(case, stage, lambda p: _set(p, "extract.pooling", "mean")) for case, stage in STAGE_CASES]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    started = {}
    for case, stage, breaker in jobs:
        root = tmp_path_factory.mktemp("bad")
        out = root / "out"
        params_file = write_params(root / "bad.yaml", breaker(tiny_params(out)))
        before = _files_under(root)
        proc = subprocess.Popen(
            [sys.executable, "-m", f"stages.{stage}", "--params", str(params_file)],
            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        started[case] = (root, out, before, proc)
    runs = {}
    for case, (root, out, before, proc) in started.items():
        stdout, stderr = proc.communicate(timeout=300)
        runs[case] = BadRun(root, out, before, subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return runs


@pytest.mark.faults
@pytest.mark.parametrize("case,key", [(c[0], c[2]) for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_params_exit_2_naming_the_key_before_writing(bad_runs: dict[str, BadRun], case: str, key: str) -> None:
    run = bad_runs[case]
    assert run.result.returncode == 2, run.result.stderr
    assert key in run.result.stderr, run.result.stderr
    assert "Traceback" not in run.result.stderr
    assert not run.out.exists()
    assert _files_under(run.root) == run.before


@pytest.mark.faults
@pytest.mark.parametrize("case", [c[0] for c in STAGE_CASES])
def test_every_stage_refuses_bad_params(bad_runs: dict[str, BadRun], case: str) -> None:
    run = bad_runs[case]
    assert run.result.returncode == 2, run.result.stderr
    assert "extract.pooling" in run.result.stderr
    assert not run.out.exists()
    assert _files_under(run.root) == run.before


# Values each valid alone but not together: (overrides of the tiny params, the message).
CROSS_FIELD_CASES = [
    ({"pretrain": {"warmup_epochs": 3}}, "pretrain.warmup_epochs = 3 must be <= pretrain.epochs = 2"),
    ({"pretrain": {"warmup_teacher_temp_epochs": 5}}, "pretrain.warmup_teacher_temp_epochs = 5 must be <= pretrain.epochs = 2"),
    ({"pretrain": {"global_crops_number": 1, "local_crops_number": 0}}, "the loss needs at least two views"),
    ({"model": {"embed_dim": 30, "num_heads": 4}}, "model.num_heads = 4 must divide model.embed_dim = 30"),
    ({"model": {"arch": "vit_small", "embed_dim": None, "num_heads": 5}}, "model.num_heads = 5 must divide model.embed_dim = 384"),
    ({"model": {"img_size": 18}}, "model.img_size = 18 is not a multiple of model.patch_size = 4"),
    ({"model": {"in_chans": 1}}, "model.in_chans = 1: every stage feeds the backbone RGB images"),
]


@pytest.mark.parametrize("overrides,message", CROSS_FIELD_CASES, ids=[m[:40] for _, m in CROSS_FIELD_CASES])
def test_inconsistent_values_are_refused_naming_both_keys(tmp_path: Path, overrides: dict, message: str) -> None:
    from stages.params import ParamsError, validate_params

    with pytest.raises(ParamsError, match=re.escape(message)):
        validate_params(tiny_params(tmp_path, **overrides))


def test_resnet50_has_no_heads_or_patches_to_check(tmp_path: Path) -> None:
    from stages.params import validate_params

    validate_params(tiny_params(tmp_path, model={"arch": "resnet50", "img_size": 18, "embed_dim": None,
                                                 "num_heads": None, "depth": None}))


def test_unreadable_params_file_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain: [unclosed\n")
    result = _run_stage("shard", bad, cwd=tmp_path)
    assert result.returncode == 2
    assert "bad.yaml" in result.stderr
    missing = _run_stage("shard", tmp_path / "missing.yaml", cwd=tmp_path)
    assert missing.returncode == 2
    assert "missing.yaml" in missing.stderr


# The reference implementation's defaults (facebookresearch/dino main_dino.py, eval_knn.py) and the
# paper's (Caron et al. 2021, Sec. 4 and Appendix), written out by hand: (section, key, value).
PAPER_DEFAULTS = [
    ("model", "arch", "vit_small"),
    ("model", "patch_size", 16),
    ("model", "img_size", 224),
    ("model", "drop_path_rate", 0.1),
    ("pretrain", "out_dim", 65536),
    ("pretrain", "head_hidden_dim", 2048),
    ("pretrain", "head_bottleneck_dim", 256),
    ("pretrain", "head_nlayers", 3),
    ("pretrain", "use_bn_in_head", False),
    ("pretrain", "norm_last_layer", True),
    ("pretrain", "student_temp", 0.1),
    ("pretrain", "teacher_temp", 0.04),
    ("pretrain", "warmup_teacher_temp", 0.04),
    ("pretrain", "warmup_teacher_temp_epochs", 0),
    ("pretrain", "center_momentum", 0.9),
    ("pretrain", "momentum_teacher", 0.996),
    ("pretrain", "optimizer", "adamw"),
    ("pretrain", "lr", 0.0005),
    ("pretrain", "min_lr", 1e-6),
    ("pretrain", "weight_decay", 0.04),
    ("pretrain", "weight_decay_end", 0.4),
    ("pretrain", "clip_grad", 3.0),
    ("pretrain", "warmup_epochs", 10),
    ("pretrain", "epochs", 100),
    ("pretrain", "batch_size_per_gpu", 64),
    ("pretrain", "freeze_last_layer", 1),
    ("pretrain", "global_crops_number", 2),
    ("pretrain", "global_crops_scale", (0.4, 1.0)),
    ("pretrain", "local_crops_number", 8),
    ("pretrain", "local_crops_scale", (0.05, 0.4)),
    ("pretrain", "global_crops_size", 224),
    ("pretrain", "local_crops_size", 96),
    ("pretrain", "teacher", "ema"),
    ("pretrain", "loss", "ce"),
    ("pretrain", "teacher_output", "centering"),
    ("extract", "resize", 256),
    ("extract", "crop_size", 224),
    ("extract", "pooling", "cls"),
    ("knn", "temperature", 0.07),
    ("knn", "k", (10, 20, 100, 200)),
    # eval_linear.py: SGD lr 0.001 at batch 256 (128 per GPU x 8 GPUs), 100 epochs, CLS of 4 blocks
    ("linear", "mode", "full"),
    ("linear", "lr", 0.001),
    ("linear", "batch_size", 1024),
    ("linear", "epochs", 100),
    ("linear", "momentum", 0.9),
    ("linear", "weight_decay", 0.0),
    ("linear", "n_last_blocks", 4),
    ("linear", "avgpool_patchtokens", False),
    ("linear", "train_crop_size", 224),
    ("linear", "resize", 256),
    ("linear", "crop_size", 224),
    # Table 12: 1% and 10% of the labels
    ("fewshot", "fractions", (0.01, 0.1)),
    # visualize_attention.py and Fig. 4: 480x480 images, masks keeping 60% of the attention mass
    ("attention", "image_size", 480),
    ("attention", "threshold", 0.6),
    # Appendix H: PCA to 30 dimensions, perplexity 20
    ("tsne", "pca_dim", 30),
    ("tsne", "perplexity", 20.0),
    # eval_image_retrieval.py / eval_copy_detection.py
    ("retrieval", "imsize", 224),
    ("retrieval", "multiscale", False),
    ("retrieval", "kappas", (1, 5, 10)),
    ("copydetect", "imsize", 320),
    ("copydetect", "topk", 20),
    # eval_video_segmentation.py: 7 context frames, +-12 patch window, top-5, exp(cos / 0.1), 480p
    ("davis", "n_last_frames", 7),
    ("davis", "size_mask_neighborhood", 12),
    ("davis", "topk", 5),
    ("davis", "temperature", 0.1),
    ("davis", "short_side", 480),
    # DeiT's fine-tuning recipe (Table 6), the CIFAR schedule the authors gave (1000 epochs, batch 768)
    ("transfer", "epochs", 1000),
    ("transfer", "batch_size", 768),
    ("transfer", "lr", 0.0005),
    ("transfer", "min_lr", 1e-5),
    ("transfer", "warmup_epochs", 5),
    ("transfer", "weight_decay", 0.05),
    ("transfer", "label_smoothing", 0.1),
    ("transfer", "mixup", 0.8),
    ("transfer", "cutmix", 1.0),
    ("transfer", "randaugment_ops", 2),
    ("transfer", "randaugment_magnitude", 9),
]


@pytest.mark.parametrize("section,key,expected", PAPER_DEFAULTS, ids=[f"{s}.{k}" for s, k, _ in PAPER_DEFAULTS])
def test_schema_defaults_are_the_papers(section: str, key: str, expected: Any) -> None:
    value = getattr(getattr(Params(), section), key)
    assert value == expected
    assert type(value) is type(expected)


def test_params_yaml_validates() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.dataset.source == "fashion-mnist"
    assert params.dataset.root == "/usr/share/datasets/fashion-mnist"


def _leaf_keys(data: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and key != "subset":
            keys |= _leaf_keys(value, f"{dotted}.")
        else:
            keys.add(dotted)
    return keys


def _dvc_tracked() -> tuple[set[str], set[str]]:
    """(params sections or keys some dvc.yaml stage lists, `paths.*` keys dvc.yaml templates)."""
    text = (REPO / "dvc.yaml").read_text()
    tracked = set()
    for stage in yaml.safe_load(text)["stages"].values():
        for entry in stage.get("params", []):
            tracked |= set(entry) if isinstance(entry, dict) else {entry}
    return tracked, set(re.findall(r"\$\{(paths\.[A-Za-z0-9_]+)\}", text))


def test_params_yaml_spells_out_every_key_dvc_tracks() -> None:
    """DVC sees only the values written in params.yaml: a key of a tracked section left to its
    schema default is invisible to it (a changed default would rerun nothing), and a `${paths.x}`
    of dvc.yaml must be written there for DVC's templating."""
    written = _leaf_keys(yaml.safe_load((REPO / "params.yaml").read_text()))
    # every key of the validated file, defaults filled in (a section given where the default is
    # null, as transfer.dataset, with all of its keys)
    schema = _leaf_keys(load_params(REPO / "params.yaml").model_dump(mode="json"))
    sections, paths = _dvc_tracked()
    assert sections and paths
    needed = {key for key in schema if any(key == t or key.startswith(t + ".") for t in sections)} | paths
    missing = needed - written
    assert not missing, f"params.yaml lacks {sorted(missing)}"


def test_params_yaml_documents_every_key() -> None:
    """Every key of params.yaml carries a comment on its line; the per-rule `resources.<rule>`
    blocks share one set of keys, documented once."""
    documented: dict[str, bool] = {}
    stack: list[tuple[int, str]] = []
    for line in (REPO / "params.yaml").read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or ":" not in stripped.split("#")[0]:
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, stripped.split(":")[0]))
        path = [key for _, key in stack]
        if path[0] == "resources" and len(path) > 2:
            path[1] = "<rule>"
        dotted = ".".join(path)
        documented[dotted] = documented.get(dotted, False) or "#" in line
    undocumented = sorted(key for key, ok in documented.items() if not ok)
    assert not undocumented, f"params.yaml keys without a comment: {undocumented}"
