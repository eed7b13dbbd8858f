# The report (stage `report`; dvc.yaml: stages.report): the metrics files of the stages listed in
# report.inputs (<paths.metrics>/<stage>.json) and the figures under paths.plots and paths.dvclive,
# gathered into paths.report (index.html, summary.md, figures/).
#
# The metrics files and the figures it copies are declared (the training curves change with
# pretrain.json). List in report.inputs only the stages this workflow has rules for
# (Snakemake refuses an input no rule makes); a listed file that is absent at run time is shown as
# "not run". The folder is marked for Snakemake's own report as well:
#
#   snakemake --profile workflow/profiles/local report     # build it
#   snakemake --report report.html report                   # embed it in Snakemake's report


rule report:
    input:
        code=code_files(["stages/report.py"]),
        metrics=[f"{config['paths']['metrics']}/{stage}.json" for stage in config["report"]["inputs"]],
        # the figures it copies, as in dvc.yaml (attention maps redrawn at another threshold leave
        # attention.json unchanged)
        figures=[f"{config['paths']['plots']}/attention", f"{config['paths']['plots']}/tsne.png"],
    output:
        report=report(
            directory(config["paths"]["report"]),
            htmlindex="index.html",
            category="Report",
        ),
    params:
        file=PARAMS_FILE,
        launcher=launcher("report"),
        report=config["report"],
        model=config["model"],  # the run's description at the top of the page
        dataset=config["dataset"],
        pretrain=config["pretrain"],
    log:
        log_file("report"),
    threads: rule_resources("report").cpus_per_task
    resources:
        **slurm_resources("report"),
    shell:
        "{params.launcher}python -m stages.report --params {params.file} > {log} 2>&1"
