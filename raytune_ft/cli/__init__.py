"""The ``rtf`` command line (Typer). ``raytune_ft.cli:main`` is the console script."""

from raytune_ft.cli.app import app, main

__all__ = ["app", "main"]
