"""``ckapipe analyze``, ``ckapipe plot`` and ``ckapipe diff``: thin layers over ``ckapipe.analyze``."""

from __future__ import annotations

import click

from ckapipe.analyze import analyze as run_analysis, diff as paired_difference, plot_results
from ckapipe.analyze.rank import rank as rank_layers, to_csv, to_text
from ckapipe.atomic import atomic_path
from ckapipe.errors import CkapipeError
from ckapipe.options import batch_size_option, cache_option, deprecated_alias, device_option, out_option, quiet_option


def resampling_options(command):
    """``--ci``, ``--bootstrap``, ``--seed``, ``--interval``: the bootstrap of every command that draws intervals."""
    options = [
        click.option("--ci", type=float, default=0.95, show_default=True,
                     help="Confidence level of the bootstrap intervals over minibatches (0: none)."),
        click.option("--bootstrap", type=int, default=2000, show_default=True, help="Bootstrap resamples."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the resamples and permutations."),
        click.option("--interval", type=click.Choice(["bca", "percentile"]), default="bca", show_default=True,
                     help="Bootstrap interval: bias-corrected and accelerated, or plain percentile."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.command()
@cache_option()
@click.argument("runs", nargs=-1, required=True)
@out_option("Results directory to write (must not exist).", required=True)
@click.option("--pair-by-position", is_flag=True, help="Pair minibatch k with minibatch k when runs hold different samples.")
@batch_size_option(help="Analysis minibatch size m (default: the stored chunk size).")
@device_option(("auto", "cpu", "cuda"))
@click.option("--scheduler", default=None, help="Address of a running Dask scheduler (default: local threads).")
@click.option("--scheduler-file", type=click.Path(dir_okay=False), default=None, help="Dask scheduler file.")
@click.option("--completed-only", is_flag=True, help="Use the chunks completed so far in incomplete runs.")
@click.option("--overwrite", is_flag=True, help="Replace an existing results directory.")
@click.option("--no-gram-cache", is_flag=True, help="Neither read nor write the U-centered Gram cache.")
@click.option("--precision", type=click.Choice(["float64", "float32"]), default="float64", show_default=True,
              help="Gram products of the float64-centered features: float32 products are up to ~2x faster on CPU, ~1e-9 off in CKA.")
@click.option("--measure", "measures", default="linear", show_default=True, metavar="LIST",
              help="Comma-separated measures, each a matrix in the results: linear, linear_biased, rbf:T, "
                   "rbf_biased:T, mutual_knn:K, cknna:K (docs/measures.md); the first is the summary's.")
@click.option("--rankme", is_flag=True, help="Also the minibatch RankMe of every layer (a column of the summary).")
@resampling_options
@click.option("--permutations", type=int, default=0, show_default=True,
              help="Permutation-test draws for a p-value of CKA > 0 between runs (0: no test; 1000 is usual; "
                   "costs that many times the HSIC products).")
@quiet_option
def analyze(cache, runs, out, pair_by_position, batch_size, device, scheduler, scheduler_file, completed_only,
            overwrite, no_gram_cache, precision, measures, rankme, ci, bootstrap, seed, interval, permutations, quiet):
    """Minibatch CKA (or other measures) of every pair of layers of RUNS (names or globs in the cache)."""
    results = run_analysis(
        cache, list(runs), out=out, pair_by_position=pair_by_position, batch_size=batch_size, device=device,
        scheduler=scheduler, scheduler_file=scheduler_file, completed_only=completed_only, overwrite=overwrite,
        use_gram_cache=not no_gram_cache, progress=not quiet, precision=precision, measures=measures, rankme=rankme,
        ci=ci or None, bootstrap=bootstrap, seed=seed, interval=interval, permutations=permutations,
    )
    if not quiet:
        click.echo(results.summary())
        click.echo(f"\nresults: {out} (cka.json, cka.csv, summary.txt); draw them with: ckapipe plot {out}")


def scale_end(ctx, param, value):
    """``--vmin``/``--vmax``: a number, or ``data`` (the matrix's own range)."""
    if value is None or value == "data":
        return value
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a number nor 'data'") from None


@click.command()
@click.argument("results", type=click.Path(exists=True, file_okay=False))
@click.option("--pair", nargs=2, default=None, metavar="A B", help="Runs of the per-minibatch view (default: first two).")
@click.option("--layers", nargs=2, default=None, metavar="LA LB", help="Layer pair of the per-minibatch view.")
@out_option("Folder for the figures (default: RESULTS/plots).", dest="out_dir")
@click.option("--format", "formats", default="png,pdf", show_default=True, help="Figure formats, comma-separated (png, pdf, svg, ...).")
@click.option("--vmin", default=None, callback=scale_end, metavar="X|data",
              help="Low end of the heatmaps' colour scale (default 0; data: the smallest value).")
@click.option("--vmax", default=None, callback=scale_end, metavar="X|data",
              help="High end of the heatmaps' colour scale (default 1; data: the largest value).")
@click.option("--cmap", default=None, help="Matplotlib colour map of the heatmaps (default: magma).")
@quiet_option
def plot(results, pair, layers, out_dir, formats, vmin, vmax, cmap, quiet):
    """Heatmaps of a results directory (one run: its layers against themselves), and per-minibatch
    CKA of one layer pair."""
    style = {key: value for key, value in (("vmin", vmin), ("vmax", vmax), ("cmap", cmap)) if value is not None}
    paths = plot_results(results, out_dir, pair=pair, layers=layers, formats=formats, **style)
    if not quiet:
        for path in paths:
            click.echo(str(path))


@click.command()
@cache_option()
@click.argument("runs", nargs=-1, required=True)
@batch_size_option(help="Minibatch size m of the minibatch RankMe (default: the stored chunk size).")
@click.option("--full/--no-full", default=True, show_default=True,
              help="RankMe of all stored samples (reads every activation; a QR of the features when D ≤ 8,192, else the N × N Gram).")
@click.option("--minibatch/--no-minibatch", default=True, show_default=True,
              help="RankMe of each minibatch from the Gram cache, averaged (at most m; cheap).")
@device_option(("auto", "cpu", "cuda"))
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None, help="Also write the table to this CSV file.")
@deprecated_alias("--out", "old_csv", "--csv", type=click.Path(dir_okay=False))
@quiet_option
def rank(cache, runs, batch_size, full, minibatch, device, csv_path, old_csv, quiet):
    """RankMe (Garrido et al. 2023) of every layer of RUNS: full data and per minibatch."""
    rows = rank_layers(cache, list(runs), full=full, minibatch=minibatch, batch_size=batch_size, device=device,
                       progress=not quiet)
    out = csv_path or old_csv
    if out is not None:
        with atomic_path(out, replace=True) as tmp:
            tmp.write_text(to_csv(rows))
    click.echo(to_text(rows))


@click.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--a", "pair_a", nargs=2, required=True, metavar="RUN:LAYER RUN:LAYER",
              help="The pair of layers whose CKA is compared, e.g. teacher:layer4 student-kd:layer4.")
@click.option("--b", "pairs_b", nargs=2, multiple=True, required=True, metavar="RUN:LAYER RUN:LAYER",
              help="The pair it is compared with (repeat --b for a table).")
@resampling_options
@quiet_option
def diff(results, pair_a, pairs_b, ci, bootstrap, seed, interval, quiet):
    """Paired difference CKA(a) - CKA(b) with its bootstrap interval, over the minibatches both share.

    RESULTS: results directories, or a study's results directory (every comparison in it).
    """
    if not ci:
        raise CkapipeError("ckapipe diff draws an interval: give --ci between 0 and 1 (0.95 is usual)")
    rows = paired_difference(list(results), pair_a, list(pairs_b), ci=ci, bootstrap=bootstrap, seed=seed,
                             method=interval)
    click.echo(difference_table(rows, note=not quiet))


def difference_table(rows, note: bool = True) -> str:
    """The rows of ``diff`` as text: one line per pair b, after a line saying how the intervals were drawn."""
    first = rows[0]
    width = max(len(r.b) for r in rows)
    level = f"{first.resampling.ci * 100:g} %"
    lines = [f"CKA(a) - CKA(b) with {first.resampling.describe(first.n_minibatches)}"] if note else []
    lines += [f"a = {first.a}: CKA {first.cka_a:.3f}", "",
             f"  {'b':<{width}}  CKA(b)  CKA(a) - CKA(b)  {level + ' interval':<18}  resamples on the other side of 0"]
    for r in rows:
        share = f"< {1 / r.resampling.bootstrap:.2g}" if r.other_side == 0 else f"{r.other_side:.3g}"
        lines.append(f"  {r.b:<{width}}  {r.cka_b:6.3f}  {r.estimate:+15.3f}  "
                     f"{f'[{r.low:+.3f}, {r.high:+.3f}]':<18}  {share}")
    return "\n".join(lines)
