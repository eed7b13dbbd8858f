# Few-shot logistic regression on frozen features (stage `fewshot`; dvc.yaml: stages.fewshot).
# The labelled subsets (paths.fewshot_subsets) are an output: they are a pure function of the
# train keys, labels and fewshot.seed, so a rerun writes the same file.


rule fewshot:
    input:
        code=code_files(["stages/fewshot.py", "stages/features.py", "stages/file_digest.py"]),
        features=config["paths"]["features"],
    output:
        metrics=f"{config['paths']['metrics']}/fewshot.json",
        subsets=config["paths"]["fewshot_subsets"],
    params:
        file=PARAMS_FILE,
        launcher=launcher("fewshot"),
        fewshot=config["fewshot"],
    log:
        log_file("fewshot"),
    threads: rule_resources("fewshot").cpus_per_task
    resources:
        **slurm_resources("fewshot"),
    shell:
        "{params.launcher}python -m stages.fewshot --params {params.file} > {log} 2>&1"
