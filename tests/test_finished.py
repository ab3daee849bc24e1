"""A finished run resubmitted unchanged is complete: it says so, names its outputs, exits 0 and changes
nothing in storage. Extending it is an explicit act (a larger max_steps), and a run whose last checkpoint
is at max_steps but whose final/ was never written writes final/ without stepping past max_steps."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from raytune_ft.cli import main
from raytune_ft.launch.driver import finished_run
from raytune_ft.spec import load_spec, spec_from_dict
from tests.specs import base_doc
from tests.tiny import spec_doc, write_spec

pytestmark = pytest.mark.ray


def submit(argv, capsys):
    with pytest.raises(SystemExit) as ei:
        main(["submit", *argv])
    out = capsys.readouterr()
    return ei.value.code, out.out + out.err


def snapshot(run_dir):
    """Every file under the run dir with its sha256 and mtime: what 'changes nothing' is checked against."""
    return {str(p.relative_to(run_dir)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_finished_run_resubmitted_twice_changes_nothing_then_extends(ray_local, in_process, tiny, tmp_path, capsys):
    train, _, model_dir = tiny
    doc = spec_doc("done-once", model_dir, train, None, tmp_path / "runs")
    spec_path = write_spec(tmp_path / "s.yaml", doc)
    code, out = submit([str(spec_path)], capsys)
    assert code == 0, out
    run = tmp_path / "runs" / "done-once"
    assert json.loads((run / "final" / "final_results.json").read_text())["steps"] == 6
    before = snapshot(run)
    assert "checkpoint-00000003/rtf_checkpoint.json" in before and "checkpoint-00000006/rtf_checkpoint.json" in before

    for _ in range(2):  # the report: each resubmit took one more step and pruned a real checkpoint
        code, out = submit([str(spec_path)], capsys)
        assert code == 0, out
        assert "already complete: final/ was written at step 6 (training.max_steps: 6)" in out
        assert f"outputs in {run}/final" in out
        assert "resuming from" not in out and "checkpoint committed" not in out and "ray:" not in out
        assert snapshot(run) == before
    state = json.loads((run / "final" / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and state["max_steps"] == 6

    # a spec that defines another run may not take these checkpoints over (hardening: resume identity)
    for override, shown in (("method.lora.r=8", "method.lora.r 4 -> 8"),
                            ("training.learning_rate=0.001", "training.learning_rate 0.005 -> 0.001"),
                            ("data.max_seq_length=64", "data.max_seq_length 128 -> 64")):
        code, out = submit([str(spec_path), "--set", override], capsys)
        assert code == 2, out
        assert f"run done-once has checkpoints trained with a different spec: {shown}" in out
        assert "--fresh" in out and "ray:" not in out and "Traceback" not in out
        assert snapshot(run) == before

    # extending is explicit: a larger max_steps resumes from step 6 and trains 7..9
    code, out = submit([str(spec_path), "--set", "training.max_steps=9"], capsys)
    assert code == 0, out
    assert "resuming with changed training.max_steps 6 -> 9" in out
    assert "resuming from" in out and "at step 6" in out and "checkpoint committed: step 9" in out
    assert json.loads((run / "final" / "final_results.json").read_text())["steps"] == 9
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 10))


def test_checkpoint_at_max_steps_without_final_does_not_step_past_it(ray_local, in_process, tiny, tmp_path,
                                                                      capsys):
    """A run that died after committing its last checkpoint but before final/ (Trainer, resumed at
    max_steps, would take step max_steps+1 and prune the checkpoints it came from)."""
    train, _, model_dir = tiny
    # 64 examples / 4 per step = 16 steps an epoch: max_steps 6 ends mid-epoch, where the extra step happened
    doc = spec_doc("no-final", model_dir, train, None, tmp_path / "runs")
    spec_path = write_spec(tmp_path / "s.yaml", doc)
    code, out = submit([str(spec_path)], capsys)
    assert code == 0, out
    run = tmp_path / "runs" / "no-final"
    first = json.loads((run / "final" / "final_results.json").read_text())
    shutil.rmtree(run / "final")
    code, out = submit([str(spec_path)], capsys)
    assert code == 0, out
    assert "at step 6" in out and "checkpoint committed: step 7" not in out
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-00000003", "checkpoint-00000006"]
    res = json.loads((run / "final" / "final_results.json").read_text())
    assert res["steps"] == 6
    assert res["fingerprint"]["last_logits_head"] == pytest.approx(first["fingerprint"]["last_logits_head"], abs=1e-5)
    state = json.loads((run / "final" / "trainer_state.json").read_text())
    assert state["global_step"] == 6


def _final(tmp_path, name, steps, epoch):
    final = tmp_path / name / "final"
    final.mkdir(parents=True)
    (final / "final_results.json").write_text(json.dumps({"steps": steps}))
    (final / "trainer_state.json").write_text(json.dumps({"global_step": steps, "epoch": epoch}))


def test_finished_run_rules(tmp_path):
    def spec(name, **training):
        t = {"learning_rate": 1e-4, "precision": "fp32", **training}
        return spec_from_dict(base_doc(name=name, storage={"path": str(tmp_path)}, training=t))

    assert finished_run(spec("none", max_steps=10)) is None  # no final/
    _final(tmp_path, "steps", 10, 0.6)
    assert finished_run(spec("steps", max_steps=10)).steps == 10
    assert finished_run(spec("steps", max_steps=12)) is None  # extended: trains on
    _final(tmp_path, "epochs", 32, 2.0)
    done = finished_run(spec("epochs", num_epochs=2))
    assert done is not None and "after epoch 2 at step 32 (training.num_epochs: 2)" in done.message()
    assert finished_run(spec("epochs", num_epochs=3)) is None
    (tmp_path / "bad" / "final").mkdir(parents=True)
    (tmp_path / "bad" / "final" / "final_results.json").write_text("{not json")
    assert finished_run(spec("bad", max_steps=10)) is None  # not rtf's: training decides, nothing assumed


def test_finished_spec_loads(tmp_path):
    """The message names the override that extends the run, and it is a valid override."""
    _final(tmp_path, "r", 10, 0.5)
    s = spec_from_dict(base_doc(name="r", storage={"path": str(tmp_path)}, training={"max_steps": 10}))
    msg = finished_run(s).message()
    assert "--set training.max_steps=20" in msg and "--fresh" in msg
    path = write_spec(tmp_path / "r.yaml", base_doc(name="r", storage={"path": str(tmp_path)}))
    assert load_spec(path, ["training.max_steps=20"]).training.max_steps == 20


def test_identity_changes_split_defining_from_extending():
    from raytune_ft.spec import dump_spec, identity

    a = dump_spec(spec_from_dict(base_doc()))
    b = dump_spec(spec_from_dict(base_doc(training={"max_steps": 20, "learning_rate": 1e-4, "precision": "fp32",
                                                    "logging_steps": 1}, compute={"num_workers": 2})))
    assert identity.changes(a, b) == ([], ["compute.num_workers", "training.logging_steps", "training.max_steps"])
    c = dump_spec(spec_from_dict(base_doc(model={"name_or_path": "other/model"},
                                          method={"type": "lora", "lora": {"r": 16, "alpha": 16}})))
    defining, allowed = identity.changes(a, c)
    assert defining == ["method.lora.r", "model.name_or_path"] and allowed == []
    assert identity.describe(a, c, defining) == "method.lora.r 8 -> 16; model.name_or_path 'some/model' -> 'other/model'"


def test_a_run_started_under_the_old_optimizer_default_resumes_under_the_new_one():
    """training.optimizer's default became adamw_torch_fused: a run whose stored spec says adamw_torch (the old
    default) is the same run (the same update and optimizer state); another optimizer is another run."""
    from raytune_ft.spec import dump_spec, identity

    def with_optimizer(name: str | None) -> dict:
        doc = base_doc()
        if name:
            doc["training"]["optimizer"] = name
        return dump_spec(spec_from_dict(doc))

    new, old, other = with_optimizer(None), with_optimizer("adamw_torch"), with_optimizer("adafactor")
    assert new["training"]["optimizer"] == "adamw_torch_fused"
    assert identity.changes(old, new) == ([], [])
    assert identity.changes(old, other) == (["training.optimizer"], [])
