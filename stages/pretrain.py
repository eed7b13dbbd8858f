"""Stage `pretrain`: DINO self-distillation (Caron et al. 2021) on the shards.

    python -m stages.pretrain [--params params.yaml]

One process per device; launched plainly, by torchrun or by srun (stages.distributed finds out).
Schedules are per iteration (lr: linear warm-up then cosine; weight decay: cosine; teacher
momentum: cosine to 1), computed once as arrays. A checkpoint is written every
`checkpoint_every_steps` and at each epoch's end (with `async_checkpoint`, by a background
thread from a copy of the state, while training goes on); a restarted stage resumes from the latest
one with the same params, exactly (same batches, same augmentations, same RNG streams). SIGTERM or
SIGUSR1 finishes the step, checkpoints, and exits (or requeues the SLURM job). Before the stage
leaves, for whatever reason, the checkpoint in flight is completed.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from stages import preemption
from stages.atomic import torch_save, write_json, write_text
from stages.cli import StageError, run_stage
from stages.distributed import DistInfo, all_reduce_mean, detect_launcher, init_distributed
from stages.dino.async_saver import AsyncCheckpointSaver
from stages.dino.augment_lean import LeanMultiCrop, normalize_views
from stages.dino.backbones import build_backbone_from_params
from stages.dino.collapse import CollapseError, CollapseGuard
from stages.dino.data import DecodedImages, EpochBatches, ShardImages, collate_images, collate_views, decode_uint8
from stages.dino.graphed_step import GraphedStep
from stages.dino.head import DINOHead, build_predictor
from stages.dino.koleo import koleo_loss
from stages.dino.loss import DINOLoss
from stages.dino.model import MultiCropModel
from stages.dino.optim import (
    build_optimizer,
    cancel_last_layer_gradients,
    clip_gradients_per_tensor,
    load_optimizer_state,
    param_groups,
    set_schedules,
)
from stages.dino.schedules import cosine_scheduler
from stages.dino.sync_batchnorm import convert_distributed_batchnorm, has_batchnorm
from stages.dino.teacher import copy_weights, ema_update
from stages.dino.training_state import (
    PREVIOUS,
    all_rng_states,
    load_latest,
    params_mismatch,
    save_checkpoint,
    set_aside_unreadable,
    set_rng_state,
)
from stages.params import Params, ParamsError, load_params

logger = logging.getLogger(__name__)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto': bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        # native bf16 only: older GPUs (V100, T4) would emulate it, far slower than their fp16
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "fp32"


def build_models(params: Params) -> tuple[MultiCropModel, MultiCropModel]:
    """Student and teacher: same architecture, teacher without stochastic depth and predictor,
    starting as an exact copy of the student."""
    p = params.pretrain

    def head() -> DINOHead:
        return DINOHead(
            student_backbone.embed_dim, p.out_dim, use_bn=p.use_bn_in_head,
            norm_last_layer=p.norm_last_layer, nlayers=p.head_nlayers,
            hidden_dim=p.head_hidden_dim, bottleneck_dim=p.head_bottleneck_dim,
        )

    student_backbone = build_backbone_from_params(params.model)
    predictor = build_predictor(p.out_dim) if p.predictor else None
    student = MultiCropModel(student_backbone, head(), predictor)
    teacher = MultiCropModel(build_backbone_from_params(params.model, drop_path_rate=0.0), head())
    missing, unexpected = teacher.load_state_dict(student.state_dict(), strict=False)
    if missing or any(not key.startswith("predictor.") for key in unexpected):  # only the predictor differs
        raise RuntimeError(f"teacher and student differ: missing {missing}, unexpected {unexpected}")
    for param in teacher.parameters():
        param.requires_grad = False
    return student, teacher


@dataclass
class Schedules:
    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    steps_per_epoch: int

    @classmethod
    def from_params(cls, params: Params, steps_per_epoch: int, world_size: int) -> "Schedules":
        p = params.pretrain
        global_batch = p.batch_size_per_gpu * world_size
        return cls(
            lr=cosine_scheduler(p.lr * global_batch / 256.0, p.min_lr, p.epochs, steps_per_epoch,
                                warmup_epochs=p.warmup_epochs),
            wd=cosine_scheduler(p.weight_decay, p.weight_decay_end, p.epochs, steps_per_epoch),
            momentum=cosine_scheduler(p.momentum_teacher, 1.0, p.epochs, steps_per_epoch),
            steps_per_epoch=steps_per_epoch,
        )


@dataclass
class Progress:
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    history: list = field(default_factory=list)  # per-epoch mean loss
    train_seconds: float = 0.0  # wall-clock time that produced global_step, over every resumed session


class Trainer:
    def __init__(self, params: Params, dist: DistInfo, steps_per_epoch: int | None = None):
        self.params, self.dist = params, dist
        p = params.pretrain
        self.device = self._device(p.device)
        self.precision = resolve_precision(p.precision, self.device)
        if (self.precision == "bf16" and self.device.type == "cuda"
                and not torch.cuda.is_bf16_supported(including_emulation=False)):
            raise StageError("pretrain.precision = 'bf16' but this GPU does not support bfloat16 natively")
        if p.cuda_graphs:
            self.check_graphable()
        self.check_crop_sizes()
        crop_args = dict(global_size=p.global_crops_size, local_size=p.local_crops_size,
                         global_crops_number=p.global_crops_number, blur_radius=p.blur_radius)
        if p.augment == "batch":
            # Workers only decode; the crops are made per batch on the training device.
            from stages.dino.augment_batch import BatchMultiCrop

            self.batch_augment = BatchMultiCrop(p.global_crops_scale, p.local_crops_scale,
                                                p.local_crops_number, **crop_args)
            transform, self.collate = decode_uint8, collate_images
        else:
            self.batch_augment = None
            transform = LeanMultiCrop(p.global_crops_scale, p.local_crops_scale, p.local_crops_number, **crop_args)
            self.collate = collate_views
        self.decoded: DecodedImages | None = None
        if steps_per_epoch is None:  # benchmarks pass it and feed synthetic batches instead
            self.dataset = ShardImages(params.paths.shards, "train", transform, seed=p.seed,
                                       random_transform=self.batch_augment is None)
            steps_per_epoch = len(self.dataset) // (p.batch_size_per_gpu * dist.world_size)
            if steps_per_epoch == 0:
                raise StageError(
                    f"{params.paths.shards}: {len(self.dataset)} training samples are fewer than one "
                    f"global batch ({p.batch_size_per_gpu} x {dist.world_size} ranks)"
                )
            if self.batch_augment is not None and p.decoded_cache_mib > 0:
                self.decoded = DecodedImages.decode(self.dataset, self.device, p.decoded_cache_mib * 2**20,
                                                    p.num_workers)
                logger.info("training images %s", "decoded into memory" if self.decoded else
                            f"read from the shards (more than pretrain.decoded_cache_mib = {p.decoded_cache_mib})")
        steps = steps_per_epoch
        self.schedules = Schedules.from_params(params, steps, dist.world_size)

        torch.manual_seed(p.seed)  # the same initial weights on every rank (student and teacher)
        self.student, self.teacher = build_models(params)
        torch.manual_seed(p.seed + dist.rank)  # then a stream of its own per rank (stochastic depth)
        np.random.seed(p.seed + dist.rank)
        self.student.to(self.device)
        self.teacher.to(self.device)
        # The teacher stays in train mode as in the reference: BatchNorm in its head (if any)
        # normalises with batch statistics; it has no dropout or stochastic depth.
        self.student_ddp: nn.Module = self.student
        if dist.world_size > 1:
            if has_batchnorm(self.student):
                # As the reference: BatchNorm statistics of the global batch, not of each rank's
                # share. torch's SyncBatchNorm takes CUDA tensors only; ours any (gloo on CPU).
                convert = (nn.SyncBatchNorm.convert_sync_batchnorm if self.device.type == "cuda"
                           else convert_distributed_batchnorm)
                self.student, self.teacher = convert(self.student), convert(self.teacher)
            self.student_ddp = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if p.compile:
            # In place, so state-dict keys stay those of the reference format.
            self.student.backbone.compile()
            self.teacher.backbone.compile()
        self.optimizer = build_optimizer(p.optimizer, param_groups(self.student))
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        ncrops = p.global_crops_number + p.local_crops_number
        self.loss = DINOLoss(
            p.out_dim, ncrops, p.warmup_teacher_temp, p.teacher_temp, p.warmup_teacher_temp_epochs,
            p.epochs, student_temp=p.student_temp, center_momentum=p.center_momentum,
            teacher_output=p.teacher_output, loss=p.loss,
        ).to(self.device)
        self.guard = CollapseGuard(p.out_dim, p.collapse_patience_steps, p.stop_on_collapse)
        self.progress = Progress()
        self.checkpoint_dir = Path(params.paths.checkpoints)
        self.last_checkpoint: Path | None = None  # only ever a completely written file
        # only the main rank writes; None: synchronous writes (or not the main rank)
        self.saver = AsyncCheckpointSaver(self.checkpoint_dir) if p.async_checkpoint and dist.is_main else None
        self.last_stats: dict[str, float] = {}
        self.saved_step = -1
        self.clock = time.perf_counter()  # when the time since the last save began
        self.pending_losses: list[tuple[int, int, torch.Tensor]] = []
        self.epoch_losses: list[float] = []  # this epoch's, since the last checkpoint or start
        self.last_loss = float("nan")
        self.graphed_step = GraphedStep(self) if p.cuda_graphs else None

    def check_crop_sizes(self) -> None:
        """A ViT cuts each view into whole patches: refuse crop sizes that do not divide, before any work."""
        model, p = self.params.model, self.params.pretrain
        sizes = {"global_crops_size": p.global_crops_size}
        if p.local_crops_number:
            sizes["local_crops_size"] = p.local_crops_size
        for key, size in sizes.items():
            if model.arch != "resnet50" and size % model.patch_size:
                raise StageError(f"pretrain.{key} = {size} is not a multiple of model.patch_size = {model.patch_size}")

    def check_graphable(self) -> None:
        p = self.params.pretrain
        reasons = [reason for reason, unsupported in (
            (f"{self.dist.world_size} processes (DDP's all-reduces are not recorded)", self.dist.world_size > 1),
            (f"optimizer {p.optimizer!r} (AdamW only)", p.optimizer != "adamw"),
            ("fp16 (its loss scaling reads the gradients on the host; use bf16)", self.precision == "fp16"),
            ("inject_nonfinite_at_step (a fault hook of the eager step)", p.inject_nonfinite_at_step is not None),
        ) if unsupported]
        if reasons:
            raise StageError("pretrain.cuda_graphs cannot record this run's step: " + "; ".join(reasons)
                             + ". Set pretrain.cuda_graphs: false")
        if self.device.type != "cuda":
            logger.info("pretrain.cuda_graphs on the CPU: the graphed step's arithmetic, run eagerly")

    def _device(self, wanted: str) -> torch.device:
        if wanted == "cuda" and not torch.cuda.is_available():
            raise StageError("pretrain.device = 'cuda' but no GPU is visible")
        if wanted == "cpu":
            return torch.device("cpu")
        return self.dist.device

    # -- checkpoints ---------------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "dino_loss": self.loss.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "collapse_guard": self.guard.state_dict(),
            "epoch": self.progress.epoch,
            "step_in_epoch": self.progress.step_in_epoch,
            "global_step": self.progress.global_step,
            "history": list(self.progress.history),
            "train_seconds": self.progress.train_seconds,
            "last_stats": dict(self.last_stats),
            "epoch_losses": list(self.epoch_losses),
            "rng": all_rng_states(),
            "world_size": self.dist.world_size,
            "params": self.params.model_dump(mode="json"),
        }

    def save(self) -> None:
        self.check_losses()
        now = time.perf_counter()
        self.progress.train_seconds += now - self.clock
        self.clock = now
        state = self.state()  # every rank takes part in gathering the RNG states
        self.saved_step = self.progress.global_step
        if self.saver is not None:
            self.finish_checkpoint()
            self.saver.save(state)  # logs "checkpoint at step ..." once the file is on disk
        elif self.dist.is_main:
            self.last_checkpoint = save_checkpoint(self.checkpoint_dir, state)
            logger.info("checkpoint at step %d -> %s", self.progress.global_step, self.last_checkpoint)

    def finish_checkpoint(self) -> None:
        """Block until the checkpoint in flight (if any) is on disk, and name it in
        `last_checkpoint`; re-raises its write's error."""
        if self.saver is not None:
            self.last_checkpoint = self.saver.wait() or self.last_checkpoint

    @contextlib.contextmanager
    def completing_checkpoints(self) -> Iterator[None]:
        """However training leaves, the checkpoint in flight is on disk first (a rerun resumes
        from it, the stage exports and reports only complete files). Leaving on another error, a
        failure of that write is logged and the first error raised."""
        try:
            yield
        except BaseException:
            try:
                self.finish_checkpoint()
            except Exception:
                logger.exception("the checkpoint in flight when training failed was not written")
            raise
        self.finish_checkpoint()

    def try_resume(self) -> bool:
        found = load_latest(self.checkpoint_dir, map_location=self.device)
        if found is None:
            return False
        state, path = found
        if path.name == PREVIOUS and self.dist.is_main:
            set_aside_unreadable(self.checkpoint_dir)
        changed = params_mismatch(state.get("params", {}), self.params.model_dump(mode="json"))
        if changed:
            logger.warning("%s was trained with other params (%s): starting from scratch", path, ", ".join(changed))
            return False
        saved_world = state.get("world_size", len(state["rng"]))
        if saved_world != self.dist.world_size:
            # Steps per epoch, the schedules' position, each rank's data and the lr scaling all
            # follow the number of processes: resuming on another count would silently mix them.
            raise StageError(
                f"{path} was written by {saved_world} training processes, this run has {self.dist.world_size}: "
                f"resume with {saved_world}, or move {self.checkpoint_dir} away to train from scratch")
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.loss.load_state_dict(state["dino_loss"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.guard.load_state_dict(state["collapse_guard"])
        self.progress = Progress(state["epoch"], state["step_in_epoch"], state["global_step"], list(state["history"]),
                                 state.get("train_seconds", 0.0))
        self.last_stats = dict(state.get("last_stats", {}))
        self.epoch_losses = list(state["epoch_losses"])
        rngs = state["rng"]
        set_rng_state(rngs[self.dist.rank] if self.dist.rank < len(rngs) else rngs[0])
        self.last_checkpoint = path
        logger.info("resumed from %s at epoch %d, step %d", path, self.progress.epoch, self.progress.global_step)
        return True

    # -- training ------------------------------------------------------------------------------

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def train_step(self, views: list[torch.Tensor]) -> torch.Tensor:
        p, it, epoch = self.params.pretrain, self.progress.global_step, self.progress.epoch
        if self.graphed_step is not None:
            loss = self.graphed_step(views, it, epoch)
            self.pending_losses.append((it, epoch, loss))
            return loss
        set_schedules(self.optimizer, float(self.schedules.lr[it]), float(self.schedules.wd[it]))
        loss = self.forward_loss([v.to(self.device, non_blocking=True) for v in views])
        self.pending_losses.append((it, epoch, loss.detach()))
        if self.device.type == "cpu":
            self.check_losses()  # free on CPU; on a GPU it waits for the batched check
        self.backward(loss)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if p.teacher == "ema":
            ema_update(self.teacher, self.student, float(self.schedules.momentum[it]))
        return loss.detach()

    def forward_loss(self, views: list[torch.Tensor], teacher_temp: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher and student forward and the DINO loss (+ KoLeo); shared by the eager and the
        graphed step, as is `backward`."""
        p, it, epoch = self.params.pretrain, self.progress.global_step, self.progress.epoch
        if p.teacher == "student":
            copy_weights(self.teacher, self.student)
        with self.autocast():
            teacher_output = self.teacher(views[: p.global_crops_number])
            student_output, features = self.student_ddp(views, return_features=True)
            loss = self.loss(student_output, teacher_output, epoch, teacher_temp)
            if p.koleo_weight > 0:
                global_features = features[: len(views[0]) * p.global_crops_number]
                koleo = sum(koleo_loss(f) for f in global_features.chunk(p.global_crops_number))
                self.loss.last_stats["koleo"] = koleo.detach()
                loss = loss + p.koleo_weight * koleo
        if p.inject_nonfinite_at_step is not None and it == p.inject_nonfinite_at_step:
            loss = loss * float("nan")
        return loss

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients (set, not accumulated), per-tensor clipping, and the last layer's gradients
        dropped while it is frozen."""
        p = self.params.pretrain
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if p.clip_grad > 0:
            clip_gradients_per_tensor(self.student, p.clip_grad)
        if self.progress.epoch < p.freeze_last_layer:
            cancel_last_layer_gradients(self.student.head.last_layer)

    def views(self, batch: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
        """A loader batch as the normalised views on the device: uint8 images augmented here
        (`augment: batch`), or the loader's uint8 views (`augment: pil`) normalised."""
        if self.batch_augment is not None:
            return self.augment(batch)
        return normalize_views([view.to(self.device, non_blocking=True) for view in batch])

    def augment(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Batched multi-crop of uint8 images on the device; its randomness is a function of
        (seed, rank, global step), so a resumed run makes the same crops."""
        p = self.params.pretrain
        seed = int(np.random.SeedSequence([p.seed, self.dist.rank, self.progress.global_step]).generate_state(1)[0])
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return self.batch_augment(images.to(self.device, non_blocking=True), generator)

    def check_losses(self) -> list[float]:
        """Read the losses of the steps since the last check (one host sync) and stop at the
        first non-finite one. On a GPU this runs at every log step and before every checkpoint,
        so a checkpoint never holds weights updated by a non-finite step."""
        if not self.pending_losses:
            return []
        # averaged over ranks: every rank stops at the same non-finite step
        values = all_reduce_mean(torch.stack([loss for _, _, loss in self.pending_losses]).float()).tolist()
        pending, self.pending_losses = self.pending_losses, []
        for (step, epoch, _), value in zip(pending, values):
            if not math.isfinite(value):
                self.finish_checkpoint()  # the checkpoint in flight holds finite steps only
                raise StageError(
                    f"non-finite loss ({value}) at step {step} (epoch {epoch}); last good checkpoint: "
                    f"{self.last_checkpoint or 'none written yet'} (left intact)"
                )
        self.epoch_losses.extend(values)
        self.last_loss = values[-1]
        return values

    def batches(self, epoch: int, start_step: int) -> Iterable[torch.Tensor | list[torch.Tensor]]:
        """This rank's batches of an epoch from `start_step` on: uint8 images (`augment: batch`)
        from memory or from a loader, or the loader's uint8 views (`augment: pil`)."""
        p = self.params.pretrain
        sampler = EpochBatches(len(self.dataset), p.batch_size_per_gpu, p.seed, epoch,
                               self.dist.rank, self.dist.world_size, start_step)
        if self.decoded is not None:
            return self.decoded.batches(sampler)
        # A generator of its own: a loader draws its workers' base seed when iterated, and from
        # the global RNG that would shift the model's random stream on every resume.
        generator = torch.Generator().manual_seed(p.seed * 100_003 + epoch)
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=p.num_workers,
                            collate_fn=self.collate, pin_memory=self.device.type == "cuda",
                            generator=generator)
        return (batch for batch, _ in loader)

    def fit(self, live=None) -> dict:
        p = self.params.pretrain
        spe = self.schedules.steps_per_epoch
        images_per_step = p.batch_size_per_gpu * self.dist.world_size
        start_time, start_step = time.perf_counter(), self.progress.global_step
        self.clock = start_time  # save() adds the time since to progress.train_seconds
        bar = tqdm(total=p.epochs * spe, initial=start_step, disable=not self.dist.is_main,
                   unit="step", desc="pretrain", dynamic_ncols=True)
        with preemption.handler() as stop, self.completing_checkpoints():
            while self.progress.epoch < p.epochs:
                epoch = self.progress.epoch
                for batch in self.batches(epoch, self.progress.step_in_epoch):
                    self.train_step(self.views(batch))
                    self.progress.global_step += 1
                    self.progress.step_in_epoch += 1
                    step = self.progress.global_step
                    end_of_epoch = self.progress.step_in_epoch == spe
                    log_step = step % p.log_every_steps == 0
                    if log_step or end_of_epoch:
                        self.check_losses()
                        self.log_step(live, self.last_loss)
                        rate = (step - start_step) * images_per_step / (time.perf_counter() - start_time)
                        bar.set_postfix(loss=f"{self.last_loss:.3f}", img_s=f"{rate:.0f}")
                    bar.update(1)
                    if end_of_epoch:
                        continue  # the epoch's end checkpoints and checks for a stop below
                    if p.checkpoint_every_steps and step % p.checkpoint_every_steps == 0:
                        self.save()
                    # read at log steps only: with several ranks it is a collective and a host wait
                    if log_step and stop.requested:
                        self.stop(stop, bar)
                if p.teacher == "previous_epoch":
                    copy_weights(self.teacher, self.student)
                self.check_losses()
                mean_loss = float(np.mean(self.epoch_losses)) if self.epoch_losses else float("nan")
                self.progress.history.append(mean_loss)
                self.progress.epoch += 1
                self.progress.step_in_epoch = 0
                self.epoch_losses = []
                if live is not None:
                    live.log_metric("epoch/loss", mean_loss)
                    live.log_metric("epoch/epoch", epoch)
                self.save()
                if stop.requested:
                    self.stop(stop, bar)
        bar.close()
        seconds = self.progress.train_seconds  # the whole run's, a rerun of a finished one included
        return {
            "loss": self.progress.history[-1],
            "loss_first_epoch": self.progress.history[0],
            "epochs": p.epochs,
            "steps": self.progress.global_step,
            "images_per_second": self.progress.global_step * images_per_step / seconds if seconds else 0.0,
            "processes": self.dist.world_size,
            **{k: v for k, v in self.last_stats.items()},
        }

    def stop(self, stop: preemption.StopRequest, bar: tqdm) -> None:
        """Leave after a stop signal; the step in flight was finished by the caller."""
        if self.saved_step != self.progress.global_step:
            self.save()
        self.finish_checkpoint()  # leave names a checkpoint that is on disk
        bar.close()
        preemption.leave(stop.signal_name, self.last_checkpoint, requeue=self.params.pretrain.on_preempt == "requeue")

    def log_step(self, live, loss: float) -> None:
        p, it = self.params.pretrain, self.progress.global_step - 1
        names = [*self.loss.last_stats, "center_norm"]
        values = [torch.as_tensor(v, dtype=torch.float32, device=self.device) for v in self.loss.last_stats.values()]
        # averaged over ranks: every rank logs the same numbers and takes the same collapse decision
        values = all_reduce_mean(torch.stack([*values, self.loss.center.norm().float()]))
        stats = dict(zip(names, values.tolist()))  # one host wait
        self.last_stats = stats
        self.guard.update(it, p.log_every_steps, stats["teacher_entropy"], stats["teacher_batch_entropy"])
        if live is None:
            return
        live.step = it
        live.log_metric("train/loss", loss)
        live.log_metric("train/lr", float(self.schedules.lr[it]))
        live.log_metric("train/wd", float(self.schedules.wd[it]))
        live.log_metric("train/momentum", float(self.schedules.momentum[it]))
        for name, value in stats.items():
            live.log_metric(f"train/{name}", value)


def export_teacher(trainer: Trainer, path: str | Path) -> None:
    """The teacher backbone alone, for the evaluation stages (read by load_backbone)."""
    torch_save({
        "teacher_backbone": trainer.teacher.backbone.state_dict(),
        "model": trainer.params.model.model_dump(mode="json"),
        "global_step": trainer.progress.global_step,
    }, path)


def open_live(params: Params, resume_step: int):
    """dvclive logger; on resume, rows logged after the checkpoint's step are dropped first."""
    from dvclive import Live

    if resume_step:
        _truncate_live_logs(Path(params.paths.dvclive), resume_step)
    return Live(dir=params.paths.dvclive, resume=resume_step > 0, save_dvc_exp=False, dvcyaml=False)


def _truncate_live_logs(directory: Path, resume_step: int) -> None:
    for tsv in directory.glob("plots/metrics/**/*.tsv"):
        lines = tsv.read_text().splitlines()
        if not lines:
            continue
        header, rows = lines[0], lines[1:]
        column = header.split("\t").index("step")
        kept = [r for r in rows if int(r.split("\t")[column]) < resume_step]
        write_text(tsv, "\n".join([header, *kept]) + "\n")  # atomically: a kill here keeps the whole curve


def run(params: Params) -> dict:
    # gloo when training on the CPU, even on a GPU node (NCCL reduces CUDA tensors only)
    dist = init_distributed(backend="gloo" if params.pretrain.device == "cpu" else None)
    trainer = Trainer(params, dist)
    trainer.try_resume()
    live = open_live(params, trainer.progress.global_step) if dist.is_main else None
    try:
        metrics = trainer.fit(live)
    except CollapseError as exc:
        raise StageError(str(exc)) from exc
    finally:
        if live is not None:
            live.end()
    if dist.is_main:
        export_teacher(trainer, params.paths.teacher_backbone)
        write_json(Path(params.paths.metrics) / "pretrain.json", metrics)
        logger.info("pretrain done: %s", metrics)
    return metrics


def processes_to_start(argv: list[str]) -> int:
    """How many CPU processes main() starts with torchrun: `pretrain.cpu_processes`, or 1 (run
    here) when a launcher already started this one, a GPU is used, or the params are invalid
    (run_stage then refuses them with its own message)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--params", default="params.yaml")
    try:
        p = load_params(parser.parse_known_args(argv)[0].params).pretrain
    except ParamsError:
        return 1
    on_cpu = p.device == "cpu" or (p.device == "auto" and not torch.cuda.is_available())
    return p.cpu_processes if on_cpu and detect_launcher().world_size == 1 else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    processes = processes_to_start(argv)
    if processes > 1:
        threads = max(1, len(os.sched_getaffinity(0)) // processes)
        print(f"pretrain: starting {processes} CPU processes with {threads} thread(s) each (torchrun)",
              file=sys.stderr, flush=True)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        # exec: torchrun takes this process's place, so signals (preemption) reach it directly.
        os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  f"--nproc_per_node={processes}", "-m", "stages.pretrain", *argv])
    return run_stage("pretrain", run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
