"""``rtf sweep results``: a sweep's table again, from its results (:mod:`raytune_ft.sweep.results`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from raytune_ft.cli.common import EndpointOpt, Typer, out
from raytune_ft.rundir import BEST_YAML, RESULTS_CSV

app = Typer(help="Inspect sweeps (Ray Tune).", no_args_is_help=True)


@app.command("results")
def sweep_results(
    target: str = typer.Argument(..., metavar="NAME|URI", help="Sweep name (under --storage), its dir, an s3:// URI, or its spec."),
    storage: str = typer.Option("./rtf_runs", "--storage", metavar="PATH", help="Where a bare NAME is looked up."),
    endpoint_url: Optional[str] = EndpointOpt,
    best_out: Optional[Path] = typer.Option(None, "--best-out", metavar="PATH", help=f"Also copy the winner's spec ({BEST_YAML}) here."),
) -> None:
    """Show a sweep's results table again (from its results.csv), and where its best.yaml is."""
    from raytune_ft.sweep.results import load_results, read_best, render_table

    res, best_uri = load_results(target, storage=storage, endpoint_url=endpoint_url)
    out(render_table(res))
    out(f"results: {res.location.rstrip('/')}/{RESULTS_CSV}")
    if best_uri:
        out(f"best spec: {best_uri}   (promote the winner: rtf submit {best_out or best_uri})")
        if best_out:
            best_out.write_text(read_best(target, storage=storage, endpoint_url=endpoint_url))
            out(f"wrote {best_out}")
