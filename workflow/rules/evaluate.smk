# Frozen-feature evaluations (stages `extract`, `knn`; dvc.yaml: the same stages).
# A new evaluation is one rule here (or its own .smk, included by the Snakefile) plus its stage
# in dvc.yaml and its metrics file in rule `all`.


rule extract:
    input:
        code=code_files([
            "stages/extract.py",
            "stages/features.py",
            "stages/dino",
            "stages/distributed.py",
            "stages/shard_format.py",
            "stages/device.py",
            "stages/file_digest.py",
        ]),
        shards=config["paths"]["shards"],
        teacher_backbone=config["paths"]["teacher_backbone"],
    output:
        features=directory(config["paths"]["features"]),
    params:
        file=PARAMS_FILE,
        launcher=launcher("extract"),
        model=config["model"],
        extract=config["extract"],
    log:
        log_file("extract"),
    threads: rule_resources("extract").cpus_per_task
    resources:
        **slurm_resources("extract"),
    shell:
        "{params.launcher}python -m stages.extract --params {params.file} > {log} 2>&1"


rule knn:
    input:
        code=code_files([
            "stages/knn.py",
            "stages/knn_bf16.py",
            "stages/_knn_select.c",
            "stages/features.py",
            "stages/extract.py",
            "stages/dino",
            "stages/distributed.py",
            "stages/shard_format.py",
            "stages/device.py",
            "stages/file_digest.py",
        ]),
        features=config["paths"]["features"],
        shards=config["paths"]["shards"],
    output:
        metrics=f"{config['paths']['metrics']}/knn.json",
    params:
        file=PARAMS_FILE,
        launcher=launcher("knn"),
        knn=config["knn"],
        model=config["model"],
        extract=config["extract"],
    log:
        log_file("knn"),
    threads: rule_resources("knn").cpus_per_task
    resources:
        **slurm_resources("knn"),
    shell:
        "{params.launcher}python -m stages.knn --params {params.file} > {log} 2>&1"
