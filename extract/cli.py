"""``ckapipe layers``, ``ckapipe extract`` and ``ckapipe ls``: thin over the extraction API.

torch is imported by the commands that run a model only, on first use of ``extract_run`` or
``list_layers`` (the lazy boundary in ``ckapipe.extract``), so ``ckapipe ls`` and ``ckapipe --help``
stay quick and work without it.
"""

from __future__ import annotations

import json

import click

from ckapipe import extract as stage, store
from ckapipe.extract.specs import require
from ckapipe.options import cache_option, quiet_option, setting_options
from ckapipe.settings import RunSettings


def require_torch():
    """The extraction stage's torch, or a one-line error naming the extra that brings it."""
    return require("torch", "torch")


@click.command()
@click.argument("model")
@click.argument("patterns", nargs=-1)
@click.option("--dataset", default=None, help="Take example inputs from this dataset spec.")
@cache_option()
@setting_options("random_init")
@quiet_option
def layers(model, patterns, dataset, cache, random_init, quiet):
    """List MODEL's hookable layers (per call) with their per-sample output shapes; with PATTERNS, only
    those that --layers PATTERNS would record ('*': every leaf module; 'block*': part by part)."""
    require_torch()
    rows = stage.list_layers(model, dataset, cache=cache, random_init=random_init, with_types=True, layers=list(patterns))
    width = max((len(name) for name, _, _ in rows), default=4)
    for name, kind, shape in rows:
        click.echo(f"{name:<{width}}  {kind:<20}  {shape}")


@click.command()
@click.option("--model", "-m", required=True, help="zoo:NAME?seed=S, torchvision:NAME, timm:NAME, hf:NAME, package.module:factory or a checkpoint.")
@click.option("--dataset", "-d", default="digits", show_default=True, help="digits, NAME:ROOT, imagefolder:DIR, hf:DIR, FILE.npy, STORE.zarr, package.module:callable.")
@setting_options("layers", "batch_size")
@cache_option()
@setting_options("order_seed", "dtype", "device", "reduction", "name", "limit", "chunks", "grams", "grams_only",
                 "compression", "workers", "random_init")
@quiet_option
def extract(model, dataset, cache, quiet, **settings):
    """Run MODEL over DATASET once and cache per-layer minibatch activations (resumable; a rerun is a cache hit)."""
    require_torch()
    path = stage.extract_run(model, dataset, cache=cache, progress=not quiet, settings=RunSettings(**settings))
    run = store.open_run(path)
    click.echo(f"{run.name}: {run.status}, {int(run.done().sum())}/{run.n_chunks} minibatches, {len(run.layer_names)} layers")


@click.command()
@cache_option()
@click.option("--layers", "show_layers", is_flag=True, help="Also list each run's layers.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per run (its provenance), as a list.")
@quiet_option
def ls(cache, show_layers, as_json, quiet):
    """List the cached runs: model, dataset, layers, N, m, Gram caches, size, status."""
    runs = store.list_runs(cache)
    if as_json:
        click.echo(json.dumps([_record(run) for run in runs], indent=1))
        return
    if not runs:
        click.echo(f"no runs in {cache}")
        return
    header = ("run", "model", "dataset", "layers", "N", "m", "grams", "size", "status")
    rows = [header] + [_row(run) for run in runs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    if show_layers:
        for run in runs:
            click.echo(f"{run.name}: {', '.join(run.layer_names)}")


def _record(run: store.Run) -> dict:
    meta = run.meta
    return {"name": run.name, "slug": run.slug, "key": run.key, "path": str(run.path), "aliases": run.aliases(),
            "model": run.spec.model, "dataset": run.spec.dataset, "layers": run.layer_names,
            "n_samples": run.n_samples, "batch_size": run.batch_size, "dtype": run.spec.dtype,
            "grams": run.gram_sizes(), "grams_only": run.grams_only, "bytes": store.disk_size(run.path),
            "status": run.status, "done": int(run.done().sum()), "n_chunks": run.n_chunks,
            "created": meta.get("created"), "completed": meta.get("completed")}


def _row(run: store.Run) -> tuple[str, ...]:
    spec = run.spec
    done = int(run.done().sum())
    status = run.status if run.status != store.IN_PROGRESS else f"{run.status} {done}/{run.n_chunks}"
    name = run.name + "".join(f" ({alias})" for alias in run.aliases())
    grams = ",".join(f"m{m}" for m in run.gram_sizes()) or "-"
    return (name, spec.model, spec.dataset, str(len(run.layer_names)), str(run.n_samples), str(run.batch_size),
            grams, _size(store.disk_size(run.path)), status)


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError
