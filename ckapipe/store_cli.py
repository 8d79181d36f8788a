"""``ckapipe verify`` and ``ckapipe unlock``: thin over ckapipe.verify and ckapipe.locks (no torch)."""

from __future__ import annotations

import click

from ckapipe.errors import StoreError
from ckapipe.options import cache_option, quiet_option


@click.command()
@cache_option()
@click.argument("runs", nargs=-1)
@click.option("--repair", is_flag=True, help="Delete bad chunks and their markers, so that rerunning the extraction rewrites them.")
@quiet_option
def verify(cache, runs, repair, quiet):
    """Read every chunk and Gram row of RUNS (default: every run in the cache) and check checksums, markers and stamps."""
    from ckapipe.verify import verify as verify_runs

    reports = verify_runs(cache, list(runs) or None, repair=repair, progress=not quiet)
    for report in reports:
        for line in describe(report):
            click.echo(line)
    broken = [r for r in reports if not r.ok and not r.repaired]
    if broken:
        bad = sum(len(r.bad) + len(r.bad_caches) for r in broken)
        damaged = sum(bool(r.metadata) for r in broken)
        what = ", ".join(part for part in (f"{bad} bad chunk(s)" if bad else "", f"{damaged} run(s) with inconsistent metadata" if damaged else "") if part)
        hint = "rerun with --repair, then the commands above" if bad and not repair else "re-extract them as shown above"
        raise StoreError(f"{what} in {len(broken)} of {len(reports)} run(s): {hint}")


def describe(report) -> list[str]:
    """The lines ``ckapipe verify`` prints for one run."""
    run = report.run
    sums = "checksums and tags verified" if report.checksums else f"no checksums (store version {run.store_version}): decoded and checked finite"
    if report.metadata:
        lines = [f"{run.name}: inconsistent metadata"] + [f"  {problem}" for problem in report.metadata]
    elif report.ok:
        progress = "" if run.status != "in_progress" else f", in progress ({int(run.done().sum())}/{run.n_chunks} minibatches)"
        return [f"{run.name}: ok, {report.checked} chunks and Gram rows read, {sums}{progress}"]
    else:
        lines = [f"{run.name}: {len(report.bad) + len(report.bad_caches)} bad, of {report.checked} chunks and Gram rows read ({sums})"]
        lines += [f"  {bad.describe()}" for bad in report.bad]
        lines += [f"  Gram cache m={m}: refused ({why})" for m, why in report.bad_caches.items()]
    if report.repaired:
        lines.append("  repaired: bad chunks and their markers deleted; rewrite them with:")
    elif not report.metadata:
        lines.append("  rebuild, after `ckapipe verify --repair`, with:")
    else:
        lines.append("  rebuild with:")
    lines += [f"    {command}" for command in report.rebuild()]
    return lines


@click.command()
@cache_option()
@click.argument("runs", nargs=-1, required=True)
def unlock(cache, runs):
    """Remove the writer locks of RUNS (their writers are known dead), refused while one runs on this host."""
    from ckapipe.locks import unlock as unlock_run
    from ckapipe.store import find_runs

    for run in find_runs(cache, list(runs), check=False):
        removed = unlock_run(run.path)
        if not removed:
            click.echo(f"{run.name}: no locks")
        for claim in removed:
            click.echo(f"{run.name}: removed the lock on chunks {claim.chunks.start}-{claim.chunks.stop} ({claim.describe()})")
