"""training.tokens_per_step (issue 17 item 6): packed and unpacked runs set to the same work per optimizer step.

With packing every row is data.max_seq_length tokens, so a number of tokens per step is a number of rows per
step: the accumulation is derived from it for the run's worker count, and the plan, the fit proposals and the
trainer's arguments all use the derived value."""

from __future__ import annotations

import pytest
import yaml

from raytune_ft import estimate as E
from raytune_ft.plan import make_plan
from raytune_ft.render_plan import render_plan
from raytune_ft.spec import spec_from_dict
from raytune_ft.train.recipe import training_arguments
from tests.specs import base_doc
from tests.test_spec_all_at_once import fields, validate


def doc(tokens_per_step: int | None = 4096, *, packing: bool = True, workers: int = 1, **training) -> dict:
    d = base_doc()
    d["data"].update(max_seq_length=128, packing=packing)
    d["training"].update(per_device_train_batch_size=4, **training)
    if tokens_per_step is not None:
        d["training"]["tokens_per_step"] = tokens_per_step
    d["compute"] = {"num_workers": workers}
    return d


def test_the_accumulation_follows_from_the_tokens_and_the_worker_count(tmp_path):
    one = spec_from_dict(doc(4096))  # 4096 / (128 × 4 × 1) = 8 micro-batches per step
    assert one.accumulation_steps == 8
    plan = make_plan(one)
    assert (plan.global_batch_size, plan.tokens_per_step) == (32, 4096)
    assert "4,096 tokens (at max_seq_length); training.tokens_per_step: gradient accumulation 8" in render_plan(plan)
    args = training_arguments(one, str(tmp_path / "out"), None, use_cpu=True)
    assert args.gradient_accumulation_steps == 8
    two = spec_from_dict(doc(4096, workers=2))  # the same work per step on twice the workers
    assert two.accumulation_steps == 4 and make_plan(two).tokens_per_step == 4096
    assert spec_from_dict(doc(None, gradient_accumulation_steps=3)).accumulation_steps == 3  # unset: as given


@pytest.mark.parametrize("d, where, says", [
    (doc(4096, packing=False), "training.tokens_per_step", "needs data.packing: true"),
    (doc(4096, gradient_accumulation_steps=2), "training.tokens_per_step", "not both"),
    (doc(5000), "training.tokens_per_step",
     "5,000 is not a whole number of micro-batches of 512 tokens (data.max_seq_length 128 × "
     "per_device_train_batch_size 4 × compute.num_workers 1): use 4,608 or 5,120"),
    (doc(256), "training.tokens_per_step", "use 512"),
])
def test_what_cannot_be_a_number_of_rows_is_refused_at_its_field(tmp_path, capsys, d, where, says):
    code, lines = validate(tmp_path, d, capsys)
    assert code == 2
    assert says in fields(lines)[where], lines


def test_fit_proposals_keep_the_tokens_per_step():
    d = base_doc(model={"name_or_path": "meta-llama/Llama-3.1-8B"}, method={"type": "lora", "lora": {"r": 16}})
    d["data"].update(max_seq_length=8192, packing=True)
    d["training"] = {"max_steps": 100, "per_device_train_batch_size": 16, "tokens_per_step": 8192 * 16 * 4 * 4,
                     "learning_rate": 1e-4, "precision": "bf16"}
    d["compute"] = {"num_workers": 4, "gpus_per_worker": 1, "accelerator_type": "A100-80G"}
    big = spec_from_dict(d)
    sets, summary = E.fit(big)
    assert summary.startswith("does not fit") and sets
    assert not any(s.startswith("training.gradient_accumulation_steps=") for s in sets), sets
    fixed = E._apply(big, {k: yaml.safe_load(v) for k, v in (x.split("=", 1) for x in sets)})
    assert make_plan(fixed).tokens_per_step == make_plan(big).tokens_per_step  # the same work per step
    assert fixed.training.per_device_train_batch_size < 16
