"""What every command module of the CLI shares: the ``--set`` option, loading a spec, printing."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from typer.core import TyperCommand

SetOpt = typer.Option(None, "--set", "-s", metavar="KEY=VALUE",
                      help="Override a spec value: dotted.key=value (repeatable).")
EndpointOpt = typer.Option(None, "--endpoint-url", metavar="URL", help="S3-compatible endpoint (else $AWS_ENDPOINT_URL).")


class ReadableCommand(TyperCommand):
    """A command whose help a person reads. Typer (0.29) prints a Python type after every argument
    (``SPEC <path>``, ``specs... <list[Path]>``) and has no switch to leave it off: the gap this fills.
    Every rtf argument carries a metavar (SPEC, SOURCE, SPEC|RUN|URI), so the type is dropped; options
    show their metavar (TEXT, N, KEY=VALUE, PATH) in place of the type when one is set, as all of rtf's do."""

    def format_options(self, ctx: Any, formatter: Any) -> None:
        args, opts = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                name, text = record
                shown = param.display_type_rich(ctx)
                if shown and name.endswith(f" {shown}"):
                    name = name[: -len(shown) - 1]
                args.append((name, text))
            elif param.param_type_name == "option":
                opts.append(record)
        for title, rows in (("Arguments", args), ("Options", opts)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


class Typer(typer.Typer):
    """``typer.Typer`` whose commands are :class:`ReadableCommand` s (every rtf command module uses it)."""

    def command(self, *args: Any, cls: Any = None, **kwargs: Any):
        return super().command(*args, cls=cls or ReadableCommand, **kwargs)


def out(text: str = "") -> None:
    typer.echo(text)


def load(path: Path, overrides: Optional[list[str]]):
    """The spec at ``path`` with ``--set`` overrides applied (validated)."""
    from raytune_ft.spec import load_spec

    return load_spec(path, overrides or [])
