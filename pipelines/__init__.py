"""Studies and runners, ``ckapipe.pipelines``: declarative studies (YAML) run here,
as SLURM jobs or on Dask clusters.

From a notebook::

    from ckapipe.pipelines import run_study
    results = run_study("pipelines/default.yaml")                  # extract, then analyze
    run_study("pipelines/default.yaml", slurm=True, dry_run=True)  # print the job scripts
"""

if __name__ != "ckapipe.pipelines":  # this folder is installed as ckapipe.pipelines, never as a top-level module
    raise ImportError(f"the folder pipelines/ is the package ckapipe.pipelines: import ckapipe.pipelines, not {__name__}")

from ckapipe.pipelines.api import load_study, run_study  # noqa: E402

__all__ = ["load_study", "run_study"]
