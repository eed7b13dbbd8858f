# DINO self-distillation on the shards (stage `pretrain`; dvc.yaml: stages.pretrain).
#
# The checkpoint folder and the dvclive curves are not declared as outputs: Snakemake deletes a
# job's outputs before it runs, which would throw away the checkpoint a killed or requeued run
# resumes from (DVC keeps them with `persist: true`). The stage resumes only when the stored
# params match.


rule pretrain:
    input:
        code=code_files([
            "stages/pretrain.py",
            "stages/dino",
            "stages/distributed.py",
            "stages/device.py",
            "stages/preemption.py",
            "stages/shard_format.py",
            "stages/file_digest.py",
        ]),
        shards=config["paths"]["shards"],
    output:
        teacher_backbone=config["paths"]["teacher_backbone"],
        metrics=f"{config['paths']['metrics']}/pretrain.json",
    params:
        file=PARAMS_FILE,
        launcher=launcher("pretrain"),
        model=config["model"],
        pretrain=config["pretrain"],
    log:
        log_file("pretrain"),
    threads: rule_resources("pretrain").cpus_per_task
    resources:
        **slurm_resources("pretrain"),
    shell:
        "{params.launcher}python -m stages.pretrain --params {params.file} > {log} 2>&1"
