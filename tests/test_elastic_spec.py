"""Elastic workers (issue 13 item 2) before anything runs: `compute.num_workers: {min, max}` is the range, the
global batch (per device × accumulation × max) must split into a whole accumulation at every count in it,
what cannot move between counts is refused at its field, and the plan and the trainer's arguments use the
accumulation of the count at hand. The run itself (a node lost, training on with one worker) is
tests/test_multinode.py, with the example-id log."""

from __future__ import annotations

import pytest

from raytune_ft.launch.trainer import scaling_config
from raytune_ft.plan import make_plan
from raytune_ft.render_plan import render_plan
from raytune_ft.spec import dump_spec, spec_from_dict
from raytune_ft.train.recipe import training_arguments
from tests.specs import base_doc
from tests.test_spec_all_at_once import fields, validate


def doc(workers, **training) -> dict:
    d = base_doc()
    d["training"].update(per_device_train_batch_size=2, **training)
    d["compute"] = {"num_workers": workers}
    return d


def test_a_range_is_max_workers_with_a_minimum_and_keeps_the_global_batch(tmp_path):
    spec = spec_from_dict(doc({"min": 2, "max": 4}, gradient_accumulation_steps=3))
    c = spec.compute
    assert (c.num_workers, c.min_workers, c.elastic, list(c.worker_counts)) == (4, 2, True, [2, 3, 4])
    assert {w: spec.accumulation_for(w) for w in c.worker_counts} == {2: 6, 3: 4, 4: 3}  # 24 rows a step
    assert spec_from_dict(dump_spec(spec)).compute == c  # the dump (num_workers, min_workers) reads back
    plan = make_plan(spec)
    assert plan.global_batch_size == 24 and plan.min_workers == 2
    assert scaling_config(plan).num_workers == (2, 4)
    assert ("scaling:      2-4 workers (elastic; gradient accumulation by worker count 2: 6, 3: 4, 4: 3, so the "
            "global batch stays the same)") in render_plan(plan)
    for w, acc in ((2, 6), (3, 4), (4, 3)):
        args = training_arguments(spec, str(tmp_path / f"o{w}"), None, use_cpu=True, world_size=w)
        assert args.gradient_accumulation_steps == acc
    fixed = spec_from_dict(doc(4))
    assert (fixed.compute.elastic, fixed.accumulation_for(2), make_plan(fixed).min_workers) == (False, 1, None)
    assert scaling_config(make_plan(fixed)).num_workers == 4
    same = spec_from_dict(doc({"min": 3, "max": 3}))  # a range of one count is a fixed count
    assert not same.compute.elastic and scaling_config(make_plan(same)).num_workers == 3


@pytest.mark.parametrize("workers, extra, where, says", [
    ({"min": 1, "max": 3}, {}, "compute.num_workers",
     "the range {min: 1, max: 3}: the global batch (2 per worker × accumulation 1 × 3 workers) does not split "
     "evenly over 2 worker(s), so the batch would change when workers are lost: use gradient_accumulation_steps 2"),
    ({"min": 2, "max": 4}, {}, "compute.num_workers", "does not split evenly over 3 worker(s)"),
    ({"min": 1, "max": 3}, {"data": {"packing": True, "max_seq_length": 128}, "training": {"tokens_per_step": 768}},
     "compute.num_workers", "over 2 worker(s), so the batch would change when workers are lost: use "
     "training.tokens_per_step 1,536 (or a multiple of it)"),
    ({"min": 1, "max": 2}, {"deepspeed": {"stage": 2}}, "compute.num_workers",
     "DeepSpeed's checkpoint is written for one worker count"),
    ({"min": 1, "max": 2}, {"training": {"group_by_length": True}}, "compute.num_workers",
     "training.group_by_length orders rows"),
    ({"min": 1}, {}, "compute.num_workers", "needs both min and max, as {min: M, max: N}"),
    ({"low": 1, "max": 2}, {}, "compute.num_workers", "unknown key(s) low"),
    ({"min": 3, "max": 2}, {}, "compute", "compute.min_workers 3 is more than num_workers 2"),
])
def test_what_would_change_the_batch_or_cannot_resume_is_refused_at_its_field(tmp_path, capsys, workers, extra,
                                                                             where, says):
    d = doc(workers)
    for k, v in extra.items():
        d[k] = {**d.get(k, {}), **v}
    code, lines = validate(tmp_path, d, capsys)
    assert code == 2
    assert says in fields(lines)[where], lines


def test_the_example_log_is_for_sft(tmp_path, capsys):
    d = base_doc()
    d["monitoring"] = {"log_examples": True}
    assert spec_from_dict(d).monitoring.log_examples
    d["method"] = {**d.get("method", {}), "objective": "regression"}
    code, lines = validate(tmp_path, d, capsys)
    assert code == 2 and "monitoring.log_examples follows the rows of the SFT collator" in "\n".join(lines), lines


def test_an_elastic_training_set_is_cut_to_whole_global_batches():
    """A partial last global batch would be split (or padded with repeated rows) differently at each worker
    count: an elastic run trains whole global batches only, and says what it left out; fewer rows than one
    global batch is the user's to fix (exit 2)."""
    from raytune_ft.errors import UserError
    from raytune_ft.train.recipe import whole_global_batches

    spec = spec_from_dict(doc({"min": 1, "max": 2}, gradient_accumulation_steps=3))  # 2 × 3 × 2 = 12 rows a step
    said: list[str] = []
    kept = whole_global_batches(spec, list(range(64)), said.append)
    assert kept == list(range(60))
    assert said == ["data: elastic workers: 60 of 64 rows trained per epoch (whole global batches of 12); the last "
                    "4 rows of the prepared training set are left out"]
    said.clear()
    assert whole_global_batches(spec, list(range(24)), said.append) == list(range(24)) and not said
    with pytest.raises(UserError, match="the training set has 11 rows, fewer than one global batch of 12"):
        whole_global_batches(spec, list(range(11)), said.append)
