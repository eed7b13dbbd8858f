"""Helpers shared by the fault-injection tests: the small pretraining config, pretrain
subprocesses whose output is read line by line, and shard surgery that keeps the manifest
consistent (so that only the fault under test, not a stale sha256, is what a reader sees)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import psutil
import torch

from tiny_config import tiny_params

REPO = Path(__file__).resolve().parents[2]

# 64 train images in 2 shards of 32, batch 16: 4 steps per epoch, 8 in all; checkpoints every 2.
SUBSET = {"train": 64, "val": 32}
STEPS_PER_EPOCH = 4
EPOCHS = 2
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS


def fault_params(root: Path, shards: Path | None = None, **pretrain_overrides) -> dict:
    """The tiny config, made smaller for fault tests; `shards` points at shared shards."""
    params = tiny_params(
        root,
        dataset={"subset": dict(SUBSET), "shard_max_samples": 32},
        pretrain={"epochs": EPOCHS, "batch_size_per_gpu": 16, "checkpoint_every_steps": 2,
                  "log_every_steps": 1, **pretrain_overrides},
        knn={"baselines": False},
    )
    if shards is not None:
        params["paths"]["shards"] = str(shards)
    return params


def stage_env() -> dict[str, str]:
    """The environment of a stage run outside SLURM (so preemption never tries scontrol)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.pop("PYTHONPATH", None)
    return env


class Stage:
    """A `python -m stages.<name>` subprocess in its own session; its merged output is collected
    by a thread, so the test can wait for a log line without blocking on the pipe."""

    def __init__(self, name: str, params_file: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"stages.{name}", "--params", str(params_file)],
            cwd=REPO, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,  # a process group of its own, as under srun/torchrun
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 180) -> None:
        """Block until `text` appears in the output; fail if the process ends first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output:
                return
            if self.proc.poll() is not None:
                self._reader.join(5)
                if text in self.output:
                    return
                raise AssertionError(f"exited {self.proc.returncode} before {text!r}:\n{self.output}")
            time.sleep(0.02)
        raise AssertionError(f"no {text!r} within {timeout}s:\n{self.output}")

    def workers(self) -> list[psutil.Process]:
        """Live child processes (the DataLoader workers)."""
        try:
            return [c for c in psutil.Process(self.proc.pid).children() if c.is_running()
                    and c.status() != psutil.STATUS_ZOMBIE]
        except psutil.NoSuchProcess:
            return []

    def finish(self, timeout: float = 300) -> int:
        """Wait for the exit status (and the whole output)."""
        code = self.proc.wait(timeout=timeout)
        self._reader.join(10)
        return code

    def kill_group(self) -> None:
        """Clean-up: SIGKILL whatever is left of the process group."""
        try:
            os.killpg(self.proc.pid, 9)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(timeout=30)


# ----------------------------------------------------------------------------------------------
# shard surgery
# ----------------------------------------------------------------------------------------------


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    """(member name, data) of a tar, in order."""
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def replace_shard(shard_dir: Path, split: str, index: int, data: bytes, count: int | None = None,
                  update_manifest: bool = True) -> Path:
    """Overwrite shard `index` of `split` with `data`; with `update_manifest`, its bytes and
    sha256 (and `count` when given, with the split's total) are made to match, so that the
    manifest vouches for the damaged content."""
    manifest_path = shard_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entry = manifest["splits"][split]["shards"][index]
    path = shard_dir / entry["name"]
    path.write_bytes(data)
    if update_manifest:
        entry["bytes"] = len(data)
        entry["sha256"] = hashlib.sha256(data).hexdigest()
        if count is not None:
            manifest["splits"][split]["total"] += count - entry["count"]
            entry["count"] = count
        manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def assert_same_teacher(root: Path, expected: dict[str, torch.Tensor], step: int = TOTAL_STEPS) -> None:
    """The latest checkpoint under `root` is at `step` and its teacher equals `expected` bitwise."""
    from stages.dino.training_state import LATEST

    state = torch.load(root / "checkpoints" / LATEST, weights_only=False)
    assert state["global_step"] == step
    got = state["teacher"]
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
