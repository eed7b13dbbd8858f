"""dvc.yaml and the Snakefile describe one DAG: same stage/rule names, commands, deps/inputs,
outs/outputs, metrics and params sections, all paths from the params file.

DVC is read through its own API (templating resolved by DVC against params.yaml); the Snakefile
through Snakemake's (the parsed rules, dumped as JSON by a subprocess)."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tiny_config import tiny_params, write_params

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
WORKFLOW_FILES = ["Snakefile", "dvc.yaml", "workflow"]
# Shared plumbing every stage imports; a change there must not rerun the whole pipeline.
INFRASTRUCTURE = {"stages/__init__.py", "stages/cli.py", "stages/params.py", "stages/atomic.py"}
# Named params of a rule that are not params sections.
RULE_PLUMBING_PARAMS = {"file", "launcher"}

SNAKEMAKE_DUMP = r"""
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

configfiles = [Path(p) for p in sys.argv[1:]]
with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
    workflow_api = api.workflow(
        snakefile=Path("Snakefile"), workdir=Path.cwd(),
        resource_settings=ResourceSettings(),
        config_settings=ConfigSettings(configfiles=configfiles),
    )
    workflow = workflow_api._workflow  # the parsed workflow (snakemake is pinned)
    rules = {}
    for rule in workflow.rules:
        resources = {
            name: res.raw for name, res in rule.resources.items()
            if not name.startswith("_") and isinstance(res.raw, (int, str))
        }
        rules[rule.name] = {
            "input": {k: list(v) if isinstance(v, list) else [v] for k, v in rule.input.items()},
            "output": [str(f) for f in rule.output],
            "directory_outputs": [str(f) for f in rule.output if f.is_directory],
            "log": [str(f) for f in rule.log],
            "params": {k: v for k, v in rule.params.items()},
            "shellcmd": rule.shellcmd,
            "threads": rule.resources["_cores"].raw,
            "resources": resources,
        }
    json.dump({"rules": rules, "config": workflow.config}, sys.stdout)
"""


def snakemake_rules(root: Path, *configfiles: Path) -> dict:
    """The parsed rules of root/Snakefile (and the config they saw)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(
        [sys.executable, "-c", SNAKEMAKE_DUMP, *map(str, configfiles)],
        cwd=root, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@dataclass
class DvcStage:
    cmd: str
    deps: set[str] = field(default_factory=set)
    params: set[str] = field(default_factory=set)
    outs: set[str] = field(default_factory=set)  # cached outs, not persisted
    persist: set[str] = field(default_factory=set)
    metrics: set[str] = field(default_factory=set)
    plots: dict[str, dict] = field(default_factory=dict)


def dvc_stages(root: Path) -> dict[str, DvcStage]:
    """root/dvc.yaml as DVC resolves it (${...} from root/params.yaml)."""
    from dvc.repo import Repo

    stages = {}
    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            info = DvcStage(cmd=stage.cmd)
            for dep in stage.deps:
                if hasattr(dep, "params") and dep.def_path == "params.yaml":
                    info.params |= set(dep.params)
                else:
                    info.deps.add(dep.def_path)
            for out in stage.outs:
                if out.metric:
                    info.metrics.add(out.def_path)
                    assert not out.use_cache, f"{stage.name}: metrics {out.def_path} must be cache: false"
                elif out.plot:
                    info.plots[out.def_path] = {"persist": out.persist, **(out.plot if isinstance(out.plot, dict) else {})}
                elif out.persist:
                    info.persist.add(out.def_path)
                else:
                    info.outs.add(out.def_path)
            stages[stage.name] = info
    return stages


def workflow_copy(dst: Path, params: dict | None) -> Path:
    """The workflow files (and params.yaml, or the given params) in a fresh DVC repo at dst."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst / name)
    if params is None:
        shutil.copy(REPO / "params.yaml", dst / "params.yaml")
    else:
        write_params(dst / "params.yaml", params)
    subprocess.run([str(VENV_BIN / "dvc"), "init", "--no-scm", "-q"], cwd=dst, check=True)
    return dst


@pytest.fixture(scope="module", params=["params.yaml", "tiny"])
def both(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, DvcStage], dict, dict]:
    """(dvc stages, snakemake rules, validated config) for the project's params.yaml and for the
    tiny params with every path moved elsewhere (so a hard-coded path cannot agree by chance)."""
    root = tmp_path_factory.mktemp("dag")
    params = None if request.param == "params.yaml" else tiny_params(Path("elsewhere"))
    if params is not None:
        params["paths"]["logs"] = "elsewhere/logs"
    workflow_copy(root, params)
    dump = snakemake_rules(root)
    return dvc_stages(root), dump["rules"], dump["config"]


def _stage_rules(rules: dict) -> dict:
    return {name: rule for name, rule in rules.items() if name != "all"}


def _inputs(rule: dict) -> set[str]:
    return {path for paths in rule["input"].values() for path in paths}


def test_same_names(both) -> None:
    stages, rules, _ = both
    assert set(stages) == set(_stage_rules(rules))
    assert set(stages) == {
        "shard", "pretrain", "extract", "knn", "linear", "fewshot", "attention", "tsne", "retrieval",
        "copydetect", "davis", "transfer", "report",
    }


def test_same_commands(both) -> None:
    """Snakemake runs exactly DVC's command, given the params file explicitly, with a launcher
    prefix (empty, or srun inside SLURM) and its output sent to the rule's log."""
    stages, rules, _ = both
    for name, stage in stages.items():
        assert stage.cmd == f"python -m stages.{name}"
        expected = f"{{params.launcher}}{stage.cmd} --params {{params.file}} > {{log}} 2>&1"
        assert rules[name]["shellcmd"] == expected, name
        assert rules[name]["params"]["file"] == "params.yaml"
        assert rules[name]["params"]["launcher"] == ""  # single-task rules run python directly


def test_same_deps(both) -> None:
    stages, rules, _ = both
    for name, stage in stages.items():
        assert stage.deps == _inputs(rules[name]), name


def test_same_outs_and_metrics(both) -> None:
    """DVC's outs, metrics and plots are Snakemake's outputs, except those DVC persists (a
    checkpoint to resume from): Snakemake deletes outputs before a job, so they are not declared."""
    stages, rules, _ = both
    for name, stage in stages.items():
        persisted = stage.persist | {p for p, plot in stage.plots.items() if plot["persist"]}
        produced = stage.outs | stage.metrics | (set(stage.plots) - persisted)
        assert set(rules[name]["output"]) == produced, name
        assert not persisted & set(rules[name]["output"]), name


def test_same_params_sections(both) -> None:
    """The params sections DVC tracks are the params Snakemake reruns a rule on, with the
    validated file's values."""
    stages, rules, config = both
    for name, stage in stages.items():
        sections = set(rules[name]["params"]) - RULE_PLUMBING_PARAMS
        assert stage.params == sections, name
        for section in sections:
            assert rules[name]["params"][section] == config[section], (name, section)
        assert "resources" not in stage.params and "paths" not in stage.params


def _string_values(section: dict) -> set[str]:
    return {v for v in section.values() if isinstance(v, str)}


def test_paths_come_from_params(both) -> None:
    """Every data path of the DAG is a `paths:` entry, an entry of a params section the stage
    reads (e.g. davis.results), or another stage's metrics file or figure; every stage
    writes its metrics to <paths.metrics>/<stage>.json and its plots under paths.plots (the
    evaluations) or paths.dvclive (the training curves)."""
    stages, rules, config = both
    paths = config["paths"]
    metrics_files = {f"{paths['metrics']}/{name}.json" for name in stages}
    figures = set().union(*(stage.plots for stage in stages.values()))  # the report reads them
    for name, stage in stages.items():
        declared = set(paths.values()).union(*(_string_values(config[s]) for s in stage.params))
        data = {p for p in stage.deps if not p.startswith("stages/")} | stage.outs | stage.persist
        undeclared = data - declared - metrics_files - (figures - set(stage.plots))
        assert not undeclared, (name, undeclared)
        assert f"{paths['metrics']}/{name}.json" not in stage.deps, name
        assert stage.metrics == {f"{paths['metrics']}/{name}.json"} or not stage.metrics
        for plot in stage.plots:
            assert plot.startswith((paths["dvclive"] + "/", paths["plots"] + "/")), (name, plot)
        assert rules[name]["log"] == [f"{paths['logs']}/{name}.log"]
    assert stages["pretrain"].persist == {paths["checkpoints"]}
    assert stages["pretrain"].outs == {paths["teacher_backbone"]}
    assert stages["linear"].persist == {paths["linear"]}
    assert stages["transfer"].persist == {paths["transfer"]}
    assert stages["davis"].outs == {config["davis"]["results"]}
    assert stages["report"].outs == {paths["report"]}


def test_directories_are_directory_outputs(both) -> None:
    """The folders of the DAG are Snakemake directory() outputs, its files are not."""
    stages, rules, config = both
    paths = config["paths"]
    folders = {
        paths["shards"], paths["features"], paths["checkpoints"], paths["linear"], paths["transfer"],
        paths["report"], f"{paths['plots']}/attention", config["davis"]["results"],
    }
    outputs = set()
    for name, rule in _stage_rules(rules).items():
        for out in rule["output"]:
            is_dir = out in folders
            assert (out in rule["directory_outputs"]) == is_dir, (name, out)
            assert is_dir == (Path(out).suffix == ""), (name, out)  # files: .json, .pth, .png, .csv
        outputs |= set(rule["output"])
    assert folders - outputs == {paths["checkpoints"], paths["linear"], paths["transfer"]}  # persisted


def test_rule_all_collects_every_metrics_file(both) -> None:
    """Rule all asks for every metrics file and the report (the one stage without metrics), so
    that `snakemake all` runs what `dvc repro` runs."""
    stages, rules, config = both
    metrics = set().union(*(stage.metrics for stage in stages.values()))
    assert _inputs(rules["all"]) == metrics | {config["paths"]["report"]}
    # every stage is reached from `all`: through its metrics, its outputs, or a stage reading them
    wanted = _inputs(rules["all"])
    read = set().union(*(stage.deps for stage in stages.values()))
    for name, stage in stages.items():
        produced = stage.metrics | stage.outs | set(stage.plots)
        assert produced & (wanted | read), name


def test_plots_are_dvclive_curves_and_evaluation_figures(both) -> None:
    """pretrain's training curves (dvclive, persisted across a resume) and the evaluations'
    figures and tables under paths.plots, each drawn by `dvc plots show`."""
    stages, _, config = both
    plots_dir = config["paths"]["plots"]
    assert stages["pretrain"].plots == {
        f"{config['paths']['dvclive']}/plots/metrics": {"persist": True, "x": "step"}
    }
    assert stages["attention"].plots == {f"{plots_dir}/attention": {"persist": False}}
    assert stages["tsne"].plots == {
        f"{plots_dir}/tsne.png": {"persist": False},
        f"{plots_dir}/tsne.csv": {"persist": False, "x": "x", "y": "y", "template": "scatter"},
    }
    assert stages["davis"].plots == {
        f"{plots_dir}/davis_per_sequence.csv": {
            "persist": False, "x": "J&F-Mean", "y": "name", "template": "bar_horizontal"
        }
    }
    others = {name for name, stage in stages.items() if stage.plots} - {"pretrain", "attention", "tsne", "davis"}
    assert not others, others


def _imports(module_file: Path) -> set[str]:
    """`stages.*` modules imported anywhere in a file (function-level imports included)."""
    tree = ast.parse(module_file.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name == "stages" or name.startswith("stages.")}


def _module_file(name: str) -> Path | None:
    base = REPO / Path(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def stage_module_file(stage: str) -> Path | None:
    """What `python -m stages.<stage>` runs: stages/<stage>.py or stages/<stage>/__main__.py."""
    module = REPO / "stages" / f"{stage}.py"
    if module.is_file():
        return module
    main = REPO / "stages" / stage / "__main__.py"
    return main if main.is_file() else None


def code_closure(stage: str) -> set[str]:
    """Repo-relative files of every stages.* module the stage runs or imports, transitively (a
    package's __init__.py and, for `python -m`, its __main__.py)."""
    todo, seen = [f"stages.{stage}"], set()
    main = stage_module_file(stage)
    if main is not None:
        seen.add(main)
        todo.extend(_imports(main))
    while todo:
        path = _module_file(todo.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        todo.extend(_imports(path))
    return {str(p.relative_to(REPO)) for p in seen}


def test_code_deps_cover_every_imported_module() -> None:
    """Each stage depends on the code it runs: every stages.* module it imports (transitively),
    but the shared infrastructure, lies under one of its code deps."""
    stages = dvc_stages(REPO)
    for name, stage in stages.items():
        code = {d for d in stage.deps if d.startswith("stages/")}
        needed = code_closure(name) - INFRASTRUCTURE
        main = stage_module_file(name)
        assert main is not None, f"no module stages/{name}.py nor stages/{name}/__main__.py"
        assert str(main.relative_to(REPO)) in needed
        uncovered = {f for f in needed if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in code)}
        assert not uncovered, f"{name}: code it imports is not a dep: {sorted(uncovered)}"
        for dep in code:
            assert (REPO / dep).exists(), f"{name}: dep {dep} does not exist"


def test_multi_task_rule_runs_under_srun_only_inside_slurm(tmp_path: Path) -> None:
    """A multi-node pretrain is an MPI-style job for the SLURM plugin, launched by our srun when
    the shell is inside an allocation and as one plain process anywhere else."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["resources"]["pretrain"].update(nodes=2, tasks_per_node=4, gpus_per_node=4)
    root = workflow_copy(tmp_path / "multi", params)
    rules = snakemake_rules(root)["rules"]
    pretrain = rules["pretrain"]
    launcher = pretrain["params"]["launcher"]
    assert launcher == "${SLURM_JOB_ID:+srun --nodes=2 --ntasks-per-node=4 }"
    res = pretrain["resources"]
    assert res["mpi"] == "srun" and res["nodes"] == 2 and res["tasks_per_node"] == 4
    assert res["gres"] == "gpu:4" and res["tasks_per_gpu"] == 1
    assert res["slurm_partition"] == "gpu" and res["runtime"] == 1440 and res["cpus_per_task"] == 10
    assert rules["shard"]["params"]["launcher"] == "" and "mpi" not in rules["shard"]["resources"]

    script = f"echo {launcher}python -m stages.pretrain"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    outside = subprocess.run(["bash", "-euc", script], env=env, capture_output=True, text=True, check=True)
    inside = subprocess.run(["bash", "-euc", script], env=dict(env, SLURM_JOB_ID="42"), capture_output=True, text=True, check=True)
    assert outside.stdout.split() == ["python", "-m", "stages.pretrain"]
    assert inside.stdout.split() == ["srun", "--nodes=2", "--ntasks-per-node=4", "python", "-m", "stages.pretrain"]

    params["resources"]["launcher"] = "python"
    root = workflow_copy(tmp_path / "plain", params)
    pretrain = snakemake_rules(root)["rules"]["pretrain"]
    assert pretrain["params"]["launcher"] == "" and "mpi" not in pretrain["resources"]


def test_configfile_is_what_the_stages_read(tmp_path: Path) -> None:
    """With --configfile FILE, the stages get --params FILE and the rules see FILE's values
    only (nothing of params.yaml is merged in)."""
    root = workflow_copy(tmp_path / "cfg", None)
    tiny = tiny_params(Path("tiny-out"))
    write_params(root / "tiny.yaml", tiny)
    dump = snakemake_rules(root, root / "tiny.yaml")
    for name, rule in _stage_rules(dump["rules"]).items():
        assert rule["params"]["file"] == "tiny.yaml", name
    assert dump["config"]["dataset"]["source"] == "digits"
    assert dump["config"]["dataset"]["subset"] == {"train": 300, "val": 100}
    assert dump["config"]["paths"]["shards"] == "tiny-out/data/shards/digits"
    assert dump["config"]["pretrain"]["out_dim"] == 64


def _snakemake(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(
        [str(VENV_BIN / "snakemake"), *args], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )


def test_snakemake_refuses_bad_params_and_config_overrides(tmp_path: Path) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["pretrain"]["teacher_temp"] = -1.0
    root = workflow_copy(tmp_path / "bad", params)
    bad = _snakemake(root, "-n")
    assert bad.returncode != 0
    assert "pretrain.teacher_temp" in bad.stdout + bad.stderr

    good = workflow_copy(tmp_path / "good", None)
    override = _snakemake(good, "-n", "--config", "pretrain={'epochs': 3}")
    assert override.returncode != 0
    assert "--configfile" in override.stdout + override.stderr


def test_snakemake_lint_is_clean() -> None:
    result = _snakemake(REPO, "--lint")
    assert result.returncode == 0, result.stdout + result.stderr
