# The DINO pipeline for Snakemake: the same DAG as dvc.yaml (same rule/stage names, commands,
# inputs/deps, outputs/outs). Every path and resource comes from the params file (params.yaml, or
# the one file given with --configfile), validated by stages/params.py when the workflow loads.
#
#   snakemake --profile workflow/profiles/local all     # this machine
#   snakemake --profile workflow/profiles/slurm all     # a SLURM cluster (see README.md)
#
# Adding a stage: one rule file in workflow/rules/ (included below) + one stage in dvc.yaml.

from snakemake.utils import min_version

min_version("9.0")


configfile: "params.yaml"


# Only with --software-deployment-method apptainer; build it first:
#   apptainer build containers/dino.sif containers/dino.def
container: "containers/dino.sif"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/linear.smk"
include: "workflow/rules/fewshot.smk"
include: "workflow/rules/attention.smk"
include: "workflow/rules/tsne.smk"
include: "workflow/rules/retrieval.smk"
include: "workflow/rules/copydetect.smk"
include: "workflow/rules/davis.smk"
include: "workflow/rules/transfer.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        shard=f"{config['paths']['metrics']}/shard.json",
        pretrain=f"{config['paths']['metrics']}/pretrain.json",
        knn=f"{config['paths']['metrics']}/knn.json",
        linear=f"{config['paths']['metrics']}/linear.json",
        fewshot=f"{config['paths']['metrics']}/fewshot.json",
        attention=f"{config['paths']['metrics']}/attention.json",
        tsne=f"{config['paths']['metrics']}/tsne.json",
        retrieval=f"{config['paths']['metrics']}/retrieval.json",
        copydetect=f"{config['paths']['metrics']}/copydetect.json",
        davis=f"{config['paths']['metrics']}/davis.json",
        transfer=f"{config['paths']['metrics']}/transfer.json",
        report=config["paths"]["report"],


onsuccess:
    record_in_dvc(workflow)
