"""`rtf submit --resume-from PATH`: a relative PATH means the directory rtf was run from (Ray workers run
in their own), and a checkpoint that is not committed fails before Ray starts, in one line, leaving no
run directory behind. A resumed run's tokens/s covers what this attempt trained."""

from __future__ import annotations

import json

import pyarrow.fs as pafs
import pytest

from raytune_ft import checkpoints as ck
from raytune_ft.cli import main
from raytune_ft.launch.targets import check_resume_from
from raytune_ft.spec import spec_from_dict
from tests.tiny import spec_doc, write_spec


def submit(argv, capsys):
    with pytest.raises(SystemExit) as ei:
        main(["submit", *argv])
    out = capsys.readouterr()
    return ei.value.code, out.out, out.err


def checkpoint(run_dir, step, *, commit):
    """A checkpoint dir as the trainer uploads it; committed when its manifest is written."""
    d = run_dir / ck.checkpoint_dir_name(step)
    d.mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if commit:
        ck.write_manifest(pafs.LocalFileSystem(), str(d), step=step, epoch=0.1, files=ck.file_digests(str(d)),
                          spec_hash=None)
    return d


def test_relative_resume_from_is_resolved_against_the_submitting_directory(tmp_path, monkeypatch):
    d = checkpoint(tmp_path / "runs" / "a", 3, commit=True)
    spec = spec_from_dict(spec_doc("b", tmp_path / "m", tmp_path / "t.jsonl", None, tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    assert check_resume_from(spec, "runs/a/checkpoint-00000003") == str(d)
    assert check_resume_from(spec, "./runs/a/checkpoint-00000003/", base=str(tmp_path)) == str(d)


def test_uncommitted_or_missing_resume_from_fails_before_ray_and_writes_nothing(tiny, tmp_path, monkeypatch,
                                                                                capsys):
    train, _, model_dir = tiny
    checkpoint(tmp_path / "runs" / "a", 3, commit=False)  # files, no manifest: an upload cut short
    spec = write_spec(tmp_path / "b.yaml", spec_doc("b", model_dir, train, None, tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    for arg, why in [("runs/a/checkpoint-00000003", "not a committed checkpoint (no manifest"),
                     ("runs/a/checkpoint-00000009", "no such checkpoint directory")]:
        code, out, err = submit([str(spec), "--resume-from", arg], capsys)
        assert code == 2, out + err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: --resume-from {arg}: {why}"), err
        assert "Traceback" not in err and "ray:" not in out + err  # Ray was never started
        assert not (tmp_path / "runs" / "b").exists()  # no stub run dir


@pytest.mark.ray
def test_relative_resume_from_trains_on_from_that_checkpoint(ray_local, tiny, tmp_path, monkeypatch, capsys):
    """The issue's report: `--resume-from rtf_runs/my-lora/checkpoint-…` (relative) failed in the worker with
    'not a committed checkpoint (empty)' while the same path given absolute worked."""
    train, _, model_dir = tiny
    code, out, err = submit([str(write_spec(tmp_path / "a.yaml", spec_doc(
        "a", model_dir, train, None, tmp_path / "rtf_runs")))], capsys)
    assert code == 0, out + err
    monkeypatch.chdir(tmp_path)
    spec_b = write_spec(tmp_path / "b.yaml", spec_doc("b", model_dir, train, None, tmp_path / "rtf_runs"))
    code, out, err = submit([str(spec_b), "--resume-from", "rtf_runs/a/checkpoint-00000003"], capsys)
    assert code == 0, out + err
    assert f"resuming from {tmp_path / 'rtf_runs' / 'a' / 'checkpoint-00000003'} at step 3" in err
    res = json.loads((tmp_path / "rtf_runs" / "b" / "final" / "final_results.json").read_text())
    assert res["steps"] == 6

    # item 5: tokens/s is this attempt's tokens (steps 4..6) over this attempt's runtime, not the whole run's
    # tokens (HF's num_input_tokens_seen carries on across a resume) over the resumed part's runtime
    whole = json.loads((tmp_path / "rtf_runs" / "a" / "final" / "final_results.json").read_text())
    at3 = json.loads((tmp_path / "rtf_runs" / "a" / "checkpoint-00000003" / "trainer_state.json").read_text())
    seen3 = at3["num_input_tokens_seen"]
    assert 0 < seen3 < res["tokens"] == whole["tokens"]  # same data, same steps: the same tokens in all
    assert res["attempt_tokens"] == res["tokens"] - seen3
    assert res["tokens_per_s"] == pytest.approx(res["attempt_tokens"] / res["runtime_s"], rel=1e-9)
    assert f"tokens since resume  {res['attempt_tokens']:,}" in err
    assert f"tokens/s             {res['tokens_per_s']:,.0f}" in err


def test_a_restarted_worker_group_goes_on_from_what_the_run_committed_not_from_resume_from_again(tmp_path):
    """Ray Train restarts the workers after a failure with the same WorkerConfig: with --resume-from they must
    go on from the checkpoint this run committed since the submission started, not from the --resume-from
    point again (its steps would be trained twice). The run's checkpoints from before the submission (an
    earlier run in the same dir) do not count: --resume-from wins over them."""
    import time

    from raytune_ft.rundir import RunDir
    from raytune_ft.train.recipe import RunContext, find_resume_point

    other = tmp_path / "other"
    checkpoint(other, 40, commit=True)
    explicit = str(other / ck.checkpoint_dir_name(40))
    run_path = tmp_path / "runs" / "r"
    checkpoint(run_path, 90, commit=True)  # an earlier run's, before this submission
    spec = spec_from_dict({"name": "r", "model": {"name_or_path": "m"}, "data": {"train": {"path": "t.jsonl"}},
                           "training": {"max_steps": 100}, "storage": {"path": str(tmp_path / "runs")}})
    run = RunContext(spec, 0, 1, 0, RunDir.of(spec))
    started = time.time() + 1  # the submission started after that checkpoint
    assert find_resume_point(run, explicit, started).step == 40
    assert find_resume_point(run, explicit).step == 40  # (no start given: as before)
    time.sleep(1.1)
    checkpoint(run_path, 48, commit=True)  # committed by this submission's first worker group
    assert find_resume_point(run, explicit, started).step == 48  # not the earlier run's 90
    time.sleep(0.01)
    checkpoint(run_path, 56, commit=True)
    assert find_resume_point(run, explicit, started).step == 56
