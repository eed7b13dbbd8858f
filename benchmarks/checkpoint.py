"""Checkpoint save and restore of the pretraining state, through the pretrain stage's own code.

    python -m benchmarks.checkpoint [--arch vit_small --patch 16 --out-dim 65536 --dir DIR --repeats 3]

Builds a data-free Trainer with the given model and DINO head (the paper's ViT-S/16: out_dim
65536, hidden 2048, bottleneck 256), runs one train_step on small synthetic crops so that AdamW's
moments exist for every parameter (the head's last layer included, as after the first epoch),
then times, `--repeats` times each:

- state_s: `Trainer.state()` alone (state dicts, RNG states, params);
- save_s: `Trainer.save()` whole with `async_checkpoint: false`, i.e. what the training loop
  waits for at each synchronous checkpoint: the loss check, `state()`, the rotation of
  checkpoint.pth to checkpoint.prev.pth, torch.save into a temporary file, its fsync, the rename
  and the folder's fsync (stages.atomic.torch_save);
- async_save_s: `Trainer.save()` with `async_checkpoint: true` (stages.dino.async_saver), i.e. what
  the training loop waits for at each asynchronous checkpoint: the loss check, `state()`, the wait
  for the previous checkpoint (none here: it was completed, as when checkpoints are further apart
  than one write) and the copy of the state into the saver's CPU buffers; the first repeat also
  allocates those buffers (pinned where CUDA is), later ones reuse them;
- async_total_s: from that `Trainer.save()` until the background write is on disk (the same
  rotation, temporary file, fsync and renames as save_s);
- serialize_s: torch.save of the state into memory (no file, no fsync);
- load_s: torch.load of checkpoint.pth alone;
- restore_s: `Trainer.try_resume()` of a fresh Trainer (torch.load + every load_state_dict + RNG),
  checked to give back the saved step and weights.

Times are wall seconds, the median of the repeats (the minimum in `*_s_min`, every value in
`*_s_all`); `*_cpu_s` is the median CPU time of this process over the same calls (all its threads),
which a machine shared with other work inflates less than the wall time (it leaves out time spent
waiting for a core, for the disk, or stopped). Restore reads a file just written, so usually from
the page cache, not the disk. The checkpoints go into a temporary folder made inside `--dir`
(default: the system's temporary folder), removed at the end.

Prints one JSON line: device, torch version, config, times, size_mib (bytes of checkpoint.pth).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.device import device_name, synchronize
from benchmarks.step import synthetic_views
from stages.dino.async_saver import AsyncCheckpointSaver
from stages.distributed import init_distributed
from stages.params import validate_params
from stages.pretrain import Trainer


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.checkpoint")
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=224, help="the model's position-embedding grid")
    parser.add_argument("--out-dim", type=int, default=65536)
    parser.add_argument("--head-hidden", type=int, default=2048)
    parser.add_argument("--head-bottleneck", type=int, default=256)
    parser.add_argument("--embed-dim", type=int, default=None, help="tiny CPU smoke runs")
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--batch", type=int, default=2, help="of the one step that fills AdamW's state")
    parser.add_argument("--global-size", type=int, default=32)
    parser.add_argument("--local-size", type=int, default=16)
    parser.add_argument("--local-crops", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dir", default=None, help="folder (file system) to write into; default: the temp folder")
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args(argv)


def build_trainer(args: argparse.Namespace, checkpoints: Path) -> Trainer:
    params = validate_params({
        "dataset": {"source": "digits"},
        "paths": {"checkpoints": str(checkpoints)},
        "model": {"arch": args.arch, "patch_size": args.patch, "img_size": args.img_size,
                  "embed_dim": args.embed_dim, "depth": args.depth, "num_heads": args.heads},
        "pretrain": {"batch_size_per_gpu": args.batch, "out_dim": args.out_dim,
                     "head_hidden_dim": args.head_hidden, "head_bottleneck_dim": args.head_bottleneck,
                     "global_crops_size": args.global_size, "local_crops_size": args.local_size,
                     "local_crops_number": args.local_crops, "precision": "fp32",
                     "device": args.device, "warmup_epochs": 0, "async_checkpoint": False,
                     # the last layer learns from the first step, so its AdamW moments exist, as
                     # in every checkpoint after the first epoch (the default freezes it for one)
                     "freeze_last_layer": 0},
    })
    return Trainer(params, init_distributed(), steps_per_epoch=10)


CPU_TIMES: dict[str, list[float]] = {}  # what `timed` measured last, in this process's CPU seconds


def timed(fn, device: torch.device, name: str | None = None) -> tuple[float, object]:
    """Wall seconds of fn() and its result; with a name, its CPU seconds go into CPU_TIMES[name]."""
    synchronize(device)
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    synchronize(device)
    if name is not None:
        CPU_TIMES.setdefault(name, []).append(time.process_time() - cpu)
    return time.perf_counter() - start, out


def main(argv=None) -> dict:
    args = parse(argv)
    CPU_TIMES.clear()
    base = Path(args.dir) if args.dir else None
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="checkpoint-bench.", dir=base))
    try:
        checkpoints = workdir / "checkpoints"
        trainer = build_trainer(args, checkpoints)
        device = trainer.device
        views = synthetic_views(args, device)
        trainer.train_step(views)
        trainer.progress.global_step += 1
        trainer.progress.step_in_epoch += 1
        trainer.check_losses()
        moments = sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel()
                      for s in trainer.optimizer.state.values() if "exp_avg" in s)
        trainable = sum(p.numel() for p in trainer.student.parameters() if p.requires_grad)
        assert moments == 2 * trainable, f"AdamW holds {moments} moment elements, not 2 x {trainable}"

        times: dict[str, list[float]] = {k: [] for k in ("state", "serialize", "save",
                                                         "async_save", "async_total", "load", "restore")}
        saver = AsyncCheckpointSaver(checkpoints)  # kept across repeats, as in a run: its buffers are reused

        def save_async() -> None:
            trainer.saver = saver  # what `async_checkpoint: true` gives the main rank
            times["async_save"].append(timed(trainer.save, device, "async_save")[0])
            trainer.finish_checkpoint()
            trainer.saver = None

        fresh = None
        for _ in range(args.repeats):
            seconds, state = timed(trainer.state, device, "state")
            times["state"].append(seconds)
            serialize = lambda: torch.save(state, io.BytesIO())  # noqa: E731
            times["serialize"].append(timed(serialize, device, "serialize")[0])
            del state
            times["save"].append(timed(trainer.save, device, "save")[0])
            times["async_total"].append(timed(save_async, device, "async_total")[0])
            latest = trainer.last_checkpoint  # written by the saver: the restore below checks it
            times["load"].append(timed(lambda: torch.load(latest, map_location=device, weights_only=False),
                                       device, "load")[0])
            del fresh  # one fresh Trainer alive at a time
            fresh = build_trainer(args, checkpoints)
            seconds, resumed = timed(fresh.try_resume, device, "restore")
            times["restore"].append(seconds)
            assert resumed and fresh.progress.global_step == trainer.progress.global_step
        assert fresh is not None
        for name, tensor in trainer.student.state_dict().items():
            assert torch.equal(tensor, fresh.student.state_dict()[name]), f"restored {name} differs"
        for group, fresh_group in zip(trainer.optimizer.state_dict()["state"].values(),
                                      fresh.optimizer.state_dict()["state"].values()):
            assert torch.equal(group["exp_avg_sq"], fresh_group["exp_avg_sq"]), "restored AdamW state differs"

        size = latest.stat().st_size
        parameters = sum(p.numel() for p in trainer.student.parameters())
        result = {
            "benchmark": "checkpoint",
            "device": device_name(device),
            "torch": torch.__version__,
            "config": vars(args) | {"filesystem_dir": str(workdir.parent)},
            "student_parameters": parameters,
            "adamw_moment_elements": moments,
            "size_mib": size / 2**20,
            **{f"{k}_s": statistics.median(v) for k, v in times.items()},
            **{f"{k}_s_min": min(v) for k, v in times.items()},
            **{f"{k}_s_all": v for k, v in times.items()},
            **{f"{k}_cpu_s": statistics.median(v) for k, v in CPU_TIMES.items()},
            "save_mib_per_s": size / 2**20 / statistics.median(times["save"]),
        }
        print(json.dumps(result))
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
