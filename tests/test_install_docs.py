"""The install statements agree: the README, the Makefile and docker/Dockerfile.cpu say the same about
CPU torch (PyPI's Linux wheel is the CUDA build; a CPU-only machine takes PyTorch's CPU index) and pin
the same torch as constraints.txt. The README once claimed the pin alone kept CUDA packages away."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def test_readme_and_cpu_dockerfile_say_the_same_about_cpu_torch():
    readme = (ROOT / "README.md").read_text()
    docker = (ROOT / "docker" / "Dockerfile.cpu").read_text()
    pin = re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert re.search(r"ARG TORCH_VERSION=(\S+)", docker).group(1) == pin
    assert set(re.findall(r"torch==(\d[\w.]*)", readme)) == {pin}
    for text in (readme, docker):
        assert CPU_INDEX in text
        assert re.search(r"PyPI's (Linux|torch) wheel is the CUDA build", " ".join(text.split()))
    # the statement that disagreed with the Dockerfile: a version pin does not choose the CPU build
    assert "a looser pin pulls several GB of CUDA packages" not in " ".join(readme.split())
    assert f"make install TORCH_INDEX={CPU_INDEX}" in " ".join(readme.split())


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_install_takes_torch_from_the_index_it_is_given(tmp_path):
    """`make -n` prints the recipe without running it (nothing is installed)."""
    def recipe(*extra):
        return subprocess.run(["make", "-n", "-B", "install", f"VENV={tmp_path / 'v'}", *extra], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout

    torch_line = next(x for x in recipe(f"TORCH_INDEX={CPU_INDEX}").splitlines() if '"torch==' in x)
    assert torch_line.endswith(f"--index-url {CPU_INDEX}")
    assert "--index-url" not in recipe()  # the default is unchanged: pip's own index
