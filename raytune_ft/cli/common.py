"""What every command module of the CLI shares: the ``--set`` option, loading a spec, printing."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

SetOpt = typer.Option(None, "--set", "-s", help="Override a spec value: dotted.key=value (repeatable).")


def out(text: str = "") -> None:
    typer.echo(text)


def load(path: Path, overrides: Optional[list[str]]):
    """The spec at ``path`` with ``--set`` overrides applied (validated)."""
    from raytune_ft.spec import load_spec

    return load_spec(path, overrides or [])
