# Image retrieval on Revisited Oxford/Paris (stage `retrieval`; dvc.yaml: stages.retrieval).
#
# With retrieval.root null the stage regenerates the tiny fixture (stages/fixtures) into
# retrieval.fixture and evaluates on it; the fixture is a pure function of that code, which is
# an input here. A real dataset root is read in place (not tracked as an input).


rule retrieval:
    input:
        code=code_files([
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
        metrics=f"{config['paths']['metrics']}/retrieval.json",
    params:
        file=PARAMS_FILE,
        launcher=launcher("retrieval"),
        model=config["model"],
        retrieval=config["retrieval"],
    log:
        log_file("retrieval"),
    threads: rule_resources("retrieval").cpus_per_task
    resources:
        **slurm_resources("retrieval"),
    shell:
        "{params.launcher}python -m stages.retrieval --params {params.file} > {log} 2>&1"
