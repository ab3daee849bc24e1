"""Every command's --help reads as words, not Python types (issue 12 item 21): no `<list[str]>`, `<int range>`,
`<path>`; options show the metavar a person reads (TEXT, N, KEY=VALUE, SPEC|RUN|URI, PATH)."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from raytune_ft.cli.app import app

PYTHON_TYPES = ("<", "list[", "int range", "float range", "str]", "Path]")


def commands() -> list[list[str]]:
    out = []

    def walk(cmd, path):
        out.append(path)
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return out


def help_of(path: list[str]) -> str:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, (path, result.output)
    return result.output


def test_no_python_types_in_any_help():
    paths = commands()
    assert len(paths) >= 25 and ["checkpoints", "pull"] in paths and ["data", "preview"] in paths
    for path in paths:
        text = help_of(path)
        for bad in PYTHON_TYPES:
            assert bad not in text, (" ".join(path), bad, text)


def test_key_options_show_their_metavar():
    lines = {tuple(p): help_of(p) for p in (["validate"], ["plan"], ["checkpoints", "pull"], ["checkpoints", "prune"],
                                             ["generate"], ["jobs"], ["render", "k8s"], ["data", "split"])}
    assert "-s, --set KEY=VALUE" in lines[("validate",)] and "SPEC  Job spec YAML files." in lines[("validate",)]
    assert "--tokens N" in lines[("plan",)]
    assert "SPEC|RUN|URI  " in lines[("checkpoints", "pull")] and "--step N" in lines[("checkpoints", "pull")]
    assert "--endpoint-url URL" in lines[("checkpoints", "pull")]
    assert "SPEC|RUN|URI  " in lines[("checkpoints", "prune")] and "--keep N" in lines[("checkpoints", "prune")]
    assert "-p, --prompt TEXT" in lines[("generate",)] and "--max-new-tokens N" in lines[("generate",)]
    assert "-n, --limit N" in lines[("jobs",)]
    assert "-o, --output PATH" in lines[("render", "k8s")]
    assert "--out-dir DIR" in lines[("data", "split")] and "--seed N" in lines[("data", "split")]
