"""``ckapipe verify`` and ``ckapipe unlock``: thin over ckapipe.store.verify and ckapipe.store.locks (no torch)."""

from __future__ import annotations

from pathlib import Path

import click

from ckapipe.errors import StoreError
from ckapipe.options import cache_option, quiet_option
from ckapipe.store import find_runs
from ckapipe.store.integrity import RESULTS_ATTRS, is_results_store
from ckapipe.store.locks import unlock as unlock_run
from ckapipe.store.verify import verify as verify_runs, verify_results


@click.command()
@cache_option()
@click.argument("runs", nargs=-1)
@click.option("--repair", is_flag=True, help="Delete bad chunks and their markers, so that rerunning the extraction rewrites them.")
@quiet_option
def verify(cache, runs, repair, quiet):
    """Read every chunk and Gram row of RUNS (default: every run in the cache) and check checksums, markers and
    stamps. A RUNS argument that is a results directory (ckapipe analyze --out) has every chunk checked likewise."""

    stores = [Path(r) for r in runs if is_results_store(Path(r))]
    patterns = [r for r in runs if not is_results_store(Path(r))]
    reports = verify_runs(cache, patterns or None, repair=repair, progress=not quiet) if patterns or not stores else []
    results = [verify_results(path, RESULTS_ATTRS) for path in stores]
    for line in [line for r in reports for line in describe(r)] + [line for r in results for line in describe_results(r)]:
        click.echo(line)
    broken = [r for r in reports if not r.ok and not r.repaired]
    damaged = [r for r in results if not r.ok]
    verdicts = [verdict(broken, len(reports), repair)] if broken else []
    verdicts += [f"{sum(len(r.bad) for r in damaged)} bad chunk(s) in {len(damaged)} of {len(results)} results "
                 f"director{'y' if len(results) == 1 else 'ies'}: analyse again as printed above"] if damaged else []
    if verdicts:
        raise StoreError("; ".join(verdicts))


def verdict(broken, total: int, repair: bool) -> str:
    """The error line for runs with bad chunks or edited metadata."""
    chunks = sum(len(r.bad) + len(r.bad_caches) for r in broken if not r.metadata)
    edited = sum(bool(r.metadata) for r in broken)
    what = "; ".join(part for part in (f"{chunks} bad chunk(s)" if chunks else "",
                                      f"{edited} run(s) with inconsistent metadata" if edited else "") if part)
    todo = "rerun with --repair, then the commands above" if chunks and not repair else "run the commands above"
    return f"{what} in {len(broken)} of {total} run(s): {todo}"


def describe_results(report) -> list[str]:
    """The lines ``ckapipe verify`` prints for one results directory: a verdict, each problem, what rewrites it."""
    what = ("checksums and tags verified" if report.checksums
            else f"no checksums (results version {report.record.get('results_version', 1)}): decoded")
    checked = f"results, {report.checked} chunks read, {what}"
    if report.ok:
        return [f"{report.path}: ok ({checked})"]
    return ([f"{report.path}: {len(report.bad)} bad ({checked})"] + [f"  {bad.describe()}" for bad in report.bad]
            + [f"  rewrite it: analyse runs {', '.join(report.runs())} again with --out {report.path} --overwrite"])


def describe(report) -> list[str]:
    """The lines ``ckapipe verify`` prints for one run: a verdict, each problem, what rebuilds it."""
    run = report.run
    checked = (f"{report.checked} chunks and Gram rows read, " +
               ("checksums and tags verified" if report.checksums
                else f"no checksums (store version {run.store_version}): decoded and checked finite"))
    if report.ok:
        done = int(run.done().sum())
        underway = f"; in progress, {done}/{run.n_chunks} minibatches" if done < run.n_chunks else ""
        return [f"{run.name}: ok ({checked}{underway})"]
    if report.metadata:
        lines = [f"{run.name}: inconsistent metadata"] + [f"  {problem}" for problem in report.metadata]
        lines.append("  rebuild with:")
    else:
        lines = [f"{run.name}: {len(report.bad) + len(report.bad_caches)} bad ({checked})"]
        lines += [f"  {bad.describe()}" for bad in report.bad]
        lines += [f"  Gram cache m={m}: {why}" for m, why in report.bad_caches.items()]
        lines.append("  repaired: bad chunks and their markers deleted; rewrite them with:" if report.repaired
                     else "  rebuild, after `ckapipe verify --repair`, with:")
    return lines + [f"    {command}" for command in report.rebuild()]


@click.command()
@cache_option()
@click.argument("runs", nargs=-1, required=True)
@quiet_option
def unlock(cache, runs, quiet):
    """Remove the writer locks of RUNS (their writers are known dead), refused while one runs on this host."""
    for run in find_runs(cache, list(runs), check=False):
        removed = unlock_run(run.path)
        if not removed and not quiet:
            click.echo(f"{run.name}: no locks")
        for claim in removed if not quiet else ():
            click.echo(f"{run.name}: removed the lock on chunks {claim.chunks.start}-{claim.chunks.stop} ({claim.describe()})")
