"""End to end under DVC, on the tiny digits config in a throw-away git + DVC repo: a second
`dvc repro` runs nothing, a pretrain param reruns pretrain/extract/knn but not shard,
`dvc metrics diff` shows the k-NN change, `dvc exp run -S` runs an experiment. Those target the
core stages (`dvc repro knn`: shard, pretrain, extract, knn); one test reproduces the whole DAG,
every evaluation and the report, under the project's .gitignore."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tiny_config import TINY_EVALUATIONS, tiny_params, write_params

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
STAGES = ["shard", "pretrain", "extract", "knn"]  # the core: `dvc repro knn`
TARGET = "knn"
EVALUATIONS = ["linear", "fewshot", "attention", "tsne", "retrieval", "copydetect", "davis", "transfer"]
ALL_STAGES = [*STAGES, *EVALUATIONS, "report"]


def e2e_params() -> dict:
    """The tiny config with repo-relative paths (DVC outs must lie inside the repo); the k-NN
    baselines are off to keep the runs short (they do not change the DAG)."""
    return tiny_params(Path("."), knn={"k": [5, 10], "baselines": False})


def tool_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DVC_"))}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env['PATH']}",
        DVC_NO_ANALYTICS="1",
        GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com",
    )
    env.pop("PYTHONPATH", None)  # `python -m stages.x` must find the repo's own copy
    return env


def sh(root: Path, *args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=root, env=tool_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def make_repo(root: Path, params: dict, gitignore: str = "__pycache__/\n.snakemake/\nlogs/\n") -> Path:
    """A git + DVC repo holding the project's pipeline files, its stages package and `params`."""
    root.mkdir(parents=True)
    shutil.copytree(REPO / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "workflow", root / "workflow")
    for name in ("dvc.yaml", "Snakefile"):
        shutil.copy(REPO / name, root / name)
    write_params(root / "params.yaml", params)
    sh(root, "git", "init", "-q")
    sh(root, "dvc", "init", "-q")
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")
    (root / ".gitignore").write_text(gitignore)
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-q", "-m", "pipeline")
    return root


def ran(output: str) -> set[str]:
    """Stages `dvc repro` / `dvc exp run` ran, from their output."""
    return {s for s in ALL_STAGES if f"Running stage '{s}'" in output}


def skipped(output: str) -> set[str]:
    return {s for s in ALL_STAGES if f"Stage '{s}' didn't change, skipping" in output}


def commit_all(root: Path, message: str) -> None:
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-q", "-m", message)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline reproduced once and committed (dvc.lock and the metrics in git)."""
    root = make_repo(tmp_path_factory.mktemp("dvc") / "repo", e2e_params())
    first = sh(root, "dvc", "repro", TARGET)
    assert ran(first.stdout) == set(STAGES), first.stdout
    commit_all(root, "first run")
    return root


def test_first_repro_wrote_every_output(repo: Path) -> None:
    for path in ["data/shards/digits/manifest.json", "models/teacher_backbone.pth", "checkpoints",
                 "features/digits/train/features.npy", "features/digits/val/labels.npy"]:
        assert (repo / path).exists(), path
    for stage in ("shard", "pretrain", "knn"):
        metrics = json.loads((repo / f"metrics/{stage}.json").read_text())
        assert metrics and all(isinstance(v, (int, float)) for v in metrics.values()), stage
    knn = json.loads((repo / "metrics/knn.json").read_text())
    assert {"top1_k5", "top1_k10", "top5_k5", "top5_k10"} <= set(knn)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    assert lock["stages"]["pretrain"]["params"]["params.yaml"]["pretrain"]["epochs"] == 2
    assert any(o["path"] == "checkpoints" for o in lock["stages"]["pretrain"]["outs"])


def test_second_repro_runs_nothing(repo: Path) -> None:
    status = sh(repo, "dvc", "status", "--with-deps", "--json", TARGET)
    assert json.loads(status.stdout) == {}
    again = sh(repo, "dvc", "repro", TARGET)
    assert ran(again.stdout) == set(), again.stdout
    assert skipped(again.stdout) == set(STAGES), again.stdout


def test_plots_show_the_training_curves(repo: Path) -> None:
    """`dvc plots show` draws pretrain's dvclive curves (x: step), the loss among them."""
    shown = json.loads(sh(repo, "dvc", "plots", "show", "--json").stdout)
    curves = {name: plots for name, plots in shown["data"].items() if name.startswith("dvclive/plots/metrics/")}
    assert any("loss" in name for name in curves), list(shown["data"])
    for name, plots in curves.items():
        assert plots[0]["content"]["encoding"]["x"]["field"] == "step", name
        assert plots[0]["content"]["data"]["values"], name


def test_pretrain_param_change_reruns_downstream_not_shard(repo: Path) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["pretrain"]["seed"] = 1
    write_params(repo / "params.yaml", params)
    manifest = repo / "data/shards/digits/manifest.json"
    manifest_stat = manifest.stat()

    status = json.loads(sh(repo, "dvc", "status", "--with-deps", "--json", TARGET).stdout)
    assert set(status) == {"pretrain"}, status  # extract/knn follow once pretrain changed its outs
    rerun = sh(repo, "dvc", "repro", TARGET)
    assert ran(rerun.stdout) == {"pretrain", "extract", "knn"}, rerun.stdout
    assert skipped(rerun.stdout) == {"shard"}, rerun.stdout
    assert manifest.stat().st_mtime_ns == manifest_stat.st_mtime_ns

    # dvc metrics diff (workspace vs HEAD) against the two JSON files read directly
    diff = json.loads(sh(repo, "dvc", "metrics", "diff", "--json").stdout)
    old = json.loads(sh(repo, "git", "show", "HEAD:metrics/knn.json").stdout)
    new = json.loads((repo / "metrics/knn.json").read_text())
    changed = {k for k in new if new[k] != old.get(k)}
    assert changed, f"the k-NN metrics did not change: {new}"
    assert set(diff["metrics/knn.json"]) == changed
    for key in changed:
        assert diff["metrics/knn.json"][key]["old"] == old[key]
        assert diff["metrics/knn.json"][key]["new"] == new[key]
        assert diff["metrics/knn.json"][key]["diff"] == pytest.approx(new[key] - old[key])
    commit_all(repo, "pretrain.seed 1")


def test_exp_run_sets_a_param(repo: Path) -> None:
    result = sh(repo, "dvc", "exp", "run", "-S", "pretrain.epochs=3", TARGET)
    assert ran(result.stdout) == {"pretrain", "extract", "knn"}, result.stdout
    assert yaml.safe_load((repo / "params.yaml").read_text())["pretrain"]["epochs"] == 3
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["pretrain"]["params"]["params.yaml"]["pretrain"]["epochs"] == 3
    assert json.loads((repo / "metrics/pretrain.json").read_text())["epochs"] == 3
    experiments = sh(repo, "dvc", "exp", "list", "--name-only").stdout.split()
    assert len(experiments) == 1, experiments
    shown = json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout)
    assert "pretrain.epochs" in json.dumps(shown) or '"epochs": 3' in json.dumps(shown)


# What `git status` may list after `dvc repro` of the whole DAG under the project's .gitignore:
# the files to commit (dvc.lock and the `cache: false` outputs). Everything else is DVC-cached or
# never committed (logs, regenerated fixtures).
COMMITTED_AFTER_REPRO = {"dvc.lock", *(f"metrics/{s}.json" for s in ALL_STAGES if s not in ("extract", "report")),
                         "metrics/fewshot_subsets.json", "plots/tsne.csv", "plots/davis_per_sequence.csv"}


def _untracked_and_modified(root: Path) -> set[str]:
    listed = sh(root, "git", "status", "--porcelain", "--untracked-files=all").stdout.splitlines()
    return {line[3:] for line in listed}


def test_full_dag_reproduces_every_stage(tmp_path: Path) -> None:
    """`dvc repro` of the whole DAG (every evaluation on its tiny size, the fixture-based ones on
    the fixtures they regenerate, then the report): every stage runs once, writes a flat numeric
    metrics file, a second repro runs nothing; `git status` lists only what is meant to be
    committed, and after the commit `dvc metrics diff` compares with HEAD's values."""
    params = tiny_params(Path("."), **TINY_EVALUATIONS)
    root = make_repo(tmp_path / "repo", params, gitignore=(REPO / ".gitignore").read_text())
    first = sh(root, "dvc", "repro")
    assert ran(first.stdout) == set(ALL_STAGES), first.stdout
    for stage in ALL_STAGES:
        if stage in ("extract", "report"):
            continue
        metrics = json.loads((root / f"metrics/{stage}.json").read_text())
        assert metrics, stage
        assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()), stage
    assert (root / "report/index.html").is_file() and (root / "report/summary.md").is_file()
    assert (root / "results/davis").is_dir() and any((root / "plots/attention").iterdir())
    assert json.loads(sh(root, "dvc", "status", "--json").stdout) == {}

    changed = _untracked_and_modified(root)
    curves = {p for p in changed if p.startswith("dvclive/plots/metrics/")}
    assert curves, changed  # the training curves are `cache: false` plots, kept in git
    assert changed - curves == COMMITTED_AFTER_REPRO
    commit_all(root, "full run")
    assert _untracked_and_modified(root) == set()

    params["fewshot"]["seed"] = 1  # other labelled samples: other accuracies
    write_params(root / "params.yaml", params)
    rerun = sh(root, "dvc", "repro")
    assert ran(rerun.stdout) == {"fewshot", "report"}, rerun.stdout
    diff = json.loads(sh(root, "dvc", "metrics", "diff", "--json").stdout)
    old = json.loads(sh(root, "git", "show", "HEAD:metrics/fewshot.json").stdout)
    new = json.loads((root / "metrics/fewshot.json").read_text())
    changed = {k for k in new if new[k] != old.get(k)}
    assert changed, f"the few-shot metrics did not change: {new}"
    assert set(diff) == {"metrics/fewshot.json"} and set(diff["metrics/fewshot.json"]) == changed, diff
    for key in changed:
        assert diff["metrics/fewshot.json"][key]["old"] == old[key], key
        assert diff["metrics/fewshot.json"][key]["new"] == new[key], key
