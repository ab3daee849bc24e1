"""`rtf`: a thin Typer CLI over the library. Parse, call one function, print.

Nothing heavy is imported at module level (no torch, transformers, peft, deepspeed, ray.train):
commands import what they need when they run, so `rtf --help` and `rtf validate` stay fast.
User errors (:class:`raytune_ft.errors.UserError`) print one message and exit with their code (2).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from raytune_ft.errors import UserError

app = typer.Typer(
    name="rtf",
    help="raytune_ft: fine-tune language models on Ray from one declarative job spec.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
render_app = typer.Typer(help="Render deployment files from a spec (KubeRay, RunPod).", no_args_is_help=True)
data_app = typer.Typer(help="Prepare and inspect training data.", no_args_is_help=True)
sweep_app = typer.Typer(help="Inspect sweeps (Ray Tune).", no_args_is_help=True)
app.add_typer(render_app, name="render")
app.add_typer(data_app, name="data")
app.add_typer(sweep_app, name="sweep")

def version() -> str:
    """The installed distribution's version, else the package's own (a source tree on PYTHONPATH)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("raytune_ft")
    except PackageNotFoundError:
        from raytune_ft import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"rtf {version()}")
        raise typer.Exit(0)


@app.callback()
def _root(
    show_version: bool = typer.Option(False, "--version", help="Print the version and exit.",
                                      callback=_print_version, is_eager=True),
) -> None:
    """raytune_ft: fine-tune language models on Ray from one declarative job spec."""


SetOpt = typer.Option(None, "--set", "-s", help="Override a spec value: dotted.key=value (repeatable).")


def _out(text: str = "") -> None:
    typer.echo(text)


def _load(path: Path, overrides: Optional[list[str]]):
    from raytune_ft.spec import load_spec

    return load_spec(path, overrides or [])


# --------------------------------------------------------------------------- spec commands


@app.command()
def validate(
    specs: list[Path] = typer.Argument(..., help="Job spec YAML files."),
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Check specs: schema, types, cross-field rules. Exit 2 with every problem listed if invalid."""
    failed: list[str] = []
    for path in specs:
        try:
            spec = _load(path, overrides)
        except UserError as e:
            failed.append(str(e))
            continue
        _out(f"ok   {path}  (name={spec.name}, method={spec.method.type})")
    if failed:
        for msg in failed:
            typer.echo(f"error: {msg}", err=True)
        raise typer.Exit(2)


@app.command()
def schema(output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write to a file.")) -> None:
    """Print the JSON Schema of the job spec (for editors: yaml-language-server)."""
    from raytune_ft.spec import json_schema

    text = json.dumps(json_schema(), indent=2)
    if output:
        output.write_text(text + "\n")
        _out(f"wrote {output}")
    else:
        _out(text)


@app.command()
def plan(
    spec_path: Path = typer.Argument(..., metavar="SPEC"),
    overrides: Optional[list[str]] = SetOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    preflight: bool = typer.Option(True, "--preflight/--offline",
                                   help="Check that storage is reachable and writable (--offline skips it)."),
) -> None:
    """Show what a spec will run: resolved spec, DeepSpeed config, scaling, batch, memory estimate,
    and whether its storage is reachable and writable (one line after the plan: ok, skipped or failed).
    Exit 0 once the plan is printed, whatever the preflight found; 2 for an invalid spec."""
    from raytune_ft.plan import make_plan, placeholders
    from raytune_ft.render_plan import render_plan

    spec = _load(spec_path, overrides)
    p = make_plan(spec)
    marks = placeholders(spec)
    checked = None
    if preflight:
        from raytune_ft.storage import preflight_status

        held = [m for m in marks if m.startswith("storage.")]
        checked = (("skipped", f"{'; '.join(held)}: a placeholder, set your own storage")
                   if held else preflight_status(spec.storage))
    if as_json:
        d = p.to_dict()
        d["placeholders"] = marks
        if checked is not None:
            d["preflight"] = {"status": checked[0], "message": checked[1]}
        _out(json.dumps(d, indent=2, default=str))
    else:
        _out(render_plan(p))
        if marks:
            _out(f"placeholders: {'; '.join(marks)} (replace them, or --set them, before submitting)")
        if checked is not None:
            _out(f"storage preflight: {checked[1] if checked[0] == 'ok' else ': '.join(checked)}")


@app.command()
def submit(
    spec_path: Path = typer.Argument(..., metavar="SPEC"),
    overrides: Optional[list[str]] = SetOpt,
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (else RAY_ADDRESS, cluster.address, or local)."),
    fresh: bool = typer.Option(False, "--fresh", help="Start over; the old run is kept aside, never deleted."),
    resume_from: Optional[str] = typer.Option(None, "--resume-from", help="Resume from this checkpoint URI."),
    follow: bool = typer.Option(True, "--follow/--no-follow",
                                help="Cluster mode: stream progress until the job ends (Ctrl-C detaches)."),
) -> None:
    """Run a spec: locally on an embedded Ray, or on a cluster when an address is given."""
    from raytune_ft.launch import submit as do_submit

    spec = _load(spec_path, overrides)
    code = do_submit(spec, address=address, fresh=fresh, resume_from=resume_from, follow=follow)
    raise typer.Exit(code)


AddressOpt = typer.Option(None, "--address", help="Ray dashboard URL, http://HEAD:8265 (else $RAY_ADDRESS).")


@app.command()
def status(
    job: str = typer.Argument(..., help="A job id (rtf-NAME-...) or a run name (its newest job)."),
    address: Optional[str] = AddressOpt,
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Status of a job on a Ray cluster: state, times, step/total, storage."""
    from raytune_ft.launch import ray_jobs

    if as_json:
        import io

        rec = ray_jobs.status(address, job, out=io.StringIO())
        _out(json.dumps(rec, indent=2))
    else:
        ray_jobs.status(address, job)


@app.command()
def logs(
    job: str = typer.Argument(..., help="A job id or a run name (its newest job)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Stream live with the progress bar; Ctrl-C detaches."),
    address: Optional[str] = AddressOpt,
) -> None:
    """Logs of a job on a Ray cluster (progress events shown as readable lines)."""
    from raytune_ft.launch import ray_jobs

    raise typer.Exit(ray_jobs.logs(address, job, follow=follow))


@app.command()
def stop(
    job: str = typer.Argument(..., help="A job id or a run name (its newest job)."),
    address: Optional[str] = AddressOpt,
) -> None:
    """Stop a job on a Ray cluster. Its committed checkpoints stay; resubmitting the spec resumes."""
    from raytune_ft.launch import ray_jobs

    raise typer.Exit(ray_jobs.stop(address, job))


@app.command()
def jobs(
    address: Optional[str] = AddressOpt,
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
    limit: int = typer.Option(20, "--limit", "-n", help="Newest N jobs."),
) -> None:
    """List jobs on a Ray cluster: id, run, status, start time, step/total."""
    from raytune_ft.launch import ray_jobs

    ray_jobs.list_jobs(address, as_json=as_json, limit=limit)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


@render_app.command("k8s")
def render_k8s(
    spec_path: Path = typer.Argument(..., metavar="SPEC"),
    overrides: Optional[list[str]] = SetOpt,
    cluster_only: bool = typer.Option(False, "--cluster-only", help="A RayCluster instead of a RayJob."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write to FILE instead of stdout."),
) -> None:
    """Render a KubeRay RayJob (ConfigMap with the spec + RayJob), or a RayCluster."""
    from raytune_ft.launch.k8s import render_k8s as render

    if output and _same_file(output, spec_path):
        raise UserError(f"-o {output} is the spec being rendered: writing the manifest there would replace "
                        "the spec; give another file name (e.g. -o rayjob.yaml)")
    text = render(_load(spec_path, overrides), cluster_only=cluster_only)
    if output:
        output.write_text(text)
        typer.echo(f"wrote {output}  (kubectl apply -f {output})", err=True)
    else:
        _out(text.rstrip("\n"))


@render_app.command("runpod")
def render_runpod(
    spec_path: Path = typer.Argument(..., metavar="SPEC"),
    overrides: Optional[list[str]] = SetOpt,
    output: Path = typer.Option(Path("runpod"), "-o", "--output", help="Directory for the files."),
) -> None:
    """Render RunPod pod settings, the cluster description and the bootstrap every pod runs."""
    from raytune_ft.launch.runpod import render_runpod as render

    if output.exists() and not output.is_dir():
        raise UserError(f"-o {output} is a file{' (the spec being rendered)' if _same_file(output, spec_path) else ''}"
                        ": -o names the directory the RunPod files are written to (e.g. -o runpod/)")
    files = render(_load(spec_path, overrides))
    output.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = output / name
        path.write_text(content)
        if name.endswith(".sh"):
            path.chmod(0o755)
        _out(f"wrote {path}")


@sweep_app.command("results")
def sweep_results(
    target: str = typer.Argument(..., metavar="NAME|URI", help="Sweep name (under --storage), its dir, an s3:// URI, or its spec."),
    storage: str = typer.Option("./rtf_runs", "--storage", help="Where a bare NAME is looked up."),
    endpoint_url: Optional[str] = typer.Option(None, "--endpoint-url", help="S3-compatible endpoint (else $AWS_ENDPOINT_URL)."),
    best_out: Optional[Path] = typer.Option(None, "--best-out", help="Also copy the winner's spec (best.yaml) here."),
) -> None:
    """Show a sweep's results table again (from its results.csv), and where its best.yaml is."""
    from raytune_ft.sweep import load_results, read_best, render_table

    res, best_uri = load_results(target, storage=storage, endpoint_url=endpoint_url)
    _out(render_table(res))
    _out(f"results: {res.location.rstrip('/')}/results.csv")
    if best_uri:
        _out(f"best spec: {best_uri}   (promote the winner: rtf submit {best_out or best_uri})")
        if best_out:
            best_out.write_text(read_best(target, storage=storage, endpoint_url=endpoint_url))
            _out(f"wrote {best_out}")


# --------------------------------------------------------------------------- entry point


# --------------------------------------------------------------------------- data


@data_app.command("split")
def data_split(
    input_path: Path = typer.Argument(..., metavar="INPUT", help="A JSONL/JSON/CSV/parquet file."),
    eval_fraction: float = typer.Option(..., "--eval-fraction", help="Share of rows for eval, in (0, 1)."),
    seed: int = typer.Option(0, "--seed"),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Default: next to INPUT."),
) -> None:
    """Split a data file into train and eval files, deterministically for a seed."""
    from raytune_ft.data.split import split_file

    train, evals = split_file(input_path, eval_fraction, seed, out_dir=out_dir)
    _out(f"train: {train}\neval:  {evals}")


@data_app.command("preview")
def data_preview(
    spec_path: Path = typer.Argument(..., metavar="SPEC"),
    overrides: Optional[list[str]] = SetOpt,
    n: int = typer.Option(3, "-n", help="Examples to show."),
) -> None:
    """Show tokenized examples with the loss mask visible, and data statistics."""
    from raytune_ft.data.preview import preview_data
    from raytune_ft.launch import absolutize

    spec = absolutize(_load(spec_path, overrides))
    _out(preview_data(spec, n=n))


_registered = False


def _register_optional() -> None:
    """Sub-apps and commands that live in their own modules (kept import-light)."""
    global _registered
    if _registered:
        return
    _registered = True
    from raytune_ft.cli_checkpoints import app as ckpt_app
    from raytune_ft.tools.cli import register

    app.add_typer(ckpt_app, name="checkpoints")
    register(app)


def main(argv: Optional[list[str]] = None) -> None:
    _register_optional()
    try:
        app(args=argv, standalone_mode=True)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
