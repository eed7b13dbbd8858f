"""The whole training step recorded once as a CUDA graph and then replayed (`pretrain.cuda_graphs`).

An eager ViT-S/16 step dispatches about 3,700 operations from Python, 1,800 of them kernels
(forward, backward, clipping, AdamW, EMA; counted on the CPU, the same on a GPU), whatever the
batch; their host-side cost is a large part of a step at 64 images per GPU (on the H200 node a fit
of step time against batch size leaves ~26 ms of a 64 ms step that does not grow with the batch).
A replayed graph launches all of them at once.

The step is Trainer.train_step's, with what changes from step to step held in 0-dim device
tensors that the recorded kernels read: the learning rate (fused AdamW takes it as a tensor), the
weight-decay factor 1 − lr·wd (AdamW's decoupled decay, applied with a foreach multiply to the
parameters AdamW would decay, just before its update as AdamW does), the teacher momentum and τt.
Inputs are copied into static buffers. The first steps of each configuration (the last layer frozen
or not) run eagerly on a side stream, as torch's CUDA-graph notes ask (optimizer state, cuBLAS
workspaces and autocast caches are made outside the capture); the next one records the graph and
every later one replays it. On the CPU the same step runs eagerly every time, which is what the
tests compare with the eager step.

Limits (checked by Trainer): one process (no DDP), AdamW, bf16 or fp32, fixed shapes.
"""

from __future__ import annotations

import torch

from stages.dino.teacher import ema_update

#: Eager steps per configuration before recording (torch's whole-network example uses 3).
WARM_STEPS = 3


class GraphedStep:
    def __init__(self, trainer):
        self.trainer = trainer
        device = trainer.device
        self.record = device.type == "cuda"
        self.lr = torch.zeros((), device=device)
        self.decay = torch.ones((), device=device)
        self.momentum = torch.zeros((), device=device)
        self.temp = torch.ones((), device=device)
        self.regularized = list(trainer.optimizer.param_groups[0]["params"])
        self.views: list[torch.Tensor] | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_loss: torch.Tensor | None = None
        self.frozen: bool | None = None  # the configuration of the graph or of the warm steps
        self.warm_steps = 0
        self.side_stream = torch.cuda.Stream(device) if self.record else None

    def __call__(self, views: list[torch.Tensor], it: int, epoch: int) -> torch.Tensor:
        """One training step at global step `it` of `epoch`; returns the step's loss (a tensor of
        its own, so losses of several steps can be read at once)."""
        trainer = self.trainer
        schedules, p = trainer.schedules, trainer.params.pretrain
        lr, wd = float(schedules.lr[it]), float(schedules.wd[it])
        self.lr.fill_(lr)
        self.decay.fill_(1.0 - lr * wd)
        self.momentum.fill_(float(schedules.momentum[it]))
        self.temp.fill_(float(trainer.loss.teacher_temp_schedule[epoch]))
        self.load_views(views)
        frozen = epoch < p.freeze_last_layer
        if self.graph is not None and frozen == self.frozen:
            self.graph.replay()
            return self.graph_loss.clone()
        if frozen != self.frozen:
            self.graph = self.graph_loss = None  # frees the old graph's memory
            self.frozen, self.warm_steps = frozen, 0
        self.use_tensor_schedules()
        # Free the last step's gradients now, not while recording (as torch's notes do)
        trainer.optimizer.zero_grad(set_to_none=True)
        if not self.record:
            return self.run()
        if self.warm_steps < WARM_STEPS:
            self.warm_steps += 1
            self.side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side_stream):
                loss = self.run()
            torch.cuda.current_stream().wait_stream(self.side_stream)
            return loss
        torch.cuda.empty_cache()  # the warm steps' cached activations: the graph gets its own pool
        graph = torch.cuda.CUDAGraph()
        # thread_local: the loader's pin-memory thread goes on allocating while this one records
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.graph_loss = self.run()
        self.graph = graph
        graph.replay()  # recording ran nothing: this is the step
        return self.graph_loss.clone()

    def run(self) -> torch.Tensor:
        """The step on the static views (what is recorded)."""
        trainer = self.trainer
        loss = trainer.forward_loss(self.views, self.temp)
        trainer.backward(loss)  # gradients are None here, so the recorded backward writes them afresh
        # AdamW decays only the parameters it updates: those with a gradient (not a frozen last layer)
        with torch.no_grad():
            torch._foreach_mul_([p for p in self.regularized if p.grad is not None], self.decay)
        trainer.optimizer.step()
        if trainer.params.pretrain.teacher == "ema":
            ema_update(trainer.teacher, trainer.student, self.momentum)
        return loss.detach()

    def load_views(self, views: list[torch.Tensor]) -> None:
        if self.views is None:
            self.views = [v.to(self.trainer.device, copy=True) for v in views]
            return
        shapes = [tuple(v.shape) for v in views]
        if shapes != [tuple(v.shape) for v in self.views]:
            raise ValueError(f"cuda_graphs: the views' shapes changed from "
                             f"{[tuple(v.shape) for v in self.views]} to {shapes}")
        for static, view in zip(self.views, views):
            static.copy_(view, non_blocking=True)

    def use_tensor_schedules(self) -> None:
        """lr from `self.lr` (fused AdamW reads a tensor lr), decay applied here, not by AdamW.
        A resumed optimizer state holds the saved run's values, so this runs before each record."""
        for group in self.trainer.optimizer.param_groups:
            group["lr"] = self.lr
            group["weight_decay"] = 0.0
            group["capturable"] = self.record
