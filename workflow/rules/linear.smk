# Linear evaluation on frozen features (stage `linear`; dvc.yaml: stages.linear).
#
# Its checkpoint folder (paths.linear) is not declared as an output: Snakemake deletes a job's
# outputs before it runs, which would throw away the checkpoint a killed or requeued run resumes
# from (DVC keeps it with `persist: true`). The stage resumes only when the stored params match.
# Both modes' inputs are declared (mode full reads the shards and the teacher backbone, mode
# features the extracted features), so switching linear.mode needs no change here.


rule linear:
    input:
        code=code_files([
            "stages/linear.py",
            "stages/extract.py",
            "stages/features.py",
            "stages/dino",
            "stages/distributed.py",
            "stages/shard_format.py",
            "stages/accuracy.py",
            "stages/device.py",
            "stages/epoch_order.py",
            "stages/file_digest.py",
            "stages/fingerprinted_checkpoint.py",
        ]),
        features=config["paths"]["features"],
        shards=config["paths"]["shards"],
        teacher_backbone=config["paths"]["teacher_backbone"],
    output:
        metrics=f"{config['paths']['metrics']}/linear.json",
    params:
        file=PARAMS_FILE,
        launcher=launcher("linear"),
        linear=config["linear"],
        model=config["model"],
    log:
        log_file("linear"),
    threads: rule_resources("linear").cpus_per_task
    resources:
        **slurm_resources("linear"),
    shell:
        "{params.launcher}python -m stages.linear --params {params.file} > {log} 2>&1"
