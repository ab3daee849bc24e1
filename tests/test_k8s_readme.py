"""k8s/README.md is one sequence a user can paste (issue 18 item 11): its `rtf` commands parse against the
real CLI, every manifest it applies was rendered by an earlier step under the same file name (never the
committed examples), and the render step, run as written with the README's own variables, gives a RayJob
with that image and bucket whose name, namespace and storage prefix are the ones the later steps use."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from raytune_ft.cli import main
from raytune_ft.cli.app import app

REPO = Path(__file__).resolve().parents[1]
README = REPO / "k8s" / "README.md"


def commands() -> list[list[str]]:
    """Each command of the README's bash blocks, in order: continuation lines joined, comments dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                out.append(argv)
    return out


def exported() -> dict[str, str]:
    """The variables the README exports (NAME=value, expanding the ones exported before)."""
    env: dict[str, str] = {}
    for argv in commands():
        if argv[0] == "export" and "=" in argv[1] and "$(" not in argv[1]:
            key, value = argv[1].split("=", 1)
            env[key] = expand(value, env)
    return env


def expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Z_]+)\}?", lambda m: env[m.group(1)], text)


def parse(argv: list[str]) -> Any:
    """Parse an `rtf …` command line with the real CLI (no callback runs); raises the CLI's UsageError
    (Typer's own copy of click's) naming a wrong flag or a missing argument."""
    cmd = typer.main.get_command(app)
    args = list(argv[1:])
    while hasattr(cmd, "list_commands"):  # a group: rtf, rtf render, rtf checkpoints
        sub = cmd.get_command(cmd.context_class(cmd), args[0])
        assert sub is not None, f"no command `{args[0]}` in {' '.join(argv)}"
        cmd, args = sub, args[1:]
    cmd.make_context(cmd.name, args)
    return cmd


def test_every_rtf_command_parses_against_the_cli():
    rtf = [argv for argv in commands() if argv[0] == "rtf"]
    names = {" ".join(a for a in argv[1:3] if not a.startswith(("-", "$", "."))) for argv in rtf}
    assert {"render k8s", "checkpoints list", "checkpoints pull"} <= names, names
    for argv in rtf:
        parse(argv)  # a wrong flag or a missing argument raises a UsageError naming it
    for wrong in (["rtf", "render", "k8s", "s.yaml", "--image", "x"], ["rtf", "checkpoints", "pull", "s3://b/run"]):
        with pytest.raises(Exception, match="No such option: --image|Missing parameter: dest"):
            parse(wrong)


def test_what_is_applied_was_rendered_before_under_the_same_name():
    rendered: list[str] = []
    applied = 0
    for argv in commands():
        if argv[:3] == ["rtf", "render", "k8s"]:
            assert "-o" in argv, argv
            rendered.append(argv[argv.index("-o") + 1])
            assert {"cluster.image=$IMAGE", "storage.path=$BUCKET/rtf"} <= set(argv), argv
        if argv[0] == "kubectl" and argv[1] in ("apply", "delete") and "-f" in argv:
            target = argv[argv.index("-f") + 1]
            assert not target.startswith("k8s/"), f"{' '.join(argv)}: applies a committed example, not a render"
            assert target in rendered, f"{' '.join(argv)}: no earlier `rtf render k8s … -o {target}`"
            applied += argv[1] == "apply"
    assert applied == 2 and rendered == ["rayjob.yaml", "raycluster.yaml"]


def test_the_render_step_as_written_gives_the_image_bucket_and_names_the_later_steps_use(tmp_path, monkeypatch):
    env = exported()
    assert {"REGISTRY", "IMAGE", "BUCKET", "RUN"} <= set(env) and env["IMAGE"].startswith(env["REGISTRY"] + "/")
    (tmp_path / "jobspecs").symlink_to(REPO / "jobspecs")  # the README runs from the repository root
    monkeypatch.chdir(tmp_path)
    cmds = commands()
    for argv in (a for a in cmds if a[:3] == ["rtf", "render", "k8s"]):
        try:
            main([expand(a, env) for a in argv[1:]])
        except SystemExit as e:
            assert e.code in (0, None), argv
    job_docs = list(yaml.safe_load_all((tmp_path / "rayjob.yaml").read_text()))
    config, job = job_docs
    assert job["kind"] == "RayJob" and config["kind"] == "ConfigMap"
    spec = yaml.safe_load(next(iter(config["data"].values())))
    images = re.findall(r"image: (\S+)", (tmp_path / "rayjob.yaml").read_text())
    assert images and set(images) == {env["IMAGE"]}
    assert spec["storage"]["path"] == f"{env['BUCKET']}/rtf" and spec["data"]["train"][0]["path"].startswith(env["BUCKET"])
    assert env["RUN"] == f"{spec['storage']['path']}/{spec['name']}"  # where step 7 fetches from
    name, ns = job["metadata"]["name"], job["metadata"]["namespace"]
    watch = [a for a in cmds if a[:2] == ["kubectl", "-n"] and a[3:5] == ["get", "rayjob"]]
    assert watch and all(a[2] == ns and a[5] == name for a in watch), watch
    cluster = list(yaml.safe_load_all((tmp_path / "raycluster.yaml").read_text()))[1]
    assert cluster["kind"] == "RayCluster" and set(re.findall(r"image: (\S+)", (tmp_path / "raycluster.yaml")
                                                              .read_text())) == {env["IMAGE"]}
