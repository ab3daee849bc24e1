"""The tune: section without Ray runs: validation at spec load (paths, distributions, every value a valid
spec), the Tune objects built from it, what reaches Tune from a Train report, results.csv and best.yaml."""

from __future__ import annotations

import math
import re

import pytest
import yaml

from raytune_ft.cli import main
from raytune_ft.errors import SpecError
from raytune_ft.rundir import trial_name
from raytune_ft.spec import dump_spec, load_spec, spec_from_dict, to_yaml
from raytune_ft.sweep import results
from raytune_ft.sweep import tune as sweep_tune
from tests.specs import base_doc

SPACE = {"training.learning_rate": {"loguniform": [1.0e-5, 1.0e-3]}, "method.lora.r": {"choice": [4, 8, 16]}}


def sweep_doc(tune: dict | None = None, **over) -> dict:
    doc = base_doc(**over)
    doc["data"]["eval_split"] = 0.1
    doc["training"].update(eval_strategy="steps", eval_steps=2, save_steps=4)
    doc["tune"] = {"space": SPACE, "num_samples": 4, **(tune or {})}
    return doc


def validate_cli(tmp_path, doc, capsys) -> tuple[int, str]:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(SystemExit) as ei:
        main(["validate", str(path)])
    out = capsys.readouterr()
    return ei.value.code, out.out + out.err


def test_a_valid_sweep_loads_and_round_trips():
    spec = spec_from_dict(sweep_doc({"scheduler": {"type": "asha", "grace_period": 4, "reduction_factor": 2},
                                     "max_concurrent_trials": 2, "seed": 3}))
    t = spec.tune
    assert t.space["training.learning_rate"].kind == "loguniform" and t.space["method.lora.r"].options == [4, 8, 16]
    assert (t.metric, t.mode, t.search, t.scheduler.type, t.scheduler.grace_period) == ("eval_loss", "min", "random", "asha", 4)
    assert spec_from_dict(dump_spec(spec)) == spec  # the dump validates again (tuples as lists)
    assert spec_from_dict(sweep_doc()).tune.scheduler.type == "fifo"


@pytest.mark.parametrize("tune, line", [
    ({"space": {"training.learnig_rate": {"loguniform": [1e-5, 1e-3]}}},
     "tune.space.training.learnig_rate: no field `training.learnig_rate` in the spec schema; did you mean `training.learning_rate`?"),
    ({"space": {"training.learning_rate": {"logunifrom": [1e-5, 1e-3]}}},
     "tune.space.training.learning_rate: unknown distribution `logunifrom`; did you mean `loguniform`?"),
    ({"space": {"training.learning_rate": {"loguniform": [0, 1e-3]}}},
     "tune.space.training.learning_rate: loguniform needs lo > 0 (got 0)"),
    ({"space": {"training.learning_rate": {"uniform": [1e-3, 1e-5]}}},
     "tune.space.training.learning_rate: uniform needs lo < hi (got [0.001, 1e-05])"),
    ({"space": {"training.learning_rate": {"loguniform": [1e-5, 1.5]}}},
     "tune.space.training.learning_rate: the value 1.5 gives an invalid spec: training.learning_rate: must be less than 1"),
    ({"space": {"method.lora.r": {"uniform": [4, 8.5]}}},
     "tune.space.method.lora.r: `method.lora.r` is an integer: uniform bounds must be whole numbers"),
    ({"space": {"method.lora.r": {"grid": [8, 8192]}}},
     "tune.space.method.lora.r: the value 8192 gives an invalid spec: method.lora.r: must be less than or equal to 4096"),
    ({"space": {"training.lr_scheduler_type": {"choice": ["cosine", "cosinee"]}}},
     "tune.space.training.lr_scheduler_type: the value 'cosinee' gives an invalid spec"),
    ({"space": {"training.lr_scheduler_type": {"uniform": [0, 1]}}},
     "tune.space.training.lr_scheduler_type: uniform samples numbers but `training.lr_scheduler_type` is not numeric"),
    ({"space": {"training.warmup_ratio": {"choice": [0.0, 0.1]}}, "_training": {"warmup_steps": 2}},
     "tune.space.training.warmup_ratio: the value 0.1 gives an invalid spec: training: give training.warmup_ratio "
     "or training.warmup_steps, not both"),
    ({"space": {"method.lora": {"choice": [{"r": 4}]}}},
     "tune.space.method.lora: `method.lora` is a section; sweep one of its values"),
    ({"space": {"storage.path": {"choice": ["a", "b"]}}},
     "tune.space.storage.path: `storage` cannot be swept"),
    ({"space": {"data.train.3.weight": {"uniform": [0.5, 2.0]}}},
     "tune.space.data.train.3.weight: the value 0.5 gives an invalid spec: `data.train` has 1 item(s); index 3 is out of range"),
    ({"space": {"training.learning_rate": {"loguniform": [1e-5, 1e-3]}}, "search": "grid"},
     "tune.space.training.learning_rate: tune.search grid runs every value"),
    ({"space": {"training.learning_rate": {"grid": [1e-5, 1e-3]}}, "search": "optuna"},
     "tune.space.training.learning_rate: tune.search optuna samples values"),
    ({"space": {"training.learning_rate": 0.001}},
     "tune.space.training.learning_rate: must be a one-key mapping"),
    ({"space": SPACE, "num_samples": None}, "tune.num_samples: tune.search random samples training.learning_rate, method.lora.r: "
     "set tune.num_samples"),
    ({"space": SPACE, "mode": "max"}, "tune.mode: tune.metric eval_loss is a loss (lower is better): tune.mode must be min"),
    ({"space": SPACE, "scheduler": {"type": "asha", "grace_period": 3}},
     "tune.scheduler.grace_period: must be a multiple of training.eval_steps (2)"),
    ({"space": SPACE, "scheduler": {"type": "asha", "grace_period": 10}},
     "tune.scheduler.grace_period: ASHA's first rung (10 steps) must come before training.max_steps (10)"),
    ({"space": SPACE, "scheduler": {"type": "hyperband"}}, "tune.scheduler: type must be one of asha, fifo (got hyperband)"),
    ({"space": SPACE, "_no_eval": True}, "tune.metric: eval_loss comes from evaluation"),
])
def test_bad_tune_sections_exit_2_naming_the_path_and_line(tmp_path, capsys, tune, line):
    tune = dict(tune)
    training = tune.pop("_training", {})
    no_eval = tune.pop("_no_eval", False)
    doc = sweep_doc()
    doc["tune"] = {"num_samples": 4, **tune}
    if tune.get("num_samples", 0) is None:
        doc["tune"].pop("num_samples")
    doc["training"].update(training)
    if no_eval:
        doc["data"].pop("eval_split")
        doc["training"] = {k: v for k, v in doc["training"].items() if k not in ("eval_strategy", "eval_steps")}
    code, out = validate_cli(tmp_path, doc, capsys)
    assert code == 2, out
    assert line in out, out
    assert "Traceback" not in out
    # the YAML line is named: file:line before the dotted path
    assert re.search(r"sweep\.yaml:\d+ " + re.escape(line.split(":")[0]) + ":", out), out


def test_every_combination_of_edge_values_is_checked():
    # each value alone gives a valid spec; warmup_steps 2 with warmup_ratio 0.1 does not
    doc = sweep_doc({"space": {"training.warmup_steps": {"choice": [0, 2]}, "training.warmup_ratio": {"choice": [0.0, 0.1]}}})
    with pytest.raises(SpecError) as ei:
        spec_from_dict(doc)
    msg = str(ei.value)
    assert "tune.space: the combination training.warmup_steps=2, training.warmup_ratio=0.1 gives an invalid spec" in msg


def test_param_space_samples_integers_for_integer_fields_and_grids_choices_under_grid_search():
    from ray import tune

    spec = spec_from_dict(sweep_doc({"space": {"training.learning_rate": {"loguniform": [1e-5, 1e-3]},
                                               "method.lora.r": {"uniform": [4, 64]},
                                               "method.lora.alpha": {"loguniform": [8, 64]},
                                               "training.lr_scheduler_type": {"choice": ["cosine", "linear"]}}}))
    space = sweep_tune.param_space(spec)
    assert isinstance(space["training.learning_rate"], tune.search.sample.Float)
    r = space["method.lora.r"]
    assert isinstance(r, tune.search.sample.Integer) and (r.lower, r.upper) == (4, 65)  # inclusive of 64
    assert isinstance(space["method.lora.alpha"], tune.search.sample.Float)  # alpha is a float field
    assert all(4 <= v <= 64 and isinstance(v, int) for v in (r.sample() for _ in range(50)))
    grid = spec_from_dict(sweep_doc({"space": {"method.lora.r": {"choice": [4, 8]},
                                               "training.learning_rate": {"grid": [1e-4, 1e-3]}}, "search": "grid"}))
    assert sweep_tune.param_space(grid) == {"method.lora.r": {"grid_search": [4, 8]},
                                       "training.learning_rate": {"grid_search": [1e-4, 1e-3]}}


def test_scheduler_rungs_fall_on_reported_steps_and_never_at_the_end():
    spec = spec_from_dict(sweep_doc({"scheduler": {"type": "asha", "reduction_factor": 2}}))
    asha = sweep_tune.scheduler(spec)
    assert asha._time_attr == "step" and asha._max_t == 10 and not asha._stop_last_trials
    rungs = sorted(m for m, _ in asha._brackets[0]._rungs)
    assert rungs == [2, 4, 8]  # grace_period defaulted to eval_steps


def test_a_train_report_reaches_tune_only_with_a_fresh_metric():
    # an evaluation (no checkpoint): forwarded, with the perplexity the worker reported (next-token objectives)
    r = sweep_tune.to_tune_result({"step": 2, "eval_loss": 2.0, "perplexity": math.exp(2.0), "max_steps": 10},
                                  "eval_loss", has_checkpoint=False)
    assert r["eval_loss"] == 2.0 and r["perplexity"] == pytest.approx(math.exp(2.0)) and r["final"] is False
    # none is made up for another objective's eval_loss (a DPO or regression loss has no perplexity)
    assert "perplexity" not in sweep_tune.to_tune_result({"step": 2, "eval_loss": 0.6, "eval_accuracy": 0.7},
                                                         "eval_accuracy", has_checkpoint=False)
    # a checkpoint repeats the last eval: not for an eval metric, yes for the training loss
    ckpt = {"step": 4, "loss": 1.5, "eval_loss": 2.0}
    assert sweep_tune.to_tune_result(ckpt, "eval_loss", has_checkpoint=True) is None
    assert sweep_tune.to_tune_result(ckpt, "loss", has_checkpoint=True)["loss"] == 1.5
    assert sweep_tune.to_tune_result({"step": 2, "eval_loss": 2.0}, "loss", has_checkpoint=False) is None
    # the final report: done is renamed (Tune would stop the trial before its trainer returns)
    final = sweep_tune.to_tune_result({"step": 10, "loss": 1.0, "eval_loss": 1.8, "done": True}, "eval_loss", False)
    assert final["final"] is True and "done" not in final
    # a diverged loss is the worst value, flagged
    nan = sweep_tune.to_tune_result({"step": 2, "eval_loss": float("nan")}, "eval_loss", False)
    assert nan["eval_loss"] == sweep_tune.DIVERGED and nan["diverged"] is True


def test_trial_names_and_trial_specs():
    assert trial_name("a1b2c_00003") == "trial-003"
    assert trial_name("a1b2c_01234") == "trial-1234"
    assert trial_name("9f8e7d6c") == "trial-9f8e7d6c"
    spec = spec_from_dict(sweep_doc(storage={"path": "/data/runs"}, name="lr-sweep"))
    base = sweep_tune.trial_base(spec)
    assert "tune" not in base and base["storage"]["path"] == "/data/runs/lr-sweep"
    t = sweep_tune.trial_spec(base, {"training.learning_rate": 3e-4, "method.lora.r": 16}, "trial-002")
    assert (t.name, t.training.learning_rate, t.method.lora.r, t.tune) == ("trial-002", 3e-4, 16, None)
    assert t.storage.path == "/data/runs/lr-sweep"
    s3 = spec_from_dict(sweep_doc(storage={"path": "s3://bucket/runs"}, name="lr-sweep"))
    assert sweep_tune.trial_base(s3)["storage"]["path"] == "s3://bucket/runs/lr-sweep"


def _results(rows):
    return results.SweepResults("lr-sweep", "eval_loss", "min", ["training.learning_rate", "method.lora.r"],
                              [results.TrialRow(*r) for r in rows], location="/runs/lr-sweep")


def test_results_csv_round_trips_and_the_best_excludes_diverged_and_unmeasured_trials():
    res = _results([
        ("trial-000", {"training.learning_rate": 1e-4, "method.lora.r": 8}, 2.5, 10, results.STATUS_COMPLETED, "/r/0"),
        ("trial-001", {"training.learning_rate": 9e-1, "method.lora.r": 8}, 1.0, 4, results.STATUS_COMPLETED, "/r/1",
         None, True),  # was finite once, then diverged: never the best
        ("trial-002", {"training.learning_rate": 3e-4, "method.lora.r": 16}, 2.25, 2, results.STATUS_STOPPED, "/r/2"),
        ("trial-003", {"training.learning_rate": 1e-3, "method.lora.r": 4}, None, None, results.STATUS_ERROR, "/r/3",
         "CUDA out of memory"),
    ])
    assert res.best.trial == "trial-002"
    text = results.results_csv(res)
    header = text.splitlines()[0]
    assert header == ("trial,training.learning_rate,method.lora.r,eval_loss,steps,status,stopped_early,error,run_dir")
    back = results.parse_results_csv(text, name="lr-sweep")
    assert [(r.trial, r.values, r.best, r.steps, r.status, r.stopped_early, r.diverged, r.error) for r in back.rows] == [
        (r.trial, r.values, r.best, r.steps, r.status, r.stopped_early, r.diverged, r.error) for r in res.rows]
    table = results.render_table(back)
    assert "trial-002                  0.0003             16          2.2500      2  stopped early" in table
    assert "completed, diverged" in table and "error: CUDA out of memory" in table
    assert table.splitlines()[-1] == "best: trial-002 (eval_loss 2.2500): training.learning_rate=0.0003 method.lora.r=16"


def test_best_spec_is_a_complete_spec_with_the_winning_values(tmp_path):
    spec = spec_from_dict(sweep_doc(name="lr-sweep", extends=None))
    res = _results([("trial-001", {"training.learning_rate": 3e-4, "method.lora.r": 16}, 2.0, 10,
                     results.STATUS_COMPLETED, "/r/1")])
    best = results.best_spec(spec, res)
    assert best.tune is None and best.name == "lr-sweep-best"
    assert (best.training.learning_rate, best.method.lora.r) == (3e-4, 16)
    assert best.model == spec.model and best.data == spec.data and best.storage == spec.storage
    path = tmp_path / "best.yaml"
    path.write_text(to_yaml(best))
    assert load_spec(path) == best
    assert results.best_name("x" * 63) == "x" * 58 + "-best"


def test_sweep_results_reads_results_csv_and_says_when_there_is_none(tmp_path, capsys):
    d = tmp_path / "runs" / "lr-sweep"
    d.mkdir(parents=True)
    res = _results([("trial-000", {"training.learning_rate": 1e-4, "method.lora.r": 8}, 2.5, 10,
                     results.STATUS_COMPLETED, str(d / "trial-000"))])
    (d / "results.csv").write_text(results.results_csv(res))
    (d / "best.yaml").write_text("name: x\n")
    with pytest.raises(SystemExit) as ei:
        main(["sweep", "results", "lr-sweep", "--storage", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert ei.value.code == 0
    assert "trial-000                  0.0001              8          2.5000     10  completed" in out
    assert f"best spec: {d / 'best.yaml'}" in out
    with pytest.raises(SystemExit) as ei:
        main(["sweep", "results", str(tmp_path / "runs" / "nope")])
    err = capsys.readouterr().err
    assert ei.value.code == 2 and "no results.csv in" in err and "Traceback" not in err


def test_scheduler_short_form_and_plain_words(tmp_path, capsys):
    """`scheduler: asha` means {type: asha}; pydantic's shape messages come out in a YAML user's words."""
    import yaml

    from raytune_ft.cli import main
    from raytune_ft.spec import spec_from_dict
    from tests.specs import base_doc

    doc = base_doc(training={"max_steps": 1000, "learning_rate": 1e-4, "precision": "fp32", "save_steps": 100},
                   tune={"space": {"training.learning_rate": {"loguniform": [1e-5, 1e-3]}}, "num_samples": 2,
                         "metric": "loss", "scheduler": "asha"})
    assert spec_from_dict(doc).tune.scheduler.type == "asha"
    assert spec_from_dict({**doc, "tune": {**doc["tune"], "scheduler": "fifo"}}).tune.scheduler.type == "fifo"
    bad = {**doc, "method": "lora", "tune": {**doc["tune"], "scheduler": "hyperband"}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(SystemExit) as ei:
        main(["validate", str(path)])
    err = capsys.readouterr().err
    assert ei.value.code == 2 and "Traceback" not in err
    assert "method: must be a mapping of keys (key: value lines, or {key: value}) (got 'lora')" in err
    assert "tune.scheduler: type must be one of asha, fifo (got hyperband)" in err
    assert "valid dictionary" not in err
