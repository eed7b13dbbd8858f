# t-SNE of the class-mean features (stage `tsne`; dvc.yaml: stages.tsne).


rule tsne:
    input:
        code=code_files(["stages/tsne.py", "stages/features.py", "stages/file_digest.py"]),
        features=config["paths"]["features"],
    output:
        metrics=f"{config['paths']['metrics']}/tsne.json",
        png=f"{config['paths']['plots']}/tsne.png",
        csv=f"{config['paths']['plots']}/tsne.csv",
    params:
        file=PARAMS_FILE,
        launcher=launcher("tsne"),
        tsne=config["tsne"],
    log:
        log_file("tsne"),
    threads: rule_resources("tsne").cpus_per_task
    resources:
        **slurm_resources("tsne"),
    shell:
        "{params.launcher}python -m stages.tsne --params {params.file} > {log} 2>&1"
