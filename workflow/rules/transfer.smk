# Fine-tuning the pretrained backbone on a labelled set (stage `transfer`; dvc.yaml: stages.transfer).
#
# Its checkpoint folder (paths.transfer) is not declared as an output: Snakemake deletes a job's
# outputs before it runs, which would throw away the checkpoint a killed or requeued run resumes
# from (DVC keeps it with `persist: true`). The stage resumes only when the stored params match.
# With transfer.dataset null it reads the project's shards (declared); a transfer.dataset root
# (CIFAR pickles, an ImageFolder tree) is read-only external data, not declared, as dataset.root.


rule transfer:
    input:
        code=code_files([
            "stages/transfer.py",
            "stages/dino",
            "stages/distributed.py",
            "stages/shard_format.py",
            "stages/sources",
            "stages/accuracy.py",
            "stages/device.py",
            "stages/epoch_order.py",
            "stages/file_digest.py",
            "stages/fingerprinted_checkpoint.py",
        ]),
        shards=config["paths"]["shards"],
        teacher_backbone=config["paths"]["teacher_backbone"],
    output:
        metrics=report(
            f"{config['paths']['metrics']}/transfer.json",
            category="Transfer learning (Table 6)",
        ),
    params:
        file=PARAMS_FILE,
        launcher=launcher("transfer"),
        transfer=config["transfer"],
        model=config["model"],
    log:
        log_file("transfer"),
    threads: rule_resources("transfer").cpus_per_task
    resources:
        **slurm_resources("transfer"),
    shell:
        "{params.launcher}python -m stages.transfer --params {params.file} > {log} 2>&1"
