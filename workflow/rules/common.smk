# Shared by every .smk file. The validated params, the params file the stages are given, each
# rule's scheduler resources and launcher, and the hand-over of finished outputs to DVC.
# Functions only (no rules), as the Snakemake workflow template keeps them.

import shutil
import subprocess
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger as _log

from stages.params import ParamsError, RuleResources, load_params


def params_file() -> str:
    """The params file every stage is given with --params: params.yaml, or the single file passed
    with --configfile. Values given with --config would reach Snakemake but not the stages, so
    they are refused."""
    if workflow.config_settings.config:
        raise WorkflowError(
            "--config overrides are not passed to the stages (they read one params file); "
            "write the values into a params file and pass it with --configfile FILE "
            "(or use `dvc exp run -S key=value`)"
        )
    files = list(workflow.overwrite_configfiles)
    if len(files) > 1:
        raise WorkflowError(
            f"give one params file with --configfile, not {len(files)}: "
            + ", ".join(str(f) for f in files)
        )
    if not files:
        return "params.yaml"
    path = Path(files[0])
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def validated_params(path: str):
    """Validate the params file as the stages will (exit early, naming the bad key)."""
    try:
        return load_params(path)
    except ParamsError as exc:
        raise WorkflowError(f"invalid params\n{exc}") from None


PARAMS_FILE = params_file()
PARAMS = validated_params(PARAMS_FILE)
# The config the rules read is exactly what the stages read: the validated file with its
# defaults filled in (with --configfile, nothing of params.yaml is left over).
config.update(PARAMS.model_dump(mode="json"))


def code_files(paths: list[str]) -> list[str]:
    """A rule's code inputs with each folder replaced by the files in it: Snakemake dates a folder
    by the folder's own mtime, which editing a file inside does not change."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(str(f) for f in path.rglob("*")
                            if f.is_file() and "__pycache__" not in f.parts and f.suffix not in (".so", ".pyc"))
        else:
            files.append(str(path))
    return files


def rule_resources(name: str) -> RuleResources:
    """The params' `resources.<name>` entry, or the defaults for a rule without one."""
    return getattr(PARAMS.resources, name, None) or RuleResources()


def is_multi_task(name: str) -> bool:
    """Whether the rule runs several processes (nodes * tasks_per_node > 1) through srun."""
    res = rule_resources(name)
    return PARAMS.resources.launcher == "auto" and res.nodes * res.tasks_per_node > 1


def launcher(name: str) -> str:
    """Command prefix of a rule's stage: for a multi-task rule, `srun` when the shell runs inside
    a SLURM allocation (SLURM_JOB_ID set: the slurm executor's job) and nothing elsewhere (a
    laptop, `dvc repro`), so the same rule runs one plain process locally. Single-task rules
    never need it: the slurm executor already starts them with srun."""
    if not is_multi_task(name):
        return ""
    res = rule_resources(name)
    return f"${{SLURM_JOB_ID:+srun --nodes={res.nodes} --ntasks-per-node={res.tasks_per_node} }}"


def slurm_resources(name: str) -> dict:
    """The rule's `resources:` in the SLURM executor plugin's (2.x) names.

    gpus_per_node becomes `gres: gpu:N` (per node); a multi-task rule is an `mpi` job (the
    plugin then leaves the launch to our srun) with tasks_per_node, or tasks = nodes when there
    is one task per node; None entries are left out so the profile's default-resources apply.
    """
    res = rule_resources(name)
    out = {"nodes": res.nodes, "cpus_per_task": res.cpus_per_task, "mem_mb": res.mem_mb, "runtime": res.runtime}
    if res.gpus_per_node:
        out["gres"] = f"gpu:{res.gpus_per_node}"
    if is_multi_task(name):
        out["mpi"] = "srun"
        if res.tasks_per_node > 1:
            out["tasks_per_node"] = res.tasks_per_node
        else:
            out["tasks"] = res.nodes
        if res.gpus_per_node:
            out["tasks_per_gpu"] = max(1, res.tasks_per_node // res.gpus_per_node)
    if res.slurm_partition:
        out["slurm_partition"] = res.slurm_partition
    if res.slurm_extra:
        out["slurm_extra"] = res.slurm_extra
    return out


def log_file(name: str) -> str:
    return f"{config['paths']['logs']}/{name}.log"


def record_in_dvc(wf) -> None:
    """After a successful run, record the outputs of every DVC stage in this run's DAG with
    `dvc commit -f`, so that `dvc status` is clean and `dvc repro` does not redo Snakemake's work.

    Skipped (with a message) unless this is a DVC repo, dvc is on PATH and the stages read
    params.yaml (dvc.yaml's values); `make dvc-commit` does the same by hand.
    """
    dvc = shutil.which("dvc")
    if PARAMS_FILE != "params.yaml" or not Path("dvc.yaml").is_file() or not Path(".dvc").is_dir() or dvc is None:
        _log.warning(
            "outputs not recorded in DVC (needs dvc on PATH, dvc.yaml, .dvc/ and params.yaml as "
            "the params file; this run used %s)", PARAMS_FILE
        )
        return
    listed = subprocess.run([dvc, "stage", "list", "--name-only"], capture_output=True, text=True)
    if listed.returncode != 0:
        _log.warning("dvc stage list failed, outputs not recorded in DVC: %s", listed.stderr.strip())
        return
    dvc_stages = set(listed.stdout.split())
    ran = sorted({job.rule.name for job in wf.dag.jobs} & dvc_stages)
    if not ran:
        return
    done = subprocess.run([dvc, "commit", "--force", "--quiet", *ran], capture_output=True, text=True)
    if done.returncode != 0:
        raise WorkflowError(f"dvc commit {' '.join(ran)} failed:\n{done.stderr}")
    _log.info("recorded in DVC (dvc commit): %s", ", ".join(ran))
