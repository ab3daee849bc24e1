"""`rtf --version` prints the version: the installed distribution's, else the package's own."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

import raytune_ft
from raytune_ft.cli import main
from raytune_ft.cli.app import version

ROOT = Path(__file__).resolve().parents[1]


def run(argv, capsys):
    with pytest.raises(SystemExit) as ei:
        main(argv)
    out = capsys.readouterr()
    return ei.value.code, out.out, out.err


def test_version_flag(capsys):
    declared = re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert raytune_ft.__version__ == declared  # the fallback agrees with the packaging metadata
    code, out, err = run(["--version"], capsys)
    assert (code, out, err) == (0, f"rtf {importlib.metadata.version('raytune_ft')}\n", "")
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and "--version" in out and "submit" in out  # the commands are still listed


def test_version_falls_back_to_the_package(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)  # a source tree that was never installed
    assert version() == raytune_ft.__version__
