"""Declarative studies (YAML), the ``ckapipe`` command line, and cluster jobs.

From a notebook::

    from pipelines import run_study
    results = run_study("pipelines/default.yaml")              # extract, then analyze
    run_study("pipelines/default.yaml", slurm=True, dry_run=True)  # print the job scripts
"""

from pipelines.api import load_study, run_study

__all__ = ["load_study", "run_study"]
