"""Recipe variants side by side on one GPU, sized to a wall-clock deadline (issue 8's device run).

    python -m benchmarks.gpu_recipes --deadline-s 420 --epochs 60 NAME="key=value ..." ...

Each variant is a preset (--preset, default fmnist-gpu) plus its own overrides, trained and
scored by benchmarks.recipe_probe in its own process (k-NN at each quarter of the run), all at
once. Once every run has logged two epochs, the slowest one's epoch time projects the finish;
when that would pass the deadline, all runs restart once with the epochs that fit (the preset's
warm-ups scaled in proportion). Running side by side, each run's seconds are an upper bound on
the same run alone. One JSON line per variant at the end (stdout and --out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.recipe_probe import PROBES, ROOT, ensure_shards, probe_params
from stages.params import validate_params
from stages.presets import flatten, load_preset, preset_params

SAFETY = 1.1       # the projection's margin on the measured epoch time
EVAL_S = 5.0       # allowance per k-NN evaluation (70k images forward, 10k x 60k search)


def preset_overrides(preset: str) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in flatten(load_preset(preset))
            if not key.startswith("dataset.subset")]  # the probe always uses the whole dataset


def schedule_overrides(preset: str, epochs: int) -> list[str]:
    """The preset's warm-ups scaled to `epochs` (the recipe's shape kept when the deadline cuts it)."""
    pretrain = preset_params(preset, PROBES)["pretrain"]
    scale = epochs / pretrain["epochs"]
    return [f"pretrain.epochs={epochs}"] + [f"pretrain.{key}={round(pretrain[key] * scale)}"
                                            for key in ("warmup_epochs", "warmup_teacher_temp_epochs")]


def eval_epochs(epochs: int) -> list[int]:
    return sorted({max(1, epochs * quarter // 4) for quarter in (1, 2, 3, 4)})


def fitting_epochs(epochs: int, done: int, epoch_s: float, elapsed: float, setup_s: float,
                   deadline_s: float) -> int | None:
    """None when the runs' remaining epochs end by the deadline at `epoch_s` each; else the epochs
    (at least 2) that fit when every run starts again now and spends `setup_s` before training."""
    slowest = epoch_s * SAFETY
    if elapsed + (epochs - done) * slowest + len(eval_epochs(epochs)) * EVAL_S <= deadline_s:
        return None
    return max(2, math.floor((deadline_s - elapsed - setup_s - 4 * EVAL_S) / slowest))


def read_rows(name: str) -> list[dict]:
    path = PROBES / name / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class Run:
    def __init__(self, name: str, overrides: list[str], epochs: int, preset: str) -> None:
        self.name, self.epochs = name, epochs
        shutil.rmtree(PROBES / name, ignore_errors=True)
        (PROBES / name).mkdir(parents=True)
        evals = ",".join(map(str, eval_epochs(epochs)))
        args = [sys.executable, "-m", "benchmarks.recipe_probe", name, *overrides,
                *schedule_overrides(preset, epochs), f"eval={evals}"]
        self.started = time.monotonic()
        self.out = (PROBES / name / "stdout.txt").open("w")
        self.process = subprocess.Popen(args, cwd=ROOT, stdout=self.out, stderr=subprocess.STDOUT)

    def epoch_seconds(self) -> float | None:
        rows = read_rows(self.name)
        return rows[-1]["train_s"] - rows[-2]["train_s"] if len(rows) >= 2 else None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_recipes", description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", help='NAME="section.key=value ..." (the preset plus these)')
    parser.add_argument("--preset", default="fmnist-gpu")
    parser.add_argument("--epochs", type=int, default=60, help="epochs unless the deadline needs fewer")
    parser.add_argument("--deadline-s", type=float, required=True, help="seconds from now by which all runs end")
    parser.add_argument("--shard-workers", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=None, help="also append the JSON lines here")
    args = parser.parse_args(argv)
    start = time.monotonic()
    extras = {name: extra.split() for name, _, extra in (spec.partition("=") for spec in args.variants)}
    variants = {name: preset_overrides(args.preset) + extra for name, extra in extras.items()}

    ensure_shards(validate_params(probe_params("shards", [f"dataset.num_workers={args.shard_workers}"])[0]))
    print(f"gpu_recipes: shards ready after {time.monotonic() - start:.0f} s", flush=True)

    runs = [Run(name, overrides, args.epochs, args.preset) for name, overrides in variants.items()]
    restarted = False
    while any(run.process.poll() is None for run in runs):
        time.sleep(2)
        now = time.monotonic()
        if now - start > args.deadline_s:
            print("gpu_recipes: deadline passed, stopping the runs still going", flush=True)
            for run in runs:
                run.stop()
            break
        live = [run for run in runs if run.process.poll() is None]
        epoch_s = [run.epoch_seconds() for run in live]
        if restarted or not live or None in epoch_s:
            continue
        restarted = True  # decided once, after two epochs
        done = min(len(read_rows(run.name)) for run in live)
        setup_s = max(now - run.started - read_rows(run.name)[-1]["train_s"] for run in live)
        fit = fitting_epochs(args.epochs, done, max(epoch_s), now - start, setup_s, args.deadline_s)
        if fit is None:
            print(f"gpu_recipes: {max(epoch_s):.1f} s/epoch, all {args.epochs} epochs fit", flush=True)
            continue
        print(f"gpu_recipes: {max(epoch_s):.1f} s/epoch, {args.epochs} epochs would pass the deadline; "
              f"restarting with {fit}", flush=True)
        for run in runs:
            run.stop()
        args.epochs = fit
        runs = [Run(name, overrides, args.epochs, args.preset) for name, overrides in variants.items()]

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    for run in runs:
        rows = read_rows(run.name)
        result = {"benchmark": "gpu_recipes", "device": device, "torch": torch.__version__, "variant": run.name,
                  "overrides": " ".join(extras[run.name]),
                  "epochs": run.epochs, "exit": run.process.returncode, "runs_side_by_side": len(runs),
                  "epochs_done": len(rows), "train_s": rows[-1]["train_s"] if rows else None,
                  "knn20": {row["epoch"]: row["knn20"] for row in rows if "knn20" in row},
                  "last": rows[-1] if rows else None}
        line = json.dumps(result)
        print(line, flush=True)
        if args.out:
            with args.out.open("a") as out:
                out.write(line + "\n")
    return 0 if all(run.process.returncode == 0 for run in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
