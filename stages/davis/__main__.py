"""`python -m stages.davis [--params params.yaml]`: the DAVIS stage (see stages.davis.stage)."""

from stages.davis.stage import main

if __name__ == "__main__":
    raise SystemExit(main())
