"""After training: resolve a run's outputs (source), generate, merge, evaluate, plot, list runs.

Each tool is a module with a plain function; :mod:`raytune_ft.tools.cli` holds their Typer commands.
"""
