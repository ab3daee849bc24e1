"""``rtf checkpoints``: list, pull and prune the checkpoints of a run.

URI is a run directory: a local path or ``s3://bucket/prefix/run``. An s3 URI's endpoint comes
from ``--endpoint-url`` or ``$AWS_ENDPOINT_URL``; keys from ``$AWS_ACCESS_KEY_ID`` /
``$AWS_SECRET_ACCESS_KEY`` (or the default AWS chain). Problems raise UserError; the main CLI
prints them and exits 2. Nothing heavy is imported here (pyarrow/boto3 load on first use).
"""

from __future__ import annotations

import json
from datetime import timezone
from typing import Any

import typer

from raytune_ft import checkpoints as ck
from raytune_ft import rundir as rd
from raytune_ft import storage as st
from raytune_ft.cli.common import EndpointOpt, Typer
from raytune_ft.errors import UserError

app = Typer(
    help="List, pull and prune the checkpoints of a run (local dir or s3://bucket/prefix/run).",
    no_args_is_help=True,
)

_ENDPOINT = EndpointOpt
_REGION = typer.Option(None, "--region", metavar="REGION", help="S3 region (else $AWS_REGION, else us-east-1).")

KEY_METRICS = ("loss", "eval_loss", "train_loss", "learning_rate", "grad_norm")


def _open(uri: str, endpoint_url: str | None, region: str | None):
    """A run dir (local or s3://), or a job spec naming one (its storage, endpoint and name)."""
    if uri.endswith((".yaml", ".yml")) and not st.is_s3(uri):
        import os

        from raytune_ft.spec import load_spec

        if os.path.isfile(uri):
            from raytune_ft.rundir import RunDir

            spec = load_spec(uri)
            cfg = st.with_path(spec.storage, spec.storage.path)
            with st.storage_errors(cfg, "open"):
                run = RunDir.of(spec)
            return st.with_path(spec.storage, run.uri), run.fs, run.path
    cfg = st.config_for(uri, endpoint_url=endpoint_url, region=region)
    with st.storage_errors(cfg, "open"):
        fs, path = st.open(cfg)
    return cfg, fs, path


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _fmt_metric(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _key_metrics(metrics: dict[str, Any], metric: str | None, limit: int = 3) -> str:
    names = [metric] if metric and metric in metrics else []
    names += [k for k in KEY_METRICS if k in metrics and k not in names]
    names += sorted(k for k in metrics if k not in names)
    return " ".join(f"{k}={_fmt_metric(metrics[k])}" for k in names[:limit])


@app.command("list")
def list_cmd(
    uri: str = typer.Argument(..., metavar="SPEC|RUN|URI", help="A job spec, or a run dir: local path or s3://bucket/prefix/run."),
    metric: str | None = typer.Option(None, "--metric", metavar="NAME", help="Mark the best committed checkpoint by this metric."),
    mode: str = typer.Option("min", "--mode", metavar="min|max", help="min or max, for --metric."),
    deep: bool = typer.Option(False, "--deep", help="Re-hash every file (reads all bytes)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    endpoint_url: str | None = _ENDPOINT,
    region: str | None = _REGION,
) -> None:
    """Show each checkpoint: step, time, size, key metrics, committed/uploading/incomplete, best."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    cfg, fs, path = _open(uri, endpoint_url, region)
    if not st.is_s3(uri):
        import os

        if not os.path.isdir(path):
            raise UserError(f"no such run directory: {path}")
    with st.storage_errors(cfg, "list"):
        infos = ck.list_checkpoints(fs, path, best_metric=metric, mode=mode, deep=deep)
    if as_json:
        rows = [i.to_dict() for i in infos]
        for row in rows:  # a URI the other commands accept
            row["uri"] = f"s3://{row['path']}" if st.is_s3(uri) else row["path"]
        typer.echo(json.dumps(rows, indent=2))
        return
    console = Console(highlight=False)
    if not infos:
        console.print(f"no checkpoints under {escape(cfg.path)}")
        return
    # storage is a trust boundary: every text read from it (reasons, metric keys) is escaped, so a file
    # named "[/x]" is shown as such rather than parsed as rich markup (it raised MarkupError)
    table = Table(title=escape(f"checkpoints in {cfg.path}"), title_justify="left")
    table.add_column("step", justify="right")
    table.add_column("time (UTC)")
    table.add_column("size", justify="right")
    table.add_column("metrics")
    table.add_column("status")
    table.add_column("best", justify="center")
    for i in infos:
        when = i.time.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if i.time else "-"
        status = ("[green]committed[/green]" if i.committed else
                  f"[yellow]uploading[/yellow]: {escape(str(i.reason))}" if i.uploading else
                  f"[red]incomplete[/red]: {escape(str(i.reason))}")
        table.add_row(
            str(i.step), when, human_size(i.size), escape(_key_metrics(i.metrics, metric)), status,
            "best" if i.best else ""
        )
    console.print(table)
    n_ok = sum(i.committed for i in infos)
    n_up = sum(i.uploading for i in infos)
    console.print(f"{n_ok} committed, " + (f"{n_up} uploading, " if n_up else "")
                  + f"{len(infos) - n_ok - n_up} incomplete")


@app.command("pull")
def pull_cmd(
    uri: str = typer.Argument(..., metavar="SPEC|RUN|URI",
                              help="A job spec, a run dir (its latest committed checkpoint), a checkpoint dir, "
                              "or a run's final/ (local or s3://)."),
    dest: str = typer.Argument(..., metavar="DEST", help="Local directory to create (must not exist or be empty)."),
    step: int | None = typer.Option(None, "--step", metavar="N", help="Pull this step of the run instead of the latest."),
    final: bool = typer.Option(False, "--final", help="Pull the run's final/ (the trained model) instead of a checkpoint."),
    endpoint_url: str | None = _ENDPOINT,
    region: str | None = _REGION,
) -> None:
    """Download a committed checkpoint, or the run's final/, into DEST (sizes and sha256 checked).

    An interrupted pull is continued by running the same command again: what it left is checked and kept."""
    cfg, fs, path = _open(uri, endpoint_url, region)
    if final and not ck.is_final(path):
        if step is not None:
            raise UserError("--final and --step exclude each other: final/ is the run's end, not a step")
        path = st.fs_join(path, rd.FINAL)
    with st.storage_errors(cfg, "read"):
        ckpt = ck.resolve(fs, path, step)
        got = ck.pull(fs, ckpt, dest)
    manifest = got.manifest
    what = f"{rd.FINAL}/" if ck.is_final(ckpt) else ck.checkpoint_dir_name(manifest.step)
    reused = (f"; continued an interrupted pull: {human_size(got.reused_bytes)} already here and checked "
              f"({got.reused_files} whole files), {human_size(got.fetched_bytes)} fetched") if got.reused_bytes else ""
    typer.echo(
        f"pulled {what} (step {manifest.step}, {len(manifest.files)} files, "
        f"{human_size(manifest.total_size)}) to {st.local_path(dest)}{reused}"
    )


@app.command("prune")
def prune_cmd(
    uri: str = typer.Argument(..., metavar="SPEC|RUN|URI", help="A job spec, or a run dir: local path or s3://bucket/prefix/run."),
    keep: int = typer.Option(..., "--keep", metavar="N", help="Committed checkpoints to keep (>= 2)."),
    metric: str | None = typer.Option(None, "--metric", metavar="NAME", help="Also keep the best checkpoint by this metric."),
    mode: str = typer.Option("min", "--mode", metavar="min|max", help="min or max, for --metric."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be deleted."),
    endpoint_url: str | None = _ENDPOINT,
    region: str | None = _REGION,
) -> None:
    """Delete all but the last KEEP committed checkpoints (and the best by --metric).

    Incomplete checkpoints newer than the newest committed one are kept (they may be uploading);
    older incomplete ones are deleted.
    """
    cfg, fs, path = _open(uri, endpoint_url, region)
    with st.storage_errors(cfg, "prune"):
        deleted = ck.prune(fs, path, keep, metric, mode, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    if not deleted:
        typer.echo("nothing to prune")
        return
    for i in deleted:
        typer.echo(f"{verb} {i.name} ({i.status}, {human_size(i.size)})")
    typer.echo(f"{verb} {len(deleted)} checkpoint(s)")
