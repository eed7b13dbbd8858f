"""DINO learns (issue 8's learning test, not a timing test): the demo recipe (params.yaml's
model and pretrain sections: batch 128 in one CPU process, unchanged but for the epochs) trained
on 5,000 Fashion-MNIST images for 12 epochs (468 steps, about 4 minutes on 2 cores) gives teacher
CLS features whose weighted 20-NN accuracy on 1,000 test images beats a randomly initialised
backbone of the same architecture by MARGIN points.

The margin was measured, not guessed: 63.5 % against 57.7 % for the random initialisation on this
2-core CPU (2026-11-26; the run is deterministic on a given CPU), so MARGIN leaves 2.8 points for
other CPUs' arithmetic. Learning at this size needs images more than steps: with the earlier
recipe (2 processes, rising weight decay) 6 epochs gave +0.6 and 12 epochs +3.4.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages import extract, knn, shard
from stages.params import validate_params

ROOT = Path(__file__).resolve().parents[1]
FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
EPOCHS = 12
MARGIN = 3.0

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not FMNIST_ROOT.is_dir(), reason="dataset-fashion-mnist not installed (make test installs it as root)"),
]


def demo_params(root: Path) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["paths"] = {key: str(root / value) for key, value in params["paths"].items()}
    params["dataset"].update(root=str(FMNIST_ROOT), subset={"train": 5000, "val": 1000})
    params["pretrain"].update(epochs=EPOCHS, device="cpu", log_every_steps=1000)
    params["extract"].update(device="cpu")
    params["knn"].update(k=[20], baselines=True)
    return params


def test_demo_recipe_beats_random_init_by_a_margin(tmp_path):
    raw = demo_params(tmp_path)
    params = validate_params(raw)
    shard.run(params)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    # As `dvc repro` runs it: the stage starts its pretrain.cpu_processes ranks itself.
    subprocess.run([sys.executable, "-m", "stages.pretrain", "--params", str(params_file)], cwd=ROOT, check=True)
    trained = json.loads((Path(params.paths.metrics) / "pretrain.json").read_text())
    extract.run(params)
    metrics = knn.run(params)
    global_batch = params.pretrain.batch_size_per_gpu * params.pretrain.cpu_processes
    assert trained["steps"] == EPOCHS * (5000 // global_batch)
    assert metrics["top1_k20"] >= metrics["random_top1_k20"] + MARGIN, metrics
