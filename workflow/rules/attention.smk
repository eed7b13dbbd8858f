# Self-attention maps and their Jaccard index against VOC-layout masks (stage `attention`;
# dvc.yaml: stages.attention). The image folder and the VOC root (attention.images/voc_root) are
# read-only external data, not declared, as the shard stage's dataset.root.


rule attention:
    input:
        code=code_files(["stages/attention.py", "stages/dino", "stages/device.py"]),
        teacher_backbone=config["paths"]["teacher_backbone"],
    output:
        metrics=f"{config['paths']['metrics']}/attention.json",
        maps=directory(f"{config['paths']['plots']}/attention"),
    params:
        file=PARAMS_FILE,
        launcher=launcher("attention"),
        attention=config["attention"],
        model=config["model"],
    log:
        log_file("attention"),
    threads: rule_resources("attention").cpus_per_task
    resources:
        **slurm_resources("attention"),
    shell:
        "{params.launcher}python -m stages.attention --params {params.file} > {log} 2>&1"
