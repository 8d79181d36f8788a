"""``ckapipe run PIPELINE`` and ``ckapipe compare MODEL...``: thin command lines over ``run_study`` and ``compare``."""

from __future__ import annotations

import re
from pathlib import Path

import click

from ckapipe.analyze.plots import check_formats, plot_results
from ckapipe.extract.cli import require_torch
from ckapipe.options import cache_option, deprecated_alias, out_option, quiet_option, setting_options
from ckapipe.errors import CkapipeError
from ckapipe.pipelines import api
from ckapipe.pipelines.api import STAGES, run_study
from ckapipe.pipelines.study import packaged_studies, packaged_study, study_summary


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
@out_option("Override the pipeline's results directory (results go to OUT/STUDY/).")
@deprecated_alias("--results", "old_results", "--out", type=click.Path(file_okay=False))
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
def run(pipeline, stage, cache, out, old_results, slurm, dry_run, wait, force, tasks, partition, account, time_limit, mem, gres,
        cpus_per_task, extra, scheduler, scheduler_file, dask_cluster, dask_workers, quiet):
    """Run the study in PIPELINE (a YAML file, or a packaged study's name): extract its runs, then analyze its comparisons.

    Both stages are idempotent: cached runs are skipped, interrupted ones resume,
    and analyses whose inputs did not change are not redone.

    \b
      ckapipe run default                      (ckapipe examples lists the packaged studies)
      ckapipe run pipelines/default.yaml --stage analyze --scheduler tcp://host:8786
      ckapipe run study.yaml --slurm --dry-run
      ckapipe run study.yaml --slurm --partition gpu --gres gpu:1 --time 04:00:00
    """
    if (dry_run or wait or force) and not slurm:
        raise click.UsageError(f"--{'dry-run' if dry_run else 'wait' if wait else 'force'} goes with --slurm")
    slurm_options = {"partition": partition, "account": account, "time": time_limit, "mem": mem, "gres": gres,
                     "cpus_per_task": cpus_per_task, "extra": list(extra)}
    run_study(pipeline, stage, cache=cache, results=out or old_results, slurm=slurm, dry_run=dry_run, tasks=tasks,
              slurm_options=slurm_options, scheduler=scheduler, scheduler_file=scheduler_file,
              dask_cluster=dask_cluster, dask_workers=dask_workers, wait=wait, force=force, progress=not quiet,
              say=(lambda line: None) if quiet else click.echo)


@click.command()
@quiet_option
def examples(quiet):
    """List the studies packaged with ckapipe: ckapipe run NAME runs one, ckapipe init writes a copy to edit."""
    studies = packaged_studies()
    width = max(map(len, studies))
    for name, path in studies.items():
        click.echo(name if quiet else f"{name:<{width}}  {study_summary(path)}")


@click.command()
@click.argument("file", default="study.yaml", type=click.Path(dir_okay=False))
@click.option("--from", "source", default="default", show_default=True, metavar="NAME",
              help="The packaged study to start from (ckapipe examples lists them).")
@quiet_option
def init(file, source, quiet):
    """Write a starter pipeline file FILE (default study.yaml), a copy of a packaged study to edit."""
    target = Path(file)
    if target.exists():
        raise CkapipeError(f"{file} exists: choose another FILE or remove it")
    target.write_text(packaged_study(source).read_text())
    if not quiet:
        click.echo(f"wrote {file}: edit it, then ckapipe run {file}")


NAMED_SPEC = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.+@-]*)=(.+)$")


def named_specs(specs) -> dict[str, str] | list[str]:
    """``NAME=SPEC`` items -> {name: spec}; plain specs stay a list (named by compare). A ``?key=value``
    inside a spec is not a name: a name holds no ``:``, ``?`` or ``/``."""
    parsed = [NAMED_SPEC.match(spec) for spec in specs]
    if not any(parsed):
        return list(specs)
    if not all(parsed):
        raise click.UsageError("name every model or none: NAME=SPEC for each, or SPEC alone")
    names = [match.group(1) for match in parsed]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise click.UsageError(f"model name {', '.join(twice)} is given twice: give every model its own NAME=")
    return {match.group(1): match.group(2) for match in parsed}


@click.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--dataset", "-d", "datasets", multiple=True, default=["digits"], show_default=True,
              help="digits, NAME:ROOT, imagefolder:DIR, hf:DIR, FILE.npy, STORE.zarr, package.module:callable; "
                   "once for every model, or once per model in order (the same samples, paired by position).")
@setting_options("layers", "batch_size")
@out_option("Results directory to write (must not exist).", required=True)
@cache_option(default=None, help="Also leave a grams-only run per model in this cache (reused by a later compare or "
                                 "analyze), and reuse the complete runs found there; default: nothing cached.")
@click.option("--keep-activations", is_flag=True, help="With --cache: full runs (activations too), not grams-only.")
@setting_options("order_seed", "limit", "reduction", "device")
@click.option("--precision", type=click.Choice(["float64", "float32"]), default="float64", show_default=True,
              help="Gram products of the float64-centered features: float32 is faster on CPUs, ~1e-9 off in CKA (not cached).")
@setting_options("random_init", "workers")
@click.option("--format", "formats", default="png,pdf", show_default=True, help="Figure formats, comma-separated.")
@click.option("--overwrite", is_flag=True, help="Replace an existing results directory.")
@quiet_option
def compare(models, datasets, out, cache, keep_activations, precision, formats, overwrite, quiet, **settings):
    """Minibatch CKA of every pair of MODELS on one dataset, in one pass: the summary, and the results
    and heatmaps in --out. Each model is a spec, or NAME=SPEC.

    \b
      ckapipe compare zoo:cnn3?seed=0 zoo:cnn3?seed=1 --out results/seeds
      ckapipe compare zoo:cnn3?seed=0 zoo:cnn2?seed=0 -d a.npy -d b.npy --out results/views
      ckapipe compare r18=torchvision:resnet18 r34=torchvision:resnet34 --random-init \\
          --dataset 'cifar10:/data/cifar?split=test' --layers 'layer*.?' --out results/depth
    """
    require_torch()
    formats = check_formats(formats)
    chosen = named_specs(models)
    arguments = (chosen,) if isinstance(chosen, dict) else tuple(chosen)
    results = api.compare(
        *arguments, data=datasets[0] if len(datasets) == 1 else list(datasets), cache=cache,
        keep_activations=keep_activations, precision=precision, out=out, overwrite=overwrite, progress=not quiet,
        **(settings | {"layers": list(settings["layers"]) or None}),
    )
    paths = plot_results(results, None, formats=formats)
    if not quiet:
        click.echo(results.summary())
        click.echo(f"\nresults: {out} (cka.json, cka.csv, summary.txt; xarray.open_zarr opens it); "
                   f"{len(paths)} figures in {paths[0].parent}")
