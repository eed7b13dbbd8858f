# DAVIS-2017 video object segmentation by label propagation (stage `davis`; dvc.yaml: stages.davis).
#
# With davis.root null the stage regenerates the tiny fixture (stages/fixtures) into
# davis.fixture and evaluates on it; the fixture is a pure function of that code, which is an
# input here. A real dataset root is read in place (not tracked as an input).


rule davis:
    input:
        code=code_files(["stages/davis", "stages/dino", "stages/fixtures", "stages/device.py"]),
        teacher_backbone=config["paths"]["teacher_backbone"],
    output:
        results=directory(config["davis"]["results"]),
        metrics=f"{config['paths']['metrics']}/davis.json",
        per_sequence=f"{config['paths']['plots']}/davis_per_sequence.csv",
    params:
        file=PARAMS_FILE,
        launcher=launcher("davis"),
        model=config["model"],
        davis=config["davis"],
    log:
        log_file("davis"),
    threads: rule_resources("davis").cpus_per_task
    resources:
        **slurm_resources("davis"),
    shell:
        "{params.launcher}python -m stages.davis --params {params.file} > {log} 2>&1"
