"""`rtf render … -o` never writes over the spec it renders (the README once showed
`rtf render k8s job.yaml -o job.yaml`, which replaced the spec with the manifest)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from raytune_ft.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(argv, capsys):
    with pytest.raises(SystemExit) as ei:
        main(argv)
    out = capsys.readouterr()
    return ei.value.code, out.out, out.err


def test_render_refuses_to_write_over_its_spec(tmp_path, capsys, monkeypatch):
    spec = tmp_path / "job.yaml"
    shutil.copy(ROOT / "jobspecs" / "k8s.yaml", spec)
    before = spec.read_bytes()
    monkeypatch.chdir(tmp_path)
    for out_arg in ("job.yaml", str(spec), "./job.yaml"):
        code, out, err = run(["render", "k8s", "job.yaml", "-o", out_arg], capsys)
        assert code == 2, out + err
        assert err.strip().splitlines() == [f"error: -o {Path(out_arg)} is the spec being rendered: writing the manifest "
                                            "there would replace the spec; give another file name (e.g. -o rayjob.yaml)"]
        assert spec.read_bytes() == before
    code, out, err = run(["render", "runpod", "job.yaml", "-o", "job.yaml"], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "(the spec being rendered)" in err and spec.read_bytes() == before
    code, _, err = run(["render", "k8s", "job.yaml", "-o", "rayjob.yaml"], capsys)  # the README's command
    assert code == 0 and "wrote rayjob.yaml" in err and spec.read_bytes() == before
    assert "kind: RayJob" in (tmp_path / "rayjob.yaml").read_text()


def test_readme_render_commands_use_distinct_names():
    readme = (ROOT / "README.md").read_text()
    assert "rtf render k8s my-job.yaml -o rayjob.yaml" in readme and "-o job.yaml" not in readme
