"""The worker recipe: what each Ray Train worker runs, top to bottom.

    setup   → storage, tokenizer, data, model (+ LoRA/QLoRA), TrainingArguments, resume point
    train   → HF Trainer.train(), reporting to Ray and committing checkpoints as it goes
    save    → final/ (adapter or model, tokenizer, trainer_state, final_results.json, spec)
    cleanup → local scratch removed

``train_loop`` is the function handed to ``TorchTrainer``; its config is the driver's
:class:`~raytune_ft.train.config.WorkerConfig`: the plan (the resolved spec as plain data, env var names
only, never secret values), an explicit resume point, and how to report.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from raytune_ft import checkpoints as ck
from raytune_ft import rundir as rd
from raytune_ft import storage as st
from raytune_ft.errors import UserError
from raytune_ft.rundir import RunDir
from raytune_ft.spec import spec_hash, to_yaml
from raytune_ft.spec.models import JobSpec
from raytune_ft.train.attention import NAME as PACKED_SDPA
from raytune_ft.train.callbacks import (
    AtMaxSteps,
    PrintOnRankZero,
    RtfCallback,
    StopAtMaxSteps,
    barrier,
    gather,
)
from raytune_ft.train.config import WORKER_ENV, WorkerConfig, tell_in_process
from raytune_ft.train.env import apply_env, env_report
from raytune_ft.train.modeling import apply_method, build_model, count_parameters, hf_token
from raytune_ft.train.progress import Publisher
from raytune_ft.train.trackers import finish_trackers, setup_trackers

log = logging.getLogger("raytune_ft")


@dataclass
class RunContext:
    spec: JobSpec
    rank: int
    world_size: int
    local_rank: int
    dir: RunDir


def _context(spec: JobSpec, in_process: bool = False) -> RunContext:
    if in_process:  # Ray Train's local mode: one worker, this process (ray.train's API refuses a Tune trial's)
        return RunContext(spec, 0, 1, 0, RunDir.of(spec))
    import ray.train

    ctx = ray.train.get_context()
    return RunContext(spec, ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(), RunDir.of(spec))


def _device(run: RunContext, in_process: bool = False) -> torch.device:
    if run.spec.compute.use_gpu and torch.cuda.is_available():
        import ray.train.torch

        if in_process:  # the driver holds no GPU of Ray's: get_device() would not name one
            return torch.device("cuda", torch.cuda.current_device())

        return ray.train.torch.get_device()
    return torch.device("cpu")


# --------------------------------------------------------------------------- setup


def setup_tokenizer(run: RunContext, work: str) -> Any:
    """Pretrained, or trained once on the training data by rank 0 and shared through storage
    (so every worker, and every resumed attempt, uses the identical vocabulary)."""
    from transformers import AutoTokenizer

    spec = run.spec
    if spec.tokenizer.train is None:
        src = spec.tokenizer.name_or_path or spec.model.name_or_path
        tok = AutoTokenizer.from_pretrained(src, revision=spec.model.revision if not spec.tokenizer.name_or_path else None,
                                            trust_remote_code=spec.model.trust_remote_code, token=hf_token())
    else:
        remote = run.dir.tokenizer_dir
        local = os.path.join(work, rd.TOKENIZER)
        if run.rank == 0 and not st.exists(run.dir.fs, st.fs_join(remote, "tokenizer.json")):
            from raytune_ft.data.pipeline import training_texts
            from raytune_ft.data.tokenizer import train_tokenizer

            t0 = time.time()
            tr = spec.tokenizer.train
            tok = train_tokenizer(training_texts(spec.data, filesystem_for=partial(st.open, storage=spec.storage)),
                                  tr.vocab_size, min_frequency=tr.min_frequency)
            tok.save_pretrained(local)
            st.upload_dir(local, run.dir.fs, remote)
            log.info("trained a BPE tokenizer (%d tokens) in %.1fs", len(tok), time.time() - t0)
        barrier()
        st.download_dir(run.dir.fs, remote, local)
        tok = AutoTokenizer.from_pretrained(local)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def training_arguments(spec: JobSpec, out_dir: str, deepspeed: dict | None, use_cpu: bool, cls: Any = None,
                       world_size: int | None = None, **extra: Any) -> Any:
    """HF's ``TrainingArguments`` of the spec; ``cls`` and ``extra``: a TRL trainer's config class and its own
    options (:func:`raytune_ft.train.objectives.argument_class`); ``world_size``: the workers this attempt has
    (elastic workers: the accumulation that keeps the global batch)."""
    from transformers import TrainingArguments

    cls = cls or TrainingArguments
    t = spec.training
    has_eval = spec.data.has_eval and t.eval_strategy != "no"
    report = [r for r in spec.monitoring.report_to if r in ("wandb", "mlflow") and _installed(r)]
    warmup: float | int = t.warmup_steps or t.warmup_ratio
    return cls(
        output_dir=out_dir,
        num_train_epochs=t.num_epochs or 1.0,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        # training.tokens_per_step sets it; elastic workers recompute it for this attempt's worker count
        gradient_accumulation_steps=spec.accumulation_for(world_size or spec.compute.num_workers),
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=warmup,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        tf32=t.tf32,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy=t.eval_strategy if has_eval else "no",
        eval_steps=t.eval_steps if has_eval else None,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=2,
        load_best_model_at_end=t.load_best_model_at_end,
        metric_for_best_model=t.metric_for_best_model,
        greater_is_better=t.greater_is_better,
        seed=t.seed,
        data_seed=t.data_seed,
        dataloader_num_workers=t.dataloader_num_workers,
        dataloader_pin_memory=not use_cpu,  # page-locked host memory only helps copies to a GPU
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        report_to=report or "none",
        disable_tqdm=True,
        use_cpu=use_cpu,
        ddp_backend="gloo" if use_cpu and torch.distributed.is_initialized() else None,
        deepspeed=deepspeed,
        use_liger_kernel=t.liger_kernel,
        **extra,
    )


def has_experts(model: Any) -> bool:
    """Whether the model routes tokens to experts (MoE): some of its parameters may get no gradient in a step."""
    cfg = getattr(model, "config", None)
    keys = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
    return any((getattr(cfg, k, None) or 0) > 1 for k in keys)


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def find_resume_point(run: RunContext, explicit: str | None, started: float | None = None) -> ck.CheckpointInfo | None:
    """The checkpoint to resume from: ``explicit`` (``--resume-from``) if given, unless this run committed one
    of its own since ``started`` (the submission's start: Ray Train restarted the workers after a failure, and
    they go on from what they committed, not from the --resume-from point again); else the latest *committed*
    checkpoint of this run (never one without a valid manifest), else None."""
    if explicit and started is not None:
        own = [i for i in ck.list_checkpoints(run.dir.fs, run.dir.path)
               if i.committed and i.time is not None and i.time.timestamp() >= started]
        if own:
            return own[-1]
    if explicit:
        fs, path = st.open(explicit, storage=run.spec.storage)
        info = ck.inspect_checkpoint(fs, path)
        if not info.committed:
            raise RuntimeError(f"--resume-from {explicit}: not a committed checkpoint ({info.reason})")
        return info
    return ck.latest_committed(run.dir.fs, run.dir.path)


PULL_ATTEMPTS = 3


def pull_to_resume(fs: Any, path: str, dest: str) -> ck.PullResult:
    """Download the checkpoint to resume from (every file checked by size and sha256 as it streams). A download
    cut off midway (a connection lost after pyarrow's own retries of each request: an OSError) is continued
    where it stopped, up to PULL_ATTEMPTS times, instead of failing the attempt and making a restarted worker
    group fetch all of it again. Across attempts nothing is kept: ``dest`` is in the attempt's work dir."""
    for attempt in range(1, PULL_ATTEMPTS + 1):
        try:
            return ck.pull(fs, path, dest)
        except OSError as e:  # a file that does not match its manifest is a StorageError: not retried
            if attempt == PULL_ATTEMPTS:
                raise
            log.warning("download of %s broken (%s); continuing it (try %d of %d)", path,
                        st.scrub(str(e).splitlines()[0] if str(e) else type(e).__name__), attempt + 1, PULL_ATTEMPTS)
    raise AssertionError("unreachable")


def whole_global_batches(spec: JobSpec, rows: list[Any], info: Any) -> list[Any]:
    """Elastic workers: the training rows cut to a whole number of global batches, so that an epoch is the same
    steps over the same rows at every worker count (a partial last batch is split over the ranks differently,
    or padded by repeating rows, depending on the count; a resume at another count would then skip or repeat
    rows). The gap it fills: HF's ``dataloader_drop_last`` drops a partial per-device batch only."""
    per = spec.training.per_device_train_batch_size * spec.accumulation_steps * spec.compute.num_workers
    keep = len(rows) // per * per
    if keep == 0:
        raise UserError(f"the training set has {len(rows)} rows, fewer than one global batch of {per} "
                        "(per_device_train_batch_size × accumulation × compute.num_workers)",
                        hint="add rows, or lower the batch")
    if keep < len(rows):
        info(f"data: elastic workers: {keep} of {len(rows)} rows trained per epoch (whole global batches of "
             f"{per}); the last {len(rows) - keep} rows of the prepared training set are left out")
    return rows[:keep]


def restore_metrics(run: RunContext, work: str, upto_step: int | None) -> None:
    """Carry the run's metrics.jsonl on (rank 0), dropping lines logged after the resume point."""
    data = st.read_bytes(run.dir.fs, run.dir.metrics_file)
    if not data:
        return
    keep = []
    for line in data.decode().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if upto_step is not None and rec.get("step", 0) <= upto_step:
            keep.append(line)
    with open(os.path.join(work, rd.METRICS), "w") as f:
        f.write("".join(x + "\n" for x in keep))


# --------------------------------------------------------------------------- the loop


def train_loop(config: WorkerConfig) -> None:
    """Entry point of every Ray Train worker."""
    spec = config.job_spec()
    if config.in_process:
        in_process_setup(spec)
    else:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    apply_env(spec)  # first: literal env values, and forwarded secrets (Ray Jobs: sealed)
    run = _context(spec, config.in_process)
    work = tempfile.mkdtemp(prefix=f"rtf-{spec.name}-r{run.rank}-")
    publisher = Publisher(config.progress_board if run.rank == 0 else None)
    try:
        _run(spec, run, work, publisher, config)
    except Exception as e:
        # say why this worker stops before Ray Train restarts the group (or gives up): the driver turns it into
        # one line with the attempt count (a restart alone shows only the setup lines again)
        text = str(e).strip()
        Publisher(config.progress_board).push({"kind": "worker_failed", "rank": run.rank, "error": st.scrub(
            (text.splitlines()[0] if text else type(e).__name__)[:500], spec.storage)})
        raise
    finally:
        finish_trackers()  # W&B/MLflow runs ended (HF's callbacks leave W&B open)
        shutil.rmtree(work, ignore_errors=True)
        if config.in_process:  # this process goes on (the driver, a reused sweep trial): the model let go now,
            gc.collect()       # its GPU memory too (the Trainer's reference cycles would keep it to the next run)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def in_process_setup(spec: JobSpec) -> None:
    """What a Ray worker process would have had, for a run in the driver's process (Ray Train's local mode):
    the worker environment, and as many threads as ``compute.cpus_per_worker`` (Ray sets OMP_NUM_THREADS so)."""
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)
    torch.set_num_threads(max(1, int(spec.compute.cpus_per_worker)))


def _run(spec: JobSpec, run: RunContext, work: str, publisher: Publisher, config: WorkerConfig) -> None:
    import ray
    import ray.train
    from transformers import EarlyStoppingCallback, PrinterCallback

    from raytune_ft.data.packing import PaddedCollator, collate_packed
    from raytune_ft.data.pipeline import build_datasets
    from raytune_ft.train import objectives as ob

    info = (lambda msg: publisher.push({"kind": "info", "message": msg})) if run.rank == 0 else (lambda msg: None)
    t0 = time.time()
    device = _device(run, config.in_process)
    seed = spec.training.seed
    workers = gather({"rank": run.rank, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()
                      if ray.is_initialized() else "local",
                      **env_report(spec)})  # forwarded env var names seen (never values)
    if run.rank == 0:
        publisher.push({"kind": "workers", "workers": workers, "message": "workers: " + ", ".join(
            f"rank {w['rank']} pid {w['pid']} node {w['node_id'][:8]}" for w in workers)})

    # ---- setup
    tokenizer = setup_tokenizer(run, work)
    train_ds, eval_ds, stats = build_datasets(spec.data, tokenizer, seed=spec.training.data_seed if spec.training.data_seed is not None else seed,
                                              filesystem_for=partial(st.open, storage=spec.storage),
                                              batch_size=spec.training.per_device_train_batch_size)
    if spec.training.eval_strategy == "no":
        eval_ds = []
    for line in stats.lines():
        info(f"data: {line}")
    train_ds, eval_ds, scale = ob.prepare_datasets(spec, tokenizer, train_ds, eval_ds)  # as the objective reads them
    elastic = spec.compute.elastic and not config.in_process
    if elastic:
        train_ds = whole_global_batches(spec, train_ds, info)
    if spec.method.objective == "regression":
        info(f"data: labels trained as (label - {scale.mean:.6g}) / {scale.std:.6g}; predictions and metrics "
             "in the labels' own units")
    t_data = time.time()

    model, chosen = build_model(spec, tokenizer, device=device, seed=seed)
    model = ob.attach_head(model, spec)  # regression: the MLP head of method.head
    model = apply_method(model, spec, wrap=not ob.wraps_adapter_itself(spec))
    info(f"model: {chosen['source']}; attention {chosen['attention']}; weights {chosen['dtype']}"
         + (f"; {chosen['embeddings']}" if "embeddings" in chosen else ""))
    t_model = time.time()

    out_dir = os.path.join(work, "hf")
    args_cls, args_extra = ob.argument_class(spec)
    args = training_arguments(spec, out_dir, copy.deepcopy(config.plan.deepspeed), use_cpu=device.type == "cpu",
                              cls=args_cls, world_size=run.world_size, **args_extra)
    # HF asks DDP to look for parameters without a gradient after every backward unless told otherwise (and
    # DDP warns that it found none): every trainable parameter gets one here, except in mixture-of-experts
    # models, whose unrouted experts may go without in a step
    args.ddp_find_unused_parameters = True if has_experts(model) else False
    if run.world_size > 1 or config.plan.deepspeed or elastic:  # how the workers share the work, and the batch
        ds = config.plan.deepspeed
        stage = (ds or {}).get("zero_optimization", {}).get("stage")
        strategy = "DDP" if not ds else f"DeepSpeed ZeRO-{stage}" if stage is not None else "DeepSpeed (deepspeed.config)"
        per, acc = args.per_device_train_batch_size, args.gradient_accumulation_steps
        info(f"distributed: {run.world_size} worker(s), {strategy} over {'gloo' if device.type == 'cpu' else 'nccl'}; "
             f"global batch {per * acc * run.world_size} = {per} per worker × {acc} accumulation × {run.world_size} "
             "workers" + (f" (elastic, {spec.compute.min_workers}-{spec.compute.num_workers} workers: the accumulation "
                          "follows the worker count)" if elastic else ""))
    resume = find_resume_point(run, config.resume_from, config.started)
    local_resume = None
    if resume is not None:
        # --resume-from's own storage, unless the resume is one of this run's checkpoints (committed since the
        # submission started: find_resume_point), which is in the run dir's
        own = resume.path == run.dir.join(resume.name)
        fs = run.dir.fs if own or not config.resume_from else st.open(config.resume_from, storage=spec.storage)[0]
        local_resume = os.path.join(work, "resume", resume.name)
        pull_to_resume(fs, resume.path, local_resume)
        info(f"resuming from {run.dir.uri_of(resume.name) if own else config.resume_from} at step {resume.step}")
    if run.rank == 0:
        restore_metrics(run, work, resume.step if resume else None)
    setup_trackers(spec, run, resumed_from=resume.step if resume else None)  # MLflow/W&B: env vars for HF's callbacks

    tb = None
    if run.rank == 0 and "tensorboard" in spec.monitoring.report_to:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(log_dir=os.path.join(work, rd.TENSORBOARD))
    callback = RtfCallback(run=run, spec_hash=spec_hash(spec), publisher=publisher, work_dir=work, tb_writer=tb,
                           report_evals=config.report_evals,  # a sweep trial: each eval to Tune
                           in_process=config.in_process, perplexity=spec.method.objective == "sft",
                           preemption_check_steps=spec.fault_tolerance.preemption_check_steps,
                           async_upload=spec.storage.async_upload,
                           elastic_max=spec.compute.num_workers if elastic else None)
    callbacks: list[Any] = [StopAtMaxSteps(), callback]
    example_log = None
    if spec.monitoring.log_examples:
        from raytune_ft.train.example_log import ExampleLog, IndexedRows

        example_log = ExampleLog(run.rank, callback.metrics_path)
        callbacks.insert(1, example_log)  # its record of a step before the step's save syncs metrics.jsonl
        train_ds = IndexedRows(train_ds)
    if spec.training.early_stopping:
        es = spec.training.early_stopping
        callbacks.append(EarlyStoppingCallback(es.patience, es.threshold))

    if spec.data.packing:
        # rows stay rows (SDPA/eager mask each row), except for the kernels that attend per example whatever the
        # row: flash-attention's varlen and rtf_packed_sdpa take the batch as one row, with no padding at all
        # (bench/RESULTS.md §1: 1.06x the forward+backward of the same batch as rows under rtf_packed_sdpa)
        flatten = getattr(model.config, "_attn_implementation", None) in ("flash_attention_2", PACKED_SDPA)
        collator = partial(collate_packed, pad_token_id=tokenizer.pad_token_id, flatten=flatten)
    else:
        collator = PaddedCollator(tokenizer.pad_token_id)
    if example_log is not None:
        from raytune_ft.train.example_log import IndexedCollator

        collator = IndexedCollator(collator)
    trainer = ob.make_trainer(spec, model=model, args=args, train_ds=train_ds, eval_ds=eval_ds, tokenizer=tokenizer,
                              callbacks=callbacks, scale=scale, collator=collator)
    if example_log is not None:
        example_log.install(trainer)
    trainer.remove_callback(PrinterCallback)  # its lines once per job, not once per node
    trainer.add_callback(PrintOnRankZero())
    trainable, total = count_parameters(trainer.model)
    info(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / max(total, 1):.2f}%), "
         f"method {spec.method.type}, objective {spec.method.objective}")
    info(f"setup took {time.time() - t0:.1f}s (data {t_data - t0:.1f}s, model {t_model - t_data:.1f}s)")

    # ---- train
    try:
        result = trainer.train(resume_from_checkpoint=local_resume)
    except AtMaxSteps as e:  # the last checkpoint is at max_steps but final/ was never written
        from transformers.trainer_utils import TrainOutput

        info(f"{e}: nothing left to train; writing final/ from that checkpoint")
        result = TrainOutput(trainer.state.global_step, None, {"train_runtime": 0.0})
    except BaseException:
        callback.abandon_upload()  # stopped with a checkpoint uploading (an error, Ctrl-C): it stays uncommitted
        raise
    if callback.grow_to:  # elastic: stopped after a committed checkpoint; the driver starts again from it
        if run.rank == 0:
            callback.sync_logs()  # an evaluation at the epoch's end, after the stop (the resume keeps its record)
        barrier()
        if tb is not None:
            tb.close()
        return
    eval_metrics = _final_eval(trainer) if eval_ds else {}

    probe = fingerprint(trainer.model, ob.probe_ids((eval_ds or train_ds)[0], tokenizer)[:32], device)

    # ---- save
    final = os.path.join(work, rd.FINAL)
    trainer.save_model(final)
    if run.rank == 0:
        if ob.has_head(spec):
            ob.save_head(trainer.model, spec, final, scale)
        tokenizer.save_pretrained(final)
        trainer.state.save_to_json(os.path.join(final, rd.TRAINER_STATE))
        runtime = result.metrics.get("train_runtime") or (time.time() - t0)
        tokens = int(trainer.state.num_input_tokens_seen or 0)  # the whole run's: a resume carries it on
        # this attempt's tokens over this attempt's runtime (train_runtime covers only this train() call)
        attempt_tokens = tokens - (callback.tokens_start if callback.tokens_start is not None else tokens)
        summary = {
            "train_loss": _last_train_loss(trainer.state.log_history),
            "train_loss_avg": result.training_loss,
            "eval_loss": eval_metrics.get("eval_loss"),
            "perplexity": (math.exp(min(eval_metrics["eval_loss"], 50))
                           if "eval_loss" in eval_metrics and spec.method.objective == "sft" else None),
            "steps": trainer.state.global_step,
            "max_steps": trainer.state.max_steps,
            "tokens": tokens,
            "runtime_s": runtime,
            "attempt_tokens": attempt_tokens,
            "tokens_per_s": attempt_tokens / runtime if runtime else None,
            "trainable_params": trainable,
            "total_params": total,
            "resumed_from_step": resume.step if resume else None,
            "data": {"train_examples": stats.train_examples, "eval_examples": stats.eval_examples,
                     "truncated": stats.truncated, "skipped_bad_rows": stats.skipped,
                     "packing_efficiency": stats.packing_efficiency},
            "method": spec.method.type,
            "objective": spec.method.objective,
            **ob.eval_summary(spec, eval_metrics),
            **({"labels": stats.labels, "label_scale": {"mean": scale.mean, "std": scale.std}}
               if spec.method.objective == "regression" else {}),
            "spec_hash": spec_hash(spec),
            "fingerprint": probe,
            "workers": workers,
        }
        with open(os.path.join(final, rd.FINAL_RESULTS), "w") as f:
            json.dump(summary, f, indent=2)
        with open(os.path.join(final, rd.SPEC), "w") as f:
            f.write(to_yaml(spec))
        # committed like a checkpoint: every file's sha256 in a manifest written last, checked on pull and load
        ck.commit_dir(final, run.dir.fs, run.dir.final_dir, step=trainer.state.global_step, epoch=trainer.state.epoch,
                      spec_hash=summary["spec_hash"], metrics={k: summary[k] for k in ("train_loss", "eval_loss")})
        callback.sync_logs()
        publisher.push({"kind": "done", "summary": summary, "final": run.dir.final_uri})
    barrier()
    sft_eval = "eval_loss" in eval_metrics and spec.method.objective == "sft"
    last = {"step": trainer.state.global_step, "loss": _last_train_loss(trainer.state.log_history),
            **({"eval_loss": eval_metrics["eval_loss"]} if "eval_loss" in eval_metrics else {}),
            **({"perplexity": math.exp(min(eval_metrics["eval_loss"], 50))} if sft_eval else {}),
            **ob.eval_summary(spec, eval_metrics), "done": True}
    if config.in_process:
        tell_in_process(last)
    else:
        ray.train.report(last)
    if tb is not None:
        tb.close()


def fingerprint(model: Any, input_ids: list[int], device: torch.device) -> dict[str, Any]:
    """Logits of the trained model, in memory, on a fixed input: whoever loads final/ can check that
    the saved artifact computes exactly what training ended with (``rtf eval`` and the tests do)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        ids = torch.tensor([input_ids], device=device)
        logits = model(input_ids=ids).logits.float()
    if was_training:
        model.train()
    last = logits[0, -1, :8] if logits.dim() == 3 else logits[0, :8]  # a scalar head: (batch, 1)
    return {"input_ids": list(input_ids), "last_logits_head": last.tolist(),
            "logits_sum": float(logits.sum()), "logits_abs_sum": float(logits.abs().sum())}


def _final_eval(trainer: Any) -> dict[str, float]:
    """The eval metrics at the final step: reuse the scheduled evaluation if it ran at that step."""
    for rec in reversed(trainer.state.log_history):
        if "eval_loss" in rec:
            if rec.get("step") == trainer.state.global_step:
                return {k: float(v) for k, v in rec.items() if k.startswith("eval_") and isinstance(v, (int, float))}
            break
    return trainer.evaluate()


def _last_train_loss(history: list[dict[str, Any]]) -> float | None:
    for rec in reversed(history):
        if "loss" in rec:
            return float(rec["loss"])
    return None
