"""``rtf status|logs|stop|jobs``: jobs on a Ray cluster, through its Jobs API (:mod:`raytune_ft.launch.ray_jobs`)."""

from __future__ import annotations

import json
from typing import Optional

import typer

from raytune_ft.cli.common import Typer, out

app = Typer()

AddressOpt = typer.Option(None, "--address", metavar="URL", help="Ray dashboard URL, http://HEAD:8265 (else $RAY_ADDRESS).")


@app.command()
def status(
    job: str = typer.Argument(..., metavar="JOB|RUN", help="A job id (rtf-NAME-...) or a run name (its newest job)."),
    address: Optional[str] = AddressOpt,
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Status of a job on a Ray cluster: state, times, step/total, storage."""
    from raytune_ft.launch import ray_jobs

    rec = ray_jobs.status(address, job)
    out(json.dumps(rec, indent=2) if as_json else ray_jobs.render_status(rec))


@app.command()
def logs(
    job: str = typer.Argument(..., metavar="JOB|RUN", help="A job id or a run name (its newest job)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Stream live with the progress bar; Ctrl-C detaches."),
    address: Optional[str] = AddressOpt,
) -> None:
    """Logs of a job on a Ray cluster (progress events shown as readable lines)."""
    from raytune_ft.launch import ray_jobs

    if follow:
        raise typer.Exit(ray_jobs.follow(address, job))
    typer.echo(ray_jobs.logs(address, job), nl=False)
    raise typer.Exit(0)


@app.command()
def stop(
    job: str = typer.Argument(..., metavar="JOB|RUN", help="A job id or a run name (its newest job)."),
    address: Optional[str] = AddressOpt,
) -> None:
    """Stop a job on a Ray cluster. Its committed checkpoints stay; resubmitting the spec resumes."""
    from raytune_ft.launch import ray_jobs

    code, message = ray_jobs.stop(address, job)
    out(message)
    raise typer.Exit(code)


@app.command()
def jobs(
    address: Optional[str] = AddressOpt,
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
    limit: int = typer.Option(20, "--limit", "-n", metavar="N", help="Newest N jobs."),
) -> None:
    """List jobs on a Ray cluster: id, run, status, start time, step/total."""
    from raytune_ft.launch import ray_jobs

    url, recs = ray_jobs.list_jobs(address, limit=limit)
    out(json.dumps(recs, indent=2) if as_json else ray_jobs.render_jobs(url, recs))
