"""The step that `pretrain.cuda_graphs` records: on the CPU it runs eagerly, so its arithmetic is
compared here with the eager step's, and it is shown free of host synchronisations (a recorded
CUDA graph cannot contain one). The recording itself needs a GPU (benchmarks.cuda_check)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from host_waits import HostWaits
from tiny_config import tiny_params
from stages import pretrain, shard
from stages.cli import StageError
from stages.distributed import init_distributed
from stages.dino.optim import load_optimizer_state
from stages.params import validate_params
from stages.pretrain import Trainer

STEPS_PER_EPOCH = 2
CONFIGS = {
    "default": {},
    "koleo": {"koleo_weight": 0.1},
    "sinkhorn": {"teacher_output": "sinkhorn"},
    "mse": {"loss": "mse"},
    "bn_head": {"use_bn_in_head": True},
    "student_teacher": {"teacher": "student"},
}

def trainer(cuda_graphs: bool, **pretrain_overrides) -> Trainer:
    params = tiny_params(Path("/nonexistent"), pretrain={
        "cuda_graphs": cuda_graphs, "epochs": 3, "freeze_last_layer": 1, "batch_size_per_gpu": 4,
        "momentum_teacher": 0.9, **pretrain_overrides})
    return Trainer(validate_params(params), init_distributed(), steps_per_epoch=STEPS_PER_EPOCH)


def views() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return ([torch.randn(4, 3, 16, 16, generator=generator) for _ in range(2)]
            + [torch.randn(4, 3, 8, 8, generator=generator) for _ in range(2)])


def train(model: Trainer, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        model.progress.epoch = model.progress.global_step // STEPS_PER_EPOCH
        losses.append(float(model.train_step(views())))
        model.progress.global_step += 1
    return losses


@pytest.mark.parametrize("config", CONFIGS)
def test_graphed_step_computes_the_eager_step(config):
    """Three epochs (the last layer frozen in the first), stochastic depth on, weight decay 0.4
    (a decay lost or doubled would move weights by ~1e-4): same losses, weights, teacher and
    center, rounding apart. AdamW with a tensor lr and the decay applied beside it differs
    from AdamW's own decay in rounding, which Adam's normalised update turns into differences
    of a few 1e-6 after six steps of lr 2e-3. With BatchNorm in the head the biases
    feeding it have an exact gradient of 0 (BN removes a shift), so Adam scales rounding noise
    into updates of ~lr/10 and any two implementations drift apart there: losses only."""
    steps = 3 * STEPS_PER_EPOCH
    overrides = {"weight_decay": 0.4, **CONFIGS[config]}
    eager = trainer(False, **overrides)  # each Trainer seeds the RNG stochastic depth draws from
    eager_losses = train(eager, steps)
    graphed = trainer(True, **overrides)
    # abs: the MSE loss is ~0.09, where those weight differences move it by ~1e-6 (AMD Zen 4).
    assert train(graphed, steps) == pytest.approx(eager_losses, rel=1e-5, abs=2e-6)
    if config == "bn_head":
        return
    for module in ("student", "teacher"):
        for (name, a), b in zip(getattr(eager, module).state_dict().items(),
                                getattr(graphed, module).state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m: f"{module}.{name}: {m}")
    torch.testing.assert_close(graphed.loss.center, eager.loss.center, rtol=1e-5, atol=1e-7)
    assert float(graphed.loss.last_stats["teacher_temp"]) == pytest.approx(eager.loss.teacher_temp_schedule[2])


@pytest.mark.parametrize("config", CONFIGS)
def test_graphed_step_never_waits_for_the_device(config):
    """No operation of the step reads a value back to the host or makes a tensor from Python
    numbers (the eager step does: its loss records a float τt as a CPU tensor, harmless there and
    what the detector is shown to catch)."""
    for cuda_graphs, expect_syncs in ((False, True), (True, False)):
        model = trainer(cuda_graphs, **CONFIGS[config])
        train(model, STEPS_PER_EPOCH)  # into the epoch where the last layer trains too
        model.progress.epoch = 1
        with HostWaits() as syncs:
            model.train_step(views())
        assert bool(syncs.calls) == expect_syncs, (cuda_graphs, syncs.calls)


def test_frozen_last_layer_is_neither_updated_nor_decayed():
    model = trainer(True, weight_decay=0.5, weight_decay_end=0.5)
    last_layer = [p for p in model.student.head.last_layer.parameters() if p.requires_grad]
    before = [p.clone() for p in last_layer]
    first_block = model.student.backbone.blocks[0].mlp.fc1.weight.clone()
    train(model, STEPS_PER_EPOCH)  # epoch 0: frozen
    assert all(torch.equal(p, q) for p, q in zip(last_layer, before))
    assert not torch.equal(model.student.backbone.blocks[0].mlp.fc1.weight, first_block)
    train(model, 1)  # epoch 1: the last layer trains
    assert not any(torch.equal(p, q) for p, q in zip(last_layer, before))


@pytest.mark.parametrize("overrides, named", [
    ({"optimizer": "sgd"}, "optimizer 'sgd'"),
    ({"inject_nonfinite_at_step": 3}, "inject_nonfinite_at_step"),
])
def test_steps_that_cannot_be_recorded_are_refused(overrides, named):
    with pytest.raises(StageError, match=f"cuda_graphs cannot record.*{named}"):
        trainer(True, **overrides)


def test_several_processes_are_refused():
    params = validate_params(tiny_params(Path("/nonexistent"), pretrain={"cuda_graphs": True}))
    two_ranks = dataclasses.replace(init_distributed(), world_size=2)
    with pytest.raises(StageError, match=r"cuda_graphs cannot record.*2 processes"):
        Trainer(params, two_ranks, steps_per_epoch=2)


def test_changed_view_shapes_are_an_error():
    model = trainer(True)
    train(model, 1)
    with pytest.raises(ValueError, match="views' shapes changed"):
        model.train_step([v[:2] for v in views()])


def test_optimizer_state_keeps_the_loading_runs_flags():
    """A checkpoint of a graphed run (tensor lr, decay outside AdamW, capturable on a GPU)
    resumes in an eager run with the eager run's own AdamW, and the reverse."""
    graphed, eager = trainer(True), trainer(False)
    train(graphed, 1)
    train(eager, 1)
    saved = graphed.optimizer.state_dict()
    for group in saved["param_groups"]:
        group["capturable"] = True  # as a graphed run on a GPU saves it
    load_optimizer_state(eager.optimizer, saved)
    assert [g["capturable"] for g in eager.optimizer.param_groups] == [False, False]
    train(eager, 1)  # set_schedules puts float lr and weight decay back
    assert isinstance(eager.optimizer.param_groups[0]["lr"], float)
    load_optimizer_state(graphed.optimizer, eager.optimizer.state_dict())
    train(graphed, 1)  # the graphed step puts its tensor lr back
    assert graphed.optimizer.param_groups[0]["lr"] is graphed.graphed_step.lr


def test_stage_trains_with_cuda_graphs_and_resumes_without(tmp_path, caplog):
    """The whole stage with the graphed step (logging, checkpoints, export); cuda_graphs is a
    run-only key: the finished run is found again with it switched off."""
    params = tiny_params(tmp_path, pretrain={"epochs": 1, "cuda_graphs": True, "log_every_steps": 2})
    shard.run(validate_params(params))
    metrics = pretrain.run(validate_params(params))
    assert metrics["steps"] == 9
    params["pretrain"]["cuda_graphs"] = False
    with caplog.at_level("INFO"):
        again = pretrain.run(validate_params(params))
    assert "resumed from" in caplog.text and "other params" not in caplog.text
    assert again["steps"] == 9
