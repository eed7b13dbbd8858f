# Copy detection on Copydays (stage `copydetect`; dvc.yaml: stages.copydetect).
#
# With copydetect.root null the stage regenerates the tiny fixture (stages/fixtures) into
# copydetect.fixture and evaluates on it; the fixture is a pure function of that code, which is
# an input here. A real dataset root is read in place (not tracked as an input).


rule copydetect:
    input:
        code=code_files([
            "stages/copydetect.py",
            "stages/retrieval.py",
            "stages/extract.py",
            "stages/features.py",
            "stages/dino",
            "stages/distributed.py",
            "stages/shard_format.py",
            "stages/fixtures",
            "stages/device.py",
            "stages/file_digest.py",
        ]),
        teacher_backbone=config["paths"]["teacher_backbone"],
    output:
        metrics=f"{config['paths']['metrics']}/copydetect.json",
    params:
        file=PARAMS_FILE,
        launcher=launcher("copydetect"),
        model=config["model"],
        copydetect=config["copydetect"],
    log:
        log_file("copydetect"),
    threads: rule_resources("copydetect").cpus_per_task
    resources:
        **slurm_resources("copydetect"),
    shell:
        "{params.launcher}python -m stages.copydetect --params {params.file} > {log} 2>&1"
