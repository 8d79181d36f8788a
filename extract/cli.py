"""``ckapipe layers``, ``ckapipe extract`` and ``ckapipe ls``: thin over the extraction API.

torch is imported inside the commands only, so ``ckapipe ls`` and
``ckapipe --help`` stay quick and work without it.
"""

from __future__ import annotations

import click

from extract import store


CACHE_OPTION = click.option("--cache", default="cache", show_default=True, type=click.Path(file_okay=False), help="The activation cache directory.")
RANDOM_OPTION = click.option("--random-init", is_flag=True, help="Random weights (torchvision/timm/hf/zoo), reproducible from init_seed=0.")


@click.command()
@click.argument("model")
@click.option("--dataset", default=None, help="Take example inputs from this dataset spec.")
@CACHE_OPTION
@RANDOM_OPTION
def layers(model, dataset, cache, random_init):
    """List MODEL's hookable layers (per call) with their per-sample output shapes."""
    from extract.runner import list_layers

    rows = list_layers(model, dataset, cache=cache, random_init=random_init, with_types=True)
    width = max((len(name) for name, _, _ in rows), default=4)
    for name, kind, shape in rows:
        click.echo(f"{name:<{width}}  {kind:<20}  {shape}")


def parse_chunks(ctx, param, value):
    """``A:B`` -> (A, B)."""
    if value is None:
        return None
    start, sep, stop = value.partition(":")
    if not sep or not start.isdigit() or not stop.isdigit():
        raise click.BadParameter("use A:B, minibatches A to B-1")
    return int(start), int(stop)


@click.command()
@click.option("--model", "-m", required=True, help="zoo:NAME?seed=S, torchvision:NAME, timm:NAME, hf:NAME, package.module:factory or a checkpoint.")
@click.option("--dataset", "-d", default="digits", show_default=True, help="digits, NAME:ROOT, imagefolder:DIR, hf:DIR, FILE.npy, STORE.zarr, package.module:callable.")
@click.option("--layers", "-l", "layer_items", multiple=True, help="PATTERN[@SELECT][:REDUCTION], repeatable or comma-separated; default: top-level children.")
@click.option("--batch-size", "-b", default=256, show_default=True, type=int, help="Minibatch size m = chunk rows (>= 4).")
@CACHE_OPTION
@click.option("--order-seed", default=0, show_default=True, type=int, help="Seed of the sample permutation.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16", "float64"]))
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:i.")
@click.option("--reduction", default="flatten", show_default=True, type=click.Choice(["flatten", "mean", "cls"]), help="Default reduction of every layer.")
@click.option("--name", default=None, help="Readable run name (default MODEL@DATASET).")
@click.option("--limit", default=None, type=int, help="Keep the first N samples of the permutation.")
@click.option("--chunks", default=None, callback=parse_chunks, help="Extract minibatches A:B only (disjoint ranges run side by side).")
@click.option("--grams", is_flag=True, help="Also fill the Gram cache for m = batch size.")
@click.option("--grams-only", is_flag=True, help="Keep only the Gram cache, no activations (linear CKA at m = batch size only).")
@click.option("--compression", default=store.DEFAULT_COMPRESSION, show_default=True, type=click.Choice(store.COMPRESSION_CHOICES))
@click.option("--workers", default=0, show_default=True, type=int, help="DataLoader worker processes for map-style datasets.")
@RANDOM_OPTION
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def extract(model, dataset, layer_items, batch_size, cache, order_seed, dtype, device, reduction, name, limit, chunks,
            grams, grams_only, compression, workers, random_init, no_progress):
    """Run MODEL over DATASET once and cache per-layer minibatch activations (resumable; a rerun is a cache hit)."""
    from extract.runner import extract_run

    path = extract_run(
        model, dataset, list(layer_items) or None, cache=cache, batch_size=batch_size, order_seed=order_seed,
        dtype=dtype, device=device, reduction=reduction, name=name, limit=limit, chunks=chunks, grams=grams,
        grams_only=grams_only, progress=not no_progress, random_init=random_init, compression=compression, workers=workers,
    )
    run = store.open_run(path)
    click.echo(f"{run.name}: {run.status}, {int(run.done().sum())}/{run.n_chunks} minibatches, {len(run.layer_names)} layers")


@click.command()
@CACHE_OPTION
@click.option("--layers", "show_layers", is_flag=True, help="Also list each run's layers.")
def ls(cache, show_layers):
    """List the cached runs: model, dataset, layers, N, m, Gram caches, size, status."""
    runs = store.list_runs(cache)
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


def _row(run: store.Run) -> tuple[str, ...]:
    spec = run.spec
    done = int(run.done().sum())
    status = run.status if run.status != store.IN_PROGRESS else f"{run.status} {done}/{run.n_chunks}"
    return (run.name, spec.model, spec.dataset, str(len(run.layer_names)), str(run.n_samples), str(run.batch_size),
            _grams(run), _size(store.disk_size(run.path)), status)


def _grams(run: store.Run) -> str:
    """Minibatch sizes of the run's Gram cache, ``-`` when it has none."""
    sizes = sorted(int(name[1:]) for name in run.group["grams"].group_keys()) if "grams" in run.group else []
    return ",".join(f"m{m}" for m in sizes) or "-"


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError



