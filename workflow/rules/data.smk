# Source dataset -> WebDataset shards (stage `shard`; dvc.yaml: stages.shard).


rule shard:
    input:
        code=code_files([
            "stages/shard.py",
            "stages/shard_format.py",
            "stages/sources",
            "stages/file_digest.py",
        ]),
    output:
        shards=directory(config["paths"]["shards"]),
        metrics=f"{config['paths']['metrics']}/shard.json",
    params:
        file=PARAMS_FILE,
        launcher=launcher("shard"),
        dataset=config["dataset"],
    log:
        log_file("shard"),
    threads: rule_resources("shard").cpus_per_task
    resources:
        **slurm_resources("shard"),
    shell:
        "{params.launcher}python -m stages.shard --params {params.file} > {log} 2>&1"
