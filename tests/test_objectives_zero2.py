"""Every objective on 2 real Ray Train workers with DeepSpeed ZeRO-2 (and DPO, ORPO under ZeRO-3; gloo on CPU),
interrupted and resumed:
run A trains 4 steps and saves at step 2 and 4; run B is a new trainer that resumes from A's step-2 checkpoint
(what a run interrupted after it finds) and trains to step 4. B must end at A's parameters (within 1e-4, fp32)
and log A's losses for steps 3-4. The objective's own state goes through the checkpoint: the regression and
reward heads, TRL's DPO (with its frozen reference copy under full fine-tuning) and ORPO trainers. The full
reward model A saves loads as transformers' `AutoModelForSequenceClassification` and scores as in memory.

One worker group runs all seven cases, built from the recipe's own pieces (the objective's datasets, model,
head, TrainingArguments with rtf's DeepSpeed config, and trainer) as `recipe._run` does, because a worker group
costs about 30 s to start on a 2-core machine and fourteen `rtf submit`s would cost seven minutes of CI. The whole
`rtf submit` path under ZeRO-2 on 2 workers (committed checkpoints, manifests, the final head) is run by
tests/test_objectives_ray.py (regression) and tests/test_train_ray.py (sft, ZeRO-2 and -3 against DDP)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.objective_data import preference_rows, scored_rows, write_jsonl
from tests.tiny import spec_doc

pytestmark = pytest.mark.ray

MAX_STEPS, SAVE = 4, 2


def _train(spec, out: str, resume: str | None):
    """One trainer of the spec on this worker, as recipe._run builds it; returns it after training."""
    import copy

    import torch
    from transformers import AutoTokenizer

    from raytune_ft.data.pipeline import build_datasets
    from raytune_ft.plan import deepspeed_config
    from raytune_ft.train import objectives as ob
    from raytune_ft.train.modeling import apply_method, build_model
    from raytune_ft.train.recipe import training_arguments

    try:  # a fresh accelerate state per trainer: each builds its own DeepSpeed engine in this process
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
    except ImportError:
        pass
    tok = AutoTokenizer.from_pretrained(spec.model.name_or_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    train, evals, _ = build_datasets(spec.data, tok, seed=spec.training.seed)
    train, evals, scale = ob.prepare_datasets(spec, tok, train, evals)
    model, _ = build_model(spec, tok, device=torch.device("cpu"), seed=spec.training.seed)
    model = ob.attach_head(model, spec)
    model = apply_method(model, spec, wrap=not ob.wraps_adapter_itself(spec))
    cls, extra = ob.argument_class(spec)
    args = training_arguments(spec, out, copy.deepcopy(deepspeed_config(spec)), use_cpu=True, cls=cls, **extra)
    args.ddp_find_unused_parameters = False
    collator = None
    if spec.method.objective == "sft":
        from raytune_ft.data.packing import PaddedCollator

        collator = PaddedCollator(tok.pad_token_id)
    from transformers import TrainerCallback

    class Logged(TrainerCallback):  # the losses this trainer logged itself (a resumed one's state has earlier ones)
        def __init__(self):
            self.losses = {}

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses[state.global_step] = float(logs["loss"])

    logged = Logged()
    trainer = ob.make_trainer(spec, model=model, args=args, train_ds=train, eval_ds=None, tokenizer=tok,
                              callbacks=[logged], scale=scale, collator=collator)
    trainer.logged = logged.losses
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train(resume_from_checkpoint=resume)
    return trainer, before


def _params(trainer) -> dict:
    """The model's full parameters on every rank (under ZeRO-3 gathered from the ranks' partitions)."""
    import contextlib

    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    gather = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(model.parameters()))
    with gather:
        return {k: v.detach().clone() for k, v in model.named_parameters()}


def _each_objective(config: dict) -> None:
    """The worker function: for each case, run A then run B, and (rank 0) write what they reached."""
    import ray.train
    import torch

    from raytune_ft.spec import spec_from_dict

    rank = ray.train.get_context().get_world_rank()
    results = {}
    for name, doc in config["cases"].items():
        spec = spec_from_dict(doc)
        root = Path(config["root"]) / name
        a, init = _train(spec, str(root / "a"), None)
        pa, la = _params(a), a.logged
        saved = None
        if spec.method.objective == "reward":  # its final model, as `rtf submit` saves a full fine-tune's
            a.save_model(str(root / "final"))
            model = a.accelerator.unwrap_model(a.model_wrapped).eval()
            with torch.no_grad():
                saved = model(input_ids=torch.tensor([config["probe"]])).logits[0].tolist()
        del a
        b, _ = _train(spec, str(root / "b"), str(root / "a" / f"checkpoint-{SAVE}"))
        pb, lb = _params(b), b.logged
        del b
        if rank == 0:
            trained = [k for k in pa if not torch.equal(pa[k], init[k])]
            results[name] = {
                "keys_equal": sorted(pa) == sorted(pb),
                "max_abs_diff": max(float((pa[k] - pb[k]).abs().max()) for k in pa),
                "trained": trained,
                "moved": max(float((pa[k] - init[k]).abs().max()) for k in trained) if trained else 0.0,
                "losses_a": la, "losses_b": lb,
                "zero_files": sorted(p.name for p in (root / "a" / f"checkpoint-{SAVE}").rglob("*zero_pp_rank*")),
                "in_memory_score": saved,
            }
        torch.distributed.barrier()
    if rank == 0:
        Path(config["root"], "results.json").write_text(json.dumps(results))


CASES = {  # name: (objective, method, data format, ZeRO stage)
    "sft": ("sft", {"type": "full"}, "alpaca", 2),
    "regression": ("regression", {"type": "lora", "head": {"depth": 2, "width": 32, "dropout": 0.0}}, "scored", 2),
    "reward": ("reward", {"type": "full"}, "preference", 2),
    "dpo": ("dpo", {"type": "full", "dpo": {"beta": 0.5}}, "preference", 2),  # a frozen reference copy
    "orpo": ("orpo", {"type": "lora", "dpo": {"beta": 0.5}}, "preference", 2),
    # ZeRO-3 partitions the parameters (the heads' objectives refuse it): DPO's reference becomes TRL's own
    # DeepSpeed engine
    "dpo-zero3": ("dpo", {"type": "full", "dpo": {"beta": 0.5}}, "preference", 3),
    "orpo-zero3": ("orpo", {"type": "lora", "dpo": {"beta": 0.5}}, "preference", 3),
}


def case_doc(name: str, tiny, tmp_path: Path) -> dict:
    sft_train, _, model_dir = tiny
    objective, method, fmt, stage = CASES[name]
    if fmt == "alpaca":
        train = sft_train
    else:
        rows = scored_rows(32, seed=1) if fmt == "scored" else preference_rows(32, seed=1)
        train = write_jsonl(tmp_path / "data" / f"{objective}.jsonl", rows)
    lora = {"r": 4, "alpha": 8, "dropout": 0.0} if method["type"] == "lora" else None
    doc = spec_doc(f"z-{name}", model_dir, train, None, tmp_path / "runs",
                   method={"lora": lora, **method, "objective": objective},
                   compute={"num_workers": 2, "cpus_per_worker": 1}, deepspeed={"stage": stage},
                   training={"max_steps": MAX_STEPS, "save_steps": SAVE, "per_device_train_batch_size": 4,
                             "learning_rate": 1e-3, "lr_scheduler_type": "cosine", "warmup_steps": 1})
    doc["data"]["train"]["format"] = fmt
    return doc


@pytest.mark.timeout(600)
def test_every_objective_resumes_under_zero2_on_two_workers_to_the_same_parameters(ray_local, tiny, tmp_path):
    import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raytune_ft.spec import spec_from_dict

    cases = {name: case_doc(name, tiny, tmp_path) for name in CASES}
    for doc in cases.values():
        spec_from_dict(doc)  # each is a valid rtf spec (ZeRO-2, 2 workers) before the workers see it
    import sys

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers need not import tests/
    try:
        probe = [1, 17, 42, 99, 5]
        TorchTrainer(_each_objective, train_loop_config={"cases": cases, "root": str(tmp_path / "out"), "probe": probe},
                     scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                     run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="zero2")).fit()
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted(results) == sorted(CASES)
    for name, r in results.items():
        assert r["keys_equal"], name
        # both ranks' ZeRO-2 optimizer partitions are in the checkpoint B resumed from
        assert any("zero_pp_rank_0" in f for f in r["zero_files"]) and any("zero_pp_rank_1" in f for f in
                                                                          r["zero_files"]), (name, r["zero_files"])
        if CASES[name][3] == 3:  # the parameters themselves were partitioned over the two ranks
            assert any(f.startswith("zero_pp_rank_1") and "model_states" in f for f in r["zero_files"]), r["zero_files"]
        assert r["trained"] and r["moved"] > 1e-4, (name, r)  # training moved the parameters compared below
        assert r["max_abs_diff"] <= 1e-4, (name, r)
        la, lb = r["losses_a"], r["losses_b"]
        assert sorted(la, key=int) == [str(s) for s in range(1, MAX_STEPS + 1)], (name, la)
        assert sorted(lb, key=int) == [str(s) for s in range(SAVE + 1, MAX_STEPS + 1)], (name, lb)  # resumed
        for step in lb:
            assert lb[step] == pytest.approx(la[step], abs=1e-5), (name, step, la, lb)
        print(f"{name}: resumed at step {SAVE} to step {MAX_STEPS}: max |A - B| {r['max_abs_diff']:.2e} over "
              f"{len(r['trained'])} trained tensors (moved up to {r['moved']:.2e}); losses 3-4 "
              f"{[round(la[s], 5) for s in lb]} both times")
    # the objective's own trained parts are among the parameters compared
    assert any("score" in k for k in results["regression"]["trained"])
    assert any("score" in k for k in results["reward"]["trained"])
    assert any("lora_" in k for k in results["orpo"]["trained"])
    # a full fine-tune's reward model loads as transformers' sequence classifier with one label, scoring as in memory
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "reward" / "final").eval()
    assert rm.config.num_labels == 1
    import torch

    with torch.no_grad():
        again = rm(input_ids=torch.tensor([probe])).logits[0].tolist()
    assert again == pytest.approx(results["reward"]["in_memory_score"], abs=1e-5)
