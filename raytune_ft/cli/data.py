"""``rtf data split|preview``: prepare and inspect training data (:mod:`raytune_ft.data`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from raytune_ft.cli.common import SetOpt, Typer, load, out

app = Typer(help="Prepare and inspect training data.", no_args_is_help=True)


@app.command("split")
def data_split(
    input_path: Path = typer.Argument(..., metavar="INPUT", help="A JSONL/JSON/CSV/parquet file."),
    eval_fraction: float = typer.Option(..., "--eval-fraction", metavar="FRACTION", help="Share of rows for eval, in (0, 1)."),
    seed: int = typer.Option(0, "--seed", metavar="N", help="Shuffle seed: the same seed gives the same split."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", metavar="DIR", help="Default: next to INPUT."),
) -> None:
    """Split a data file into train and eval files, deterministically for a seed."""
    from raytune_ft.data.split import split_file

    train, evals = split_file(input_path, eval_fraction, seed, out_dir=out_dir)
    out(f"train: {train}\neval:  {evals}")


@app.command("preview")
def data_preview(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="The job spec whose data to show."),
    overrides: Optional[list[str]] = SetOpt,
    n: int = typer.Option(3, "-n", metavar="N", help="Examples to show."),
) -> None:
    """Show tokenized examples with the loss mask visible, and data statistics."""
    from raytune_ft.data.preview import preview_data
    from raytune_ft.spec import absolutize

    spec = absolutize(load(spec_path, overrides))
    out(preview_data(spec, n=n))
