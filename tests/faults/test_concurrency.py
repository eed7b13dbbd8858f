"""Fault 9: two runs at once in one workspace, and fault 5 through DVC.

`dvc repro` while another `dvc repro` runs is refused by DVC's repository lock; `snakemake`
while another runs is refused by Snakemake's directory lock. The first runs are untouched by
the refused ones. The first `dvc repro` meets a non-finite loss (pretrain.inject_nonfinite_at_step):
DVC reports the failed stage, records nothing for it, and the last good checkpoint stays valid.
The workspaces are throw-away git + DVC repos made as tests/test_dvc.py makes them."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from faultkit import fault_params
from stages.dino.training_state import LATEST
from stages.shard_format import shard_paths
from test_dvc import make_repo, sh, tool_env

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]

# Late enough that the first `dvc repro` is still training when the second one has started, also
# on an idle machine (4 steps an epoch); the checkpoint of the step before is the last good one.
NONFINITE_STEP = 151
NONFINITE_EPOCH = NONFINITE_STEP // 4


class Background:
    """A command running in `root`, its merged output collected by a thread."""

    def __init__(self, root: Path, *args: str):
        self.proc = subprocess.Popen(args, cwd=root, env=tool_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.output = ""
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output += line

    def finish(self, timeout: float = 400) -> int:
        code = self.proc.wait(timeout)
        self._thread.join(10)
        return code


def wait_for(condition, first: Background, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if first.proc.poll() is not None:
            raise AssertionError(f"the first run ended before {what}:\n{first.output}")
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {timeout}s:\n{first.output}")


def shards_written(root: Path) -> bool:
    return (root / "data/shards/digits/manifest.json").is_file()


def dvc_locked(root: Path) -> bool:
    """The first `dvc repro` holds DVC's locks on a stage's deps/outs (.dvc/tmp/rwlock)."""
    rwlock = root / ".dvc/tmp/rwlock"
    try:
        return '"pid"' in rwlock.read_text()
    except FileNotFoundError:
        return False


def snakemake_locked(root: Path) -> bool:
    """The first Snakemake holds its directory lock (.snakemake/locks/)."""
    locks = root / ".snakemake/locks"
    return locks.is_dir() and any(locks.iterdir())


@pytest.fixture(scope="module")
def dvc_runs(tmp_path_factory) -> tuple[Path, Background, subprocess.CompletedProcess]:
    """A first `dvc repro` (its pretrain meets a non-finite loss) and a second started while
    the first trains; returns (repo, first, second)."""
    params = fault_params(Path("."), epochs=40, inject_nonfinite_at_step=NONFINITE_STEP)
    root = make_repo(tmp_path_factory.mktemp("dvc-twice") / "repo", params)
    first = Background(root, "dvc", "repro")
    try:
        wait_for(lambda: dvc_locked(root), first, "DVC's lock")
        second = sh(root, "dvc", "repro", check=False, timeout=120)
        still_running = first.proc.poll() is None
        first.finish()
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
    assert still_running, "the first run ended before the second was refused: the test proves nothing"
    return root, first, second


def test_second_dvc_repro_is_refused_by_the_lock(dvc_runs) -> None:
    root, first, second = dvc_runs
    assert second.returncode != 0, second.stdout
    # DVC refuses with its repository lock, or with the per-output read/write lock naming the
    # process that holds it (dvc 3.x takes the latter during `repro`)
    refused = second.stderr + second.stdout
    assert "Unable to acquire lock" in refused or (
        "is busy, it is being blocked by" in refused and f"(PID {first.proc.pid})" in refused), refused
    assert "Running stage" not in second.stdout  # it did nothing
    # the first run's work is intact: shards verify against the manifest, and DVC recorded them
    assert len(shard_paths(root / "data/shards/digits", "train", verify=True)) == 2
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert "shard" in lock["stages"]
    assert sh(root, "dvc", "status", "shard").stdout.strip().endswith("Data and pipelines are up to date.")


def test_nonfinite_loss_under_dvc_repro_fails_and_records_nothing(dvc_runs) -> None:
    root, first, _ = dvc_runs
    assert first.proc.returncode != 0, first.output
    checkpoint = root / "checkpoints" / LATEST
    assert f"non-finite loss (nan) at step {NONFINITE_STEP} (epoch {NONFINITE_EPOCH})" in first.output
    assert f"last good checkpoint: {Path('checkpoints') / LATEST}" in first.output
    assert "failed to reproduce 'pretrain'" in first.output
    assert torch.load(checkpoint, weights_only=False)["global_step"] == NONFINITE_STEP - 1
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert "pretrain" not in lock["stages"]  # not recorded as done
    assert not (root / "models/teacher_backbone.pth").exists()


def test_second_snakemake_is_refused_by_the_directory_lock(tmp_path: Path) -> None:
    # 40 epochs of 4 steps: long enough that the first run is still training (holding the lock)
    # when the second snakemake has started, also on a loaded machine.
    root = make_repo(tmp_path / "repo", fault_params(Path("."), epochs=40))
    command = ("snakemake", "--profile", "workflow/profiles/local", "--cores", "1", "models/teacher_backbone.pth")
    first = Background(root, *command)
    try:
        wait_for(lambda: snakemake_locked(root), first, "Snakemake's lock")
        second = sh(root, *command, check=False, timeout=120)
        still_running = first.proc.poll() is None
        code = first.finish()
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
    assert still_running, f"the first run ended before the second was refused:\n{first.output}\n{second.stderr}"
    assert second.returncode != 0, second.stdout + second.stderr
    assert "Directory cannot be locked" in second.stdout + second.stderr
    assert code == 0, first.output[-3000:]
    assert torch.load(root / "models/teacher_backbone.pth", weights_only=False)["global_step"] == 160
    assert len(shard_paths(root / "data/shards/digits", "train", verify=True)) == 2
    nothing = sh(root, *command, "-n")
    assert "Nothing to be done" in nothing.stdout + nothing.stderr
