# The report (stage `report`; dvc.yaml: stages.report): the metrics files of the stages listed in
# report.inputs (<paths.metrics>/<stage>.json) and the figures under paths.plots and paths.dvclive,
# gathered into paths.report (index.html, summary.md, figures/).
#
# Only the metrics files are declared: the figures come from the same stages, so the report
# already runs after them. List in report.inputs only the stages this workflow has rules for
# (Snakemake refuses an input no rule makes); a listed file that is absent at run time is shown as
# "not run". The folder is marked for Snakemake's own report as well:
#
#   snakemake --profile workflow/profiles/local report     # build it
#   snakemake --report report.html report                   # embed it in Snakemake's report


rule report:
    input:
        code=code_files(["stages/report.py"]),
        metrics=[f"{config['paths']['metrics']}/{stage}.json" for stage in config["report"]["inputs"]],
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
