"""``rtf render k8s|runpod``: deployment files from a spec (:mod:`raytune_ft.launch.k8s`,
:mod:`raytune_ft.launch.runpod`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from raytune_ft.cli.common import SetOpt, Typer, load, out
from raytune_ft.errors import UserError

app = Typer(help="Render deployment files from a spec (KubeRay, RunPod).", no_args_is_help=True)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


@app.command("k8s")
def render_k8s(
    spec_path: Path = typer.Argument(..., metavar="SPEC"),
    overrides: Optional[list[str]] = SetOpt,
    cluster_only: bool = typer.Option(False, "--cluster-only", help="A RayCluster instead of a RayJob."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", metavar="PATH", help="Write to FILE instead of stdout."),
) -> None:
    """Render a KubeRay RayJob (ConfigMap with the spec + RayJob), or a RayCluster."""
    from raytune_ft.launch.k8s import render_k8s as render

    if output and _same_file(output, spec_path):
        raise UserError(f"-o {output} is the spec being rendered: writing the manifest there would replace "
                        "the spec; give another file name (e.g. -o rayjob.yaml)")
    text = render(load(spec_path, overrides), cluster_only=cluster_only)
    if output:
        output.write_text(text)
        typer.echo(f"wrote {output}  (kubectl apply -f {output})", err=True)
    else:
        out(text.rstrip("\n"))


@app.command("runpod")
def render_runpod(
    spec_path: Path = typer.Argument(..., metavar="SPEC"),
    overrides: Optional[list[str]] = SetOpt,
    output: Path = typer.Option(Path("runpod"), "-o", "--output", metavar="DIR", help="Directory for the files."),
) -> None:
    """Render RunPod pod settings, the cluster description and the bootstrap every pod runs."""
    from raytune_ft.launch.runpod import render_runpod as render

    if output.exists() and not output.is_dir():
        raise UserError(f"-o {output} is a file{' (the spec being rendered)' if _same_file(output, spec_path) else ''}"
                        ": -o names the directory the RunPod files are written to (e.g. -o runpod/)")
    files = render(load(spec_path, overrides))
    output.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = output / name
        path.write_text(content)
        if name.endswith(".sh"):
            path.chmod(0o755)
        out(f"wrote {path}")
