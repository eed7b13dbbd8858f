"""End to end under Snakemake, on the same tiny config as tests/test_dvc.py and its core stages
(target `knn`): the local profile gives the same outputs and metrics as `dvc repro`, and records
them in DVC (onsuccess) so that `dvc status` is clean; the slurm profile plans every rule of
`all`; `make install-slurm-profile` never overwrites a user's profile."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from test_dvc import ALL_STAGES, REPO, STAGES, TARGET, e2e_params, make_repo, ran, sh, skipped

# Keys of pretrain.json that measure the machine, not the result.
TIMING_WORDS = ("second", "time", "duration", "elapsed", "throughput")


@pytest.fixture(scope="module")
def snake_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_repo(tmp_path_factory.mktemp("snake") / "repo", e2e_params())
    result = sh(root, "snakemake", "--profile", "workflow/profiles/local", "--cores", "2", TARGET)
    assert "recorded in DVC" in result.stdout + result.stderr, result.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_repo(tmp_path_factory.mktemp("snake-vs-dvc") / "repo", e2e_params())
    sh(root, "dvc", "repro", TARGET)
    return root


@pytest.mark.e2e
def test_snakemake_writes_every_output_and_log(snake_repo: Path) -> None:
    for path in ["data/shards/digits/manifest.json", "models/teacher_backbone.pth",
                 "features/digits/train/features.npy", "features/digits/val/keys.txt"]:
        assert (snake_repo / path).exists(), path
    for stage in STAGES:
        assert (snake_repo / f"logs/{stage}.log").is_file(), stage
    assert (snake_repo / "checkpoints").is_dir()


@pytest.mark.e2e
def test_onsuccess_records_outputs_in_dvc(snake_repo: Path) -> None:
    """After Snakemake, DVC agrees that everything is up to date: nothing to reproduce."""
    assert json.loads(sh(snake_repo, "dvc", "status", "--with-deps", "--json", TARGET).stdout) == {}
    again = sh(snake_repo, "dvc", "repro", TARGET)
    assert ran(again.stdout) == set() and skipped(again.stdout) == set(STAGES), again.stdout
    nothing = sh(snake_repo, "snakemake", "--profile", "workflow/profiles/local", "-n", TARGET)
    assert "Nothing to be done" in nothing.stdout + nothing.stderr


@pytest.mark.e2e
def test_snakemake_and_dvc_give_the_same_results(snake_repo: Path, dvc_repo: Path) -> None:
    for name in ("shard.json", "knn.json"):
        snake = json.loads((snake_repo / "metrics" / name).read_text())
        dvc = json.loads((dvc_repo / "metrics" / name).read_text())
        assert snake == dvc, name
    snake = json.loads((snake_repo / "metrics/pretrain.json").read_text())
    dvc = json.loads((dvc_repo / "metrics/pretrain.json").read_text())
    assert snake.keys() == dvc.keys()
    for key in snake:
        if not any(word in key for word in TIMING_WORDS):
            assert snake[key] == dvc[key], key

    shard_dir = Path("data/shards/digits")
    shards = sorted(p.name for p in (dvc_repo / shard_dir).iterdir())
    # Snakemake marks directory outputs with .snakemake_timestamp (.dvcignore hides it from DVC)
    assert shards == sorted(p.name for p in (snake_repo / shard_dir).iterdir() if p.name != ".snakemake_timestamp")
    for name in shards:
        assert (snake_repo / shard_dir / name).read_bytes() == (dvc_repo / shard_dir / name).read_bytes(), name
    for split in ("train", "val"):
        for name in ("features.npy", "labels.npy"):
            a = np.load(snake_repo / "features/digits" / split / name)
            b = np.load(dvc_repo / "features/digits" / split / name)
            np.testing.assert_array_equal(a, b, err_msg=f"{split}/{name}")
        assert (snake_repo / "features/digits" / split / "keys.txt").read_text() == (
            dvc_repo / "features/digits" / split / "keys.txt"
        ).read_text()

    # What DVC recorded (Snakemake's onsuccess `dvc commit` vs `dvc repro`): the same hashes.
    def out_hashes(root: Path) -> dict[str, str]:
        lock = yaml.safe_load((root / "dvc.lock").read_text())
        return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}

    snake_hashes, dvc_hashes = out_hashes(snake_repo), out_hashes(dvc_repo)
    for path in ("data/shards/digits", "features/digits", "metrics/shard.json", "metrics/knn.json"):
        assert snake_hashes[path] == dvc_hashes[path], path


@pytest.mark.e2e
def test_slurm_profile_plans_every_rule(tmp_path: Path) -> None:
    """A dry run with the shipped cluster profile (executor slurm) plans every rule, with the
    rule's partition and GPUs from params.yaml and the profile's defaults for the rest."""
    root = make_repo(tmp_path / "repo", e2e_params())
    result = sh(root, "snakemake", "--profile", "workflow/profiles/slurm", "-n", "all")
    out = result.stdout + result.stderr
    stats = out[out.index("Job stats:"):]
    for rule in [*ALL_STAGES, "all"]:
        assert any(line.split()[:2] == [rule, "1"] for line in stats.splitlines()), rule
    assert "slurm_partition=gpu" in out and "gres=gpu:1" in out  # pretrain / extract
    assert "slurm_partition=cpu" in out and "slurm_account=your_account" in out  # profile defaults
    assert "python -m stages.pretrain --params params.yaml > logs/pretrain.log 2>&1" in out


def _make(target: str, home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XDG_CONFIG_HOME"}
    env["HOME"] = str(home)
    return subprocess.run(["make", "-s", target], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_install_slurm_profile_only_when_missing(tmp_path: Path) -> None:
    installed = tmp_path / ".config/snakemake/slurm/config.yaml"
    first = _make("install-slurm-profile", tmp_path)
    assert first.returncode == 0, first.stderr
    assert installed.read_text() == (REPO / "workflow/profiles/slurm/config.yaml").read_text()
    assert yaml.safe_load(installed.read_text())["executor"] == "slurm"

    installed.write_text("executor: slurm\njobs: 3\n")  # the user's own edits
    second = _make("install-slurm-profile", tmp_path)
    assert second.returncode == 0, second.stderr
    assert installed.read_text() == "executor: slurm\njobs: 3\n"
    assert "exists" in second.stdout + second.stderr
