"""benchmarks/: CPU smoke runs of every benchmark at toy sizes (recipe_probe and the device
driver gpu_recipes excluded: only gpu_recipes' arithmetic is checked).

Each runs as `python -m benchmarks.<name>` and must print one JSON line naming the device and the
torch version, echoing its configuration, with positive finite throughputs. Nothing here times
anything: the sizes only exercise the code paths.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
#: a 2-block 32-dim ViT on 16-pixel global and 8-pixel local crops
TINY_VIT = ["--arch", "vit_tiny", "--patch", "4", "--embed-dim", "32", "--depth", "2", "--heads", "2"]
TINY_CROPS = ["--global-size", "16", "--local-size", "8", "--local-crops", "2"]


def run_benchmark(name: str, *args: str, timeout: int = 120) -> dict:
    """The JSON of the last stdout line of `python -m benchmarks.<name> args`."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # two cores shared with other suites
    result = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines, result.stderr[-3000:]
    line = json.loads(lines[-1])
    assert line["benchmark"] == name
    assert line["device"] and line["torch"] == torch.__version__
    return line


def positive(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_step(cuda_graphs):
    flag = ["--cuda-graphs"] if cuda_graphs else []
    line = run_benchmark("step", *TINY_VIT, *TINY_CROPS, "--batch", "4", "--out-dim", "64",
                         "--device", "cpu", "--precision", "fp32", "--steps", "2", "--warmup", "1", *flag)
    assert "cpu" in line["device"]
    config = line["config"]
    assert config | {"embed_dim": 32, "depth": 2, "heads": 2, "batch": 4, "global_size": 16, "local_size": 8,
                     "local_crops": 2, "out_dim": 64, "steps": 2, "device": "cpu", "precision": "fp32",
                     "cuda_graphs": cuda_graphs} == config
    assert positive(line["images_per_second"], line["ms_per_step"], line["model_tflop_per_step"])
    assert line["peak_memory_gib"] is None and line["mfu"] is None  # CUDA-only numbers


def test_extract():
    line = run_benchmark("extract", *TINY_VIT, "--size", "16", "--batch", "8", "--batches", "4",
                         "--device", "cpu")
    assert "cpu" in line["device"]
    config = line["config"]
    assert config | {"embed_dim": 32, "size": 16, "batch": 8, "batches": 4, "pooling": "cls",
                     "device": "cpu"} == config
    assert positive(line["images_per_second"], line["seconds"])


@pytest.mark.parametrize("gray", [False, True])
def test_augment(gray):
    line = run_benchmark("augment", "--device", "cpu", "--batch", "2", "--global-size", "32",
                         "--local-size", "16", "--local-crops", "2", "--image-size", "64", "48",
                         "--iters", "2", "--warmup", "1", "--pil-images", "2", "--min-seconds", "0",
                         *(["--gray"] if gray else ["--ops"]))
    assert "cpu" in line["device"]
    assert line["config"] == {"batch": 2, "global_size": 32, "local_size": 16, "global_crops": 2,
                              "local_crops": 2, "image_size": [64, 48], "threads": 1, "iters": 2,
                              "gray": gray}
    for pil in (line["pil"], line["pil"]["lean"]):
        assert pil["images"] >= 2
        assert positive(pil["images_per_second"], pil["ms_per_image"])
    assert positive(line["pil"]["lean_speedup"])
    batched = line["batched"]
    assert positive(batched["images_per_second"], batched["ms_per_batch"], batched["ms_per_batch_min"],
                    batched["host_ms_per_batch"], batched["operations_per_batch"])
    assert line["images_per_second"] == batched["images_per_second"]
    assert line["ms_per_batch"] == batched["ms_per_batch"]
    if not gray:
        operations = line["operations"]
        assert positive(operations["decode"])
        for size in ("224", "96"):
            assert set(operations[size]) == {"crop+resize", "brightness", "contrast", "saturation", "hue",
                                             "grayscale", "blur"}
            assert all(positive(times["pil_ms"]) for times in operations[size].values())


@pytest.fixture(scope="module")
def e2e_workdir(tmp_path_factory) -> Path:
    """One folder for both e2e runs: the second reuses the first's JPEGs and shards."""
    return tmp_path_factory.mktemp("e2e")


@pytest.mark.parametrize("augment", ["pil", "batch"])
def test_e2e(augment, e2e_workdir):
    line = run_benchmark("e2e", "--images", "16", "--workers", "0", "--augment", augment, *TINY_VIT,
                         *TINY_CROPS, "--batch", "4", "--out-dim", "64", "--steps", "2", "--warmup", "1",
                         "--workdir", str(e2e_workdir))
    config = line["config"]
    assert config | {"images": 16, "workers": 0, "augment": augment, "embed_dim": 32, "batch": 4,
                     "global_size": 16, "steps": 2, "workdir": str(e2e_workdir)} == config
    assert (e2e_workdir / "shards" / "manifest.json").exists()
    assert positive(line["images_per_second"], line["ms_per_step"])
    if not torch.cuda.is_available():  # e2e has no --device: the trainer's auto picks the CPU, in fp32
        assert "cpu" in line["device"] and config["precision"] == "fp32"


def test_checkpoint(tmp_path):
    line = run_benchmark("checkpoint", *TINY_VIT, "--img-size", "16", *TINY_CROPS, "--out-dim", "64",
                         "--head-hidden", "32", "--head-bottleneck", "16", "--batch", "2", "--device", "cpu",
                         "--dir", str(tmp_path), "--repeats", "2", timeout=300)
    assert "cpu" in line["device"]
    config = line["config"]
    assert config | {"embed_dim": 32, "depth": 2, "heads": 2, "img_size": 16, "out_dim": 64, "head_hidden": 32,
                     "head_bottleneck": 16, "device": "cpu", "dir": str(tmp_path), "repeats": 2,
                     "filesystem_dir": str(tmp_path)} == config
    times = ("state", "serialize", "save", "async_save", "async_total", "load", "restore")
    assert positive(line["size_mib"], line["save_mib_per_s"], line["student_parameters"],
                    *(line[f"{name}_s"] for name in times), *(line[f"{name}_s_min"] for name in times))
    assert all(math.isfinite(line[f"{name}_cpu_s"]) and line[f"{name}_cpu_s"] >= 0 for name in times)
    assert all(len(line[f"{name}_s_all"]) == 2 for name in times)
    assert all(a < b for a, b in zip(line["async_save_s_all"], line["async_total_s_all"]))
    # student + teacher weights and two AdamW moments per trainable parameter, in float32
    assert line["adamw_moment_elements"] > line["student_parameters"]
    assert line["size_mib"] * 2**20 > 4 * (2 * line["student_parameters"] + line["adamw_moment_elements"])
    assert list(tmp_path.iterdir()) == []  # its temporary folder is removed


def test_knn_agrees_with_reference():
    line = run_benchmark("knn", "--train", "500", "--test", "200", "--dim", "16", "--classes", "5", "--k", "10",
                         "--noise", "2")
    assert line["config"] == {"train": 500, "test": 200, "dim": 16, "classes": 5, "noise": 2.0, "k": 10}
    assert positive(line["seconds"], line["reference_seconds"], line["speedup"])
    assert 100 / 5 < line["top1"] < 100  # above chance, not trivial
    assert line["predictions_equal_reference"] == 1.0
    assert line["top1"] == pytest.approx(line["reference_top1"])


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="cuda_check compares a CUDA step with a CPU step and runs the DAG on CUDA: "
                           "nothing of it runs without a GPU")
def test_cuda_check(tmp_path):
    line = run_benchmark("cuda_check", "--workdir", str(tmp_path), timeout=600)
    assert math.isfinite(line["step_loss_cpu"]) and math.isfinite(line["step_loss_cuda"])
    assert line["step_loss_cuda"] == pytest.approx(line["step_loss_cpu"], rel=1e-3)
    assert "graphs_error" not in line, line.get("graphs_error")
    assert line["graphs_losses_graphed"] == pytest.approx(line["graphs_losses_eager"], rel=1e-4)
    assert line["graphs_teacher_max_diff"] < 1e-4
    assert line["augment_mean_diff"] < 0.05 and line["augment_max_diff"] <= 3, line


def test_gpu_recipes_fits_the_epochs_to_the_deadline():
    from benchmarks.gpu_recipes import fitting_epochs
    # 2 of 60 epochs done at 22.5 s each (24.75 with the 1.1 margin), 60 s in, 20 s to start again:
    # the rest would end at 60 + 58 * 24.75 + 4 evaluations * 5 s = 1515.5 s, past 500 s
    assert fitting_epochs(60, 2, 22.5, 60, 20, 500) == 16  # floor((500 - 60 - 20 - 4 * 5) / 24.75)
    assert fitting_epochs(60, 2, 2.0, 60, 20, 500) is None  # ends at 60 + 58 * 2.2 + 20 = 207.6 s
    assert fitting_epochs(60, 2, 200.0, 60, 20, 500) == 2  # never fewer than two epochs


def test_gpu_recipes_scales_the_warmups_with_the_epochs():
    from benchmarks.gpu_recipes import eval_epochs, schedule_overrides
    from stages.presets import load_preset

    # fmnist-cpu: params.yaml's 1-epoch lr warm-up, no teacher-temperature warm-up; twice its epochs
    epochs = 2 * load_preset("fmnist-cpu")["pretrain"]["epochs"]
    assert schedule_overrides("fmnist-cpu", epochs) == [
        f"pretrain.epochs={epochs}", "pretrain.warmup_epochs=2", "pretrain.warmup_teacher_temp_epochs=0"]
    assert eval_epochs(15) == [3, 7, 11, 15]
    assert eval_epochs(2) == [1, 2]
