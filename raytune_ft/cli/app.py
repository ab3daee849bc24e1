"""`rtf`: a thin Typer CLI over the library. Parse, call one function, print what it returns.

The root app, the spec commands (validate, schema, plan, submit) and the entry point; the other commands
live in one module per concern (``jobs``, ``checkpoints``, ``render``, ``tools``, ``data``, ``sweep``), each
with its own Typer app, added here at import: ``app`` is complete once this module is imported.

Nothing heavy is imported at module level (no torch, transformers, peft, deepspeed, ray.train):
commands import what they need when they run, so `rtf --help` and `rtf validate` stay fast.
User errors (:class:`raytune_ft.errors.UserError`) print one message and exit with their code (2).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from raytune_ft.cli import checkpoints, data, jobs, render, sweep, tools
from raytune_ft.cli.common import SetOpt, Typer, load, out
from raytune_ft.errors import UserError

app = Typer(
    name="rtf",
    help="raytune_ft: fine-tune language models on Ray from one declarative job spec.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def version() -> str:
    """The installed distribution's version, else the package's own (a source tree on PYTHONPATH)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("raytune_ft")
    except PackageNotFoundError:
        import raytune_ft

        return raytune_ft.__version__


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


# --------------------------------------------------------------------------- spec commands


@app.command()
def validate(
    specs: list[Path] = typer.Argument(..., metavar="SPEC", help="Job spec YAML files."),
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Check specs: schema, types, cross-field rules. Exit 2 with every problem listed if invalid."""
    failed: list[str] = []
    for path in specs:
        try:
            spec = load(path, overrides)
        except UserError as e:
            failed.append(str(e))
            continue
        out(f"ok   {path}  (name={spec.name}, method={spec.method.type})")
    if failed:
        for msg in failed:
            typer.echo(f"error: {msg}", err=True)
        raise typer.Exit(2)


@app.command()
def schema(output: Optional[Path] = typer.Option(None, "-o", "--output", metavar="PATH", help="Write to a file.")) -> None:
    """Print the JSON Schema of the job spec (for editors: yaml-language-server)."""
    from raytune_ft.spec import json_schema

    text = json.dumps(json_schema(), indent=2)
    if output:
        output.write_text(text + "\n")
        out(f"wrote {output}")
    else:
        out(text)


@app.command()
def plan(
    spec_path: Path = typer.Argument(..., metavar="SPEC"),
    overrides: Optional[list[str]] = SetOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    preflight: bool = typer.Option(True, "--preflight/--offline",
                                   help="Check that storage is reachable and writable (--offline skips it)."),
    fit: bool = typer.Option(False, "--fit", help="Propose the smallest change that makes the spec fit its "
                             "accelerator (or the largest micro-batch that fits), as --set overrides."),
    tokens: Optional[int] = typer.Option(None, "--tokens", metavar="N", min=1,
                                         help="Tokens per epoch, when the data is not readable here."),
) -> None:
    """Show what a spec will run: resolved spec, DeepSpeed config, scaling, batch, memory, time and cost
    estimates, and whether its storage is reachable and writable (one line after the plan: ok, skipped or
    failed). Exit 0 once the plan is printed, whatever the preflight found; 2 for an invalid spec."""
    from raytune_ft import estimate as est
    from raytune_ft.plan import make_plan, placeholders
    from raytune_ft.render_plan import render_plan

    spec = load(spec_path, overrides)
    p = make_plan(spec)
    marks = placeholders(spec)
    e = est.estimate(spec, tokens_per_epoch=tokens)
    proposal = est.fit(spec) if fit else None
    checked = None
    if preflight:
        from raytune_ft.storage import preflight_status

        held = [m for m in marks if m.startswith("storage.")]
        checked = (("skipped", f"{'; '.join(held)}: a placeholder, set your own storage")
                   if held else preflight_status(spec.storage))
    if as_json:
        d = p.to_dict()
        d["estimate"] = e.to_dict()
        d["placeholders"] = marks
        if proposal is not None:
            d["fit"] = {"set": proposal[0], "summary": proposal[1]}
        if checked is not None:
            d["preflight"] = {"status": checked[0], "message": checked[1]}
        out(json.dumps(d, indent=2, default=str))
    else:
        out(render_plan(p, extra=est.render(e)))
        if proposal is not None:
            sets, summary = proposal
            out(f"fit:          {summary}")
            if sets:
                out("              " + " ".join(f"--set {x}" for x in sets))
        if marks:
            out(f"placeholders: {'; '.join(marks)} (replace them, or --set them, before submitting)")
        if checked is not None:
            out(f"storage preflight: {checked[1] if checked[0] == 'ok' else ': '.join(checked)}")


@app.command()
def submit(
    spec_path: Path = typer.Argument(..., metavar="SPEC"),
    overrides: Optional[list[str]] = SetOpt,
    address: Optional[str] = typer.Option(None, "--address", metavar="URL",
                                          help="Ray dashboard URL http://HEAD:8265, or local (else RAY_ADDRESS, "
                                               "cluster.address, or local)."),
    fresh: bool = typer.Option(False, "--fresh", help="Start over; the old run is kept aside, never deleted."),
    resume_from: Optional[str] = typer.Option(None, "--resume-from", metavar="URI", help="Resume from this checkpoint URI."),
    follow: bool = typer.Option(True, "--follow/--no-follow",
                                help="Cluster mode: stream progress until the job ends (Ctrl-C detaches)."),
    allow_plain_http: bool = typer.Option(
        False, "--allow-secrets-over-plain-http",
        help="Forward the spec's secrets to a plain http:// address on another machine, where the Ray auth token "
             "(the key to them) crosses the network unencrypted. Without it such a submit is refused."),
) -> None:
    """Run a spec: on this machine (one worker in this process, more on an embedded Ray), or on a cluster when an address is given."""
    from raytune_ft.launch import submit as do_submit

    spec = load(spec_path, overrides)
    code = do_submit(spec, address=address, fresh=fresh, resume_from=resume_from, follow=follow,
                     allow_plain_http=allow_plain_http)
    raise typer.Exit(code)


# --------------------------------------------------------------------------- entry point


# The app is complete at import: the command modules' apps, merged (no name) or as groups.
app.add_typer(jobs.app)
app.add_typer(checkpoints.app, name="checkpoints")
app.add_typer(render.app, name="render")
app.add_typer(tools.app)
app.add_typer(data.app, name="data")
app.add_typer(sweep.app, name="sweep")


@functools.cache
def command() -> Any:
    """The Click command behind ``app``, built once per process. ``app(...)`` rebuilds it on every call
    (Typer introspects every command's signature: most of the time of an in-process `rtf validate`), which
    only in-process callers (the tests, a notebook) pay more than once."""
    return typer.main.get_command(app)


def main(argv: Optional[list[str]] = None) -> None:
    try:
        command()(args=argv, standalone_mode=True)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except SystemExit as e:
        if argv is None:  # the `rtf` process itself, not a caller in Python (a test, a notebook)
            exit_now_if_trained_here(e.code)
        raise


def exit_now_if_trained_here(code: Any) -> None:
    """After a run trained in this process (``rtf submit``, one local worker) has committed everything and
    stopped Ray, end the process at once: the interpreter's teardown of torch, transformers and the model
    (module by module, object by object) took 3-4 s here, and nothing is left for it to write."""
    from raytune_ft.launch import local

    if not local.TRAINED_HERE:
        return
    import logging

    logging.shutdown()  # flushes and closes the handlers, as interpreter exit would
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed pipe: nothing to flush to
            pass
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


if __name__ == "__main__":
    main()
