"""method.objective: each objective's sections, the data formats it reads, the metrics it reports; ppo/grpo
refused with the reason."""

from __future__ import annotations

import pytest
import yaml

from raytune_ft.errors import SpecError
from raytune_ft.spec import load_spec, spec_from_dict, to_yaml
from tests.specs import base_doc


def problems(tmp_path, doc) -> list[str]:
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(doc))
    with pytest.raises(SpecError) as ei:
        load_spec(p)
    return ei.value.problems


def doc_for(objective: str, fmt: str, **method) -> dict:
    doc = base_doc()
    doc["method"].update(objective=objective, **method)
    doc["data"]["train"]["format"] = fmt
    return doc


def test_sft_is_the_default_and_the_new_objectives_validate():
    assert spec_from_dict(base_doc()).method.objective == "sft"
    reg = spec_from_dict(doc_for("regression", "scored", head={"depth": 3, "width": 32, "dropout": 0.0,
                                                                "loss": "huber"}))
    assert (reg.method.head.depth, reg.method.head.width, reg.method.head.loss) == (3, 32, "huber")
    dpo = spec_from_dict(doc_for("dpo", "preference", dpo={"beta": 0.2, "loss_type": "ipo"}))
    assert (dpo.method.dpo.beta, dpo.method.dpo.loss_type) == (0.2, "ipo")
    assert spec_from_dict(doc_for("reward", "preference")).method.objective == "reward"
    assert spec_from_dict(doc_for("orpo", "preference", dpo={"beta": 0.5})).method.dpo.beta == 0.5


@pytest.mark.parametrize("name", ["ppo", "grpo"])
def test_ppo_and_grpo_are_refused_with_the_reason(tmp_path, name):
    p = tmp_path / "s.yaml"
    doc = yaml.safe_dump(base_doc())
    p.write_text(doc.replace("method:\n", f"method:\n  objective: {name}\n"))
    with pytest.raises(SpecError) as ei:
        load_spec(p)
    [msg] = ei.value.problems
    line = p.read_text().splitlines().index(f"  objective: {name}") + 1
    assert msg.startswith(f"{p}:{line} method.objective: {name} is not supported"), msg
    assert "generation engine" in msg and "in the training loop" in msg


@pytest.mark.parametrize(
    "doc, needle",
    [
        (doc_for("regression", "alpaca"),
         "method.objective regression reads scored data, but data.train[0].format is alpaca"),
        (doc_for("dpo", "scored"), "method.objective dpo reads preference data, but data.train[0].format is scored"),
        (doc_for("sft", "preference"),
         "method.objective sft reads alpaca or chat or text data, but data.train[0].format is preference; "
         "set data.train[0].format: alpaca or method.objective: dpo"),
        (doc_for("sft", "alpaca", head={"depth": 2}), "method.head configures the regression head"),
        (doc_for("reward", "preference", dpo={"beta": 0.1}), "method.dpo is for objective dpo or orpo"),
        (doc_for("orpo", "preference", dpo={"loss_type": "hinge"}), "ORPO has one loss"),
        ({**doc_for("reward", "preference"), "data": {"train": {"path": "t", "format": "preference"},
                                                       "max_seq_length": 64, "packing": True}},
         "remove data.packing"),
        ({**doc_for("regression", "scored"), "deepspeed": {"stage": 3}}, "use stage 2"),
    ],
)
def test_objective_and_data_format_must_agree(tmp_path, doc, needle):
    msgs = problems(tmp_path, doc)
    assert any(needle in m for m in msgs), msgs


def test_eval_source_format_is_checked_too(tmp_path):
    doc = doc_for("regression", "scored")
    doc["data"]["eval"] = {"path": "e.jsonl", "format": "text"}
    [msg] = problems(tmp_path, doc)
    assert "data.eval[0].format is text" in msg


def test_metrics_follow_the_objective(tmp_path):
    doc = doc_for("regression", "scored")
    doc["data"]["eval_split"] = 0.2
    doc["training"].update(eval_strategy="steps", eval_steps=5, load_best_model_at_end=True, save_steps=10,
                           metric_for_best_model="r2", greater_is_better=True)
    spec = spec_from_dict(doc)
    assert spec.training.metric_for_best_model == "eval_r2"
    doc["method"]["objective"], doc["data"]["train"]["format"] = "sft", "alpaca"
    assert any("eval_r2 is not reported by objective sft" in m for m in problems(tmp_path, doc))


def with_eval(doc):
    doc["data"]["eval_split"] = 0.2
    doc["training"].update(eval_strategy="steps", eval_steps=5)
    return doc


def test_sweep_metric_mode_follows_the_metric(tmp_path):
    doc = with_eval(doc_for("regression", "scored"))
    doc["tune"] = {"space": {"training.learning_rate": {"choice": [1e-4, 1e-3]}}, "num_samples": 2,
                   "metric": "eval_r2", "mode": "max"}
    assert spec_from_dict(doc).tune.metric == "eval_r2"
    doc["tune"]["mode"] = "min"
    assert any("eval_r2 is better when higher: set tune.mode: max" in m for m in problems(tmp_path, doc))
    doc["tune"].update(metric="eval_accuracy", mode="max")
    assert any("eval_accuracy is not reported by objective regression" in m for m in problems(tmp_path, doc))
    doc = with_eval(doc_for("reward", "preference"))
    doc["tune"] = {"space": {"training.learning_rate": {"grid": [1e-4, 1e-3]}}, "metric": "eval_accuracy",
                   "mode": "max"}
    assert spec_from_dict(doc).tune.mode == "max"


def test_sweep_reports_and_results_carry_the_objective_metric():
    from raytune_ft.sweep.results import parse_results_csv
    from raytune_ft.sweep.tune import to_tune_result

    r = to_tune_result({"step": 8, "eval_loss": 0.1, "eval_r2": 0.93}, "eval_r2", False)
    assert r["eval_r2"] == 0.93 and r["final"] is False and r["diverged"] is False
    # a checkpoint report repeats the last eval: not a fresh eval_r2
    assert to_tune_result({"step": 8, "loss": 0.1, "eval_r2": 0.93}, "eval_r2", True) is None
    assert to_tune_result({"step": 16, "eval_accuracy": 0.97, "done": True}, "eval_accuracy", True)["final"]
    res = parse_results_csv("trial,training.learning_rate,eval_r2,steps,status,stopped_early,error,run_dir\n"
                            "t1,0.001,0.91,16,TERMINATED,false,,/r/t1\n")
    assert res.metric == "eval_r2" and res.paths == ["training.learning_rate"]


def test_sft_specs_dump_and_hash_as_before_and_objectives_round_trip():
    from raytune_ft.spec import dump_spec, spec_hash

    sft = spec_from_dict(base_doc())
    assert "objective" not in dump_spec(sft)["method"]  # existing runs and sweeps keep their identity
    reg = spec_from_dict(doc_for("regression", "scored", head={"depth": 3}))
    again = spec_from_dict(dump_spec(reg))
    assert again == reg and spec_hash(again) == spec_hash(reg) != spec_hash(sft)
    # every objective's spec, as a run stores it (dumped whole, defaults named), reads back the same: `rtf eval`,
    # `generate` and `score` read the stored one (ORPO's stored spec was refused for naming DPO's default loss)
    for objective, fmt, extra in (("reward", "preference", {}), ("dpo", "preference", {"dpo": {"beta": 0.2}}),
                                  ("orpo", "preference", {"dpo": {"beta": 0.2}}), ("orpo", "preference", {})):
        spec = spec_from_dict(doc_for(objective, fmt, **extra))
        stored = yaml.safe_load(to_yaml(spec))
        assert spec_from_dict(stored) == spec, objective
