"""``ckapipe run PIPELINE``: a thin command line over ``pipelines.run_study``."""

from __future__ import annotations

import click

from ckapipe.options import cache_option, quiet_option
from ckapipe.pipelines.api import STAGES, run_study


def parse_tasks(ctx, param, value: str | None) -> list[int] | None:
    """``3`` or ``1,4-6`` -> [3] or [1, 4, 5, 6]."""
    if value is None:
        return None
    tasks = []
    try:
        for part in value.split(","):
            start, _, stop = part.partition("-")
            tasks += list(range(int(start), int(stop or start) + 1))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a list of task indices like 1,4-6") from None
    return tasks


@click.command()
@click.argument("pipeline", type=click.Path(dir_okay=False))
@click.option("--stage", type=click.Choice(STAGES), default="all", show_default=True,
              help="Which stage to run.")
@cache_option(default=None, help="Override the pipeline's cache directory.")
@click.option("--results", type=click.Path(file_okay=False), default=None,
              help="Override the pipeline's results directory (results go to RESULTS/STUDY/).")
@click.option("--slurm", is_flag=True, help="Submit the stages as SLURM jobs instead of running them here.")
@click.option("--dry-run", is_flag=True, help="With --slurm: print the job scripts instead of submitting them.")
@click.option("--wait", is_flag=True, help="With --slurm: wait until the jobs have finished.")
@click.option("--force", is_flag=True, help="With --slurm: submit even while the study's jobs are still queued.")
@click.option("--task", "--tasks", "tasks", callback=parse_tasks, default=None, metavar="LIST",
              help="Extraction tasks by index (1,4-6): run them here, or with --slurm resubmit them.")
@click.option("--partition", default=None, help="SLURM partition (-p).")
@click.option("--account", default=None, help="SLURM account (-A).")
@click.option("--time", "time_limit", default=None, help="SLURM time limit, e.g. 02:00:00.")
@click.option("--mem", default=None, help="SLURM memory per node, e.g. 16G.")
@click.option("--gres", default=None, help="SLURM generic resources, e.g. gpu:1.")
@click.option("--cpus-per-task", type=int, default=None, help="SLURM CPUs per task.")
@click.option("--sbatch-extra", "extra", multiple=True, metavar="OPTION",
              help="Another sbatch directive, e.g. --sbatch-extra=--qos=long (repeatable).")
@click.option("--scheduler", default=None, metavar="ADDR", help="Analyze on the Dask scheduler at ADDR.")
@click.option("--scheduler-file", default=None, metavar="FILE", help="Analyze on the Dask scheduler in FILE.")
@click.option("--dask-cluster", type=click.Choice(["threads", "local", "slurm"]), default=None,
              help="Start a Dask cluster for the analysis (default: the pipeline's dask.cluster).")
@click.option("--dask-workers", type=int, default=None, help="Workers of the started Dask cluster.")
@quiet_option
def run(pipeline, stage, cache, results, slurm, dry_run, wait, force, tasks, partition, account, time_limit, mem, gres,
        cpus_per_task, extra, scheduler, scheduler_file, dask_cluster, dask_workers, quiet):
    """Run the study in PIPELINE (a YAML file): extract its runs, then analyze its comparisons.

    Both stages are idempotent: cached runs are skipped, interrupted ones resume,
    and analyses whose inputs did not change are not redone.

    \b
      ckapipe run pipelines/default.yaml
      ckapipe run pipelines/default.yaml --stage analyze --scheduler tcp://host:8786
      ckapipe run study.yaml --slurm --dry-run
      ckapipe run study.yaml --slurm --partition gpu --gres gpu:1 --time 04:00:00
    """
    if (dry_run or wait or force) and not slurm:
        raise click.UsageError(f"--{'dry-run' if dry_run else 'wait' if wait else 'force'} goes with --slurm")
    slurm_options = {"partition": partition, "account": account, "time": time_limit, "mem": mem, "gres": gres,
                     "cpus_per_task": cpus_per_task, "extra": list(extra)}
    run_study(pipeline, stage, cache=cache, results=results, slurm=slurm, dry_run=dry_run, tasks=tasks,
              slurm_options=slurm_options, scheduler=scheduler, scheduler_file=scheduler_file,
              dask_cluster=dask_cluster, dask_workers=dask_workers, wait=wait, force=force, progress=not quiet,
              say=(lambda line: None) if quiet else click.echo)
