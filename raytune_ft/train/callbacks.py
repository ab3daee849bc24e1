"""The HF Trainer callback that ties a worker to Ray and to storage.

- every logging step: throughput, ETA and memory are added to HF's logs; rank 0 appends them to
  ``metrics.jsonl``, writes TensorBoard scalars and pushes a progress event;
- every save: each rank's checkpoint files are reported to Ray Train (which uploads them into
  ``{run}/checkpoint-NNNNNNNN``), then rank 0 writes the manifest — last — and prunes old ones; with
  ``storage.upload`` async (the default to an object store) training goes on meanwhile, and the next save
  first waits for this one (one upload in flight per worker);
- every evaluation, with ``report_evals`` (sweep trials): the eval metrics are reported to Ray Train
  at once, without a checkpoint, so Ray Tune's scheduler sees each one as it happens.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import threading
import time
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from raytune_ft import checkpoints as ck
from raytune_ft import rundir as rd
from raytune_ft import storage as st
from raytune_ft.train.config import SAVE_AND_STOP, STOP, StopRequested, tell_in_process

log = logging.getLogger("raytune_ft")


def peak_memory_mb() -> float:
    """Peak GPU memory allocated on this device, or the process's peak RSS on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def gather(obj: Any) -> list[Any]:
    if not _dist():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if _dist():
        torch.distributed.barrier()


CALIBRATION_STEPS = 8  # steps that ask every time while the asking and the steps are timed
ASK_SHARE = 0.01  # preemption checks take at most this share of the step time...
ASK_EVERY_S = 5.0  # ...and come at least this often (Ray Train's watcher itself polls every 5 s)


class AtMaxSteps(Exception):
    """Raised by :class:`StopAtMaxSteps` before any step when a resumed run has nothing left to train."""


class StopAtMaxSteps(TrainerCallback):
    """Gap in transformers' Trainer: resumed from a checkpoint at ``max_steps`` mid-epoch, it runs one more
    optimizer step before its first ``should_training_stop`` check (``_run_epoch`` checks only after a
    step), commits step max_steps+1 and lets pruning drop the real checkpoints. This stops it at
    ``on_train_begin``, after the checkpoint's weights and state are loaded, so final/ is written from them."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.max_steps and state.global_step >= state.max_steps:
            raise AtMaxSteps(f"resumed at step {state.global_step} of {state.max_steps}")


class PrintOnRankZero(PrinterCallback):
    """HF's log printer (``disable_tqdm``), on the world's rank 0 only. Gap in transformers' PrinterCallback:
    it prints on every node's local process zero, and a cluster job's log gathers all nodes' workers, so each
    logged step would appear once per node (the same values: HF averages the loss over ranks)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero:
            super().on_log(args, state, control, logs=logs, **kwargs)


class RtfCallback(TrainerCallback):
    def __init__(self, *, run: Any, spec_hash: str, publisher: Any, work_dir: str, tb_writer: Any = None,
                 tokens_per_sample: float | None = None, report_evals: bool = False, in_process: bool = False,
                 perplexity: bool = True, preemption_check_steps: int | None = None,
                 async_upload: bool = False, elastic_max: int | None = None) -> None:
        self.run = run  # RunContext: rank, spec, dir (the RunDir)
        self.spec_hash = spec_hash
        self.publisher = publisher
        self.work_dir = work_dir
        self.tb = tb_writer
        self.metrics_path = os.path.join(work_dir, rd.METRICS)
        self.t_start = self.t_last = time.time()
        self.tokens_last = 0
        self.tokens_start: int | None = None  # tokens seen before this attempt (a resume carries them on)
        self.step_last = 0
        self.start_step = 0
        self.last_metrics: dict[str, Any] = {}
        self.tokens_per_sample = tokens_per_sample
        self.report_evals = report_evals
        self.in_process = in_process  # Ray Train's local mode: it uploads no checkpoint, rtf does
        self.perplexity = perplexity  # exp(eval_loss) means something for next-token prediction only
        self.stopping = False  # SIGTERM asked for a checkpoint and a stop (in-process runs)
        # Ray Train's local mode has no preemption watcher (get_preemption_info is always None there); None: ask
        # every step until the interval is calibrated (choose_preemption_interval)
        self.preemption_every: int | None = 0 if in_process else preemption_check_steps
        self.ask_s: list[float] = []  # what asking cost, and the steps' own times, until calibrated
        self.step_s: list[float] = []
        self.preemption_seen = False  # one just-in-time checkpoint per notice: Ray restarts the group after it
        self.t_step_end = time.time()  # the last step's end, or the training's start
        self.last_save_s: float | None = None  # step end -> committed, of the last checkpoint (rank 0's figure)
        # (a sweep trial in its own process stays synchronous: Tune's stop at a report ends its thread there)
        self.async_upload = async_upload and not (in_process and report_evals)
        self.in_flight: _AsyncCommit | None = None
        self.elastic_max = elastic_max  # an elastic group's most workers: below it, each save asks to grow
        self.grow_to: int | None = None  # stopped after a committed checkpoint to start again with more workers

    # ------------------------------------------------------------------ logging

    def on_step_end(self, args, state, control, **kwargs):
        now = time.time()
        if self.preemption_every is None:  # calibrating: ask at every step, time the steps and the asking
            self.step_s.append(now - self.t_step_end)
            t0 = time.perf_counter()
            self.check_preemption(state, control)
            self.ask_s.append(time.perf_counter() - t0)
            if len(self.ask_s) >= CALIBRATION_STEPS:
                self.preemption_every = self.choose_preemption_interval()
        elif self.preemption_every and state.global_step % self.preemption_every == 0:
            self.check_preemption(state, control)
        if control.should_save and self.in_flight is not None:
            # back-pressure, before HF saves: its rotation (save_total_limit, with a best checkpoint kept)
            # may delete the local copy of the checkpoint still uploading
            self.wait_for_upload()
        self.t_step_end = time.time()
        if not self.in_process:
            return
        if STOP.is_set():  # Ctrl-C in the driver, which this run shares a process with
            raise StopRequested(f"stopped at step {state.global_step}")
        if SAVE_AND_STOP.is_set() and not self.stopping:  # SIGTERM: save this step, then stop
            self.stopping = True
            control.should_save = True
            self.publisher.push({"kind": "info", "message": f"SIGTERM: committing a checkpoint at step "
                                 f"{state.global_step}, then stopping"})

    def choose_preemption_interval(self) -> int:
        """Steps between preemption checks: asking costs at most ASK_SHARE of the step time, and happens at least
        every ASK_EVERY_S. Rank 0's figures (the medians of the calibration steps, the first one left out: it
        carries the start-up), broadcast so that every rank asks at the same steps (a collective)."""
        choice: list[Any] = [1]
        if self.run.rank == 0:
            step = max(sorted(self.step_s[1:])[len(self.step_s[1:]) // 2], 1e-6)
            ask = sorted(self.ask_s[1:])[len(self.ask_s[1:]) // 2]
            choice = [max(1, min(math.ceil(ask / (ASK_SHARE * step)), int(ASK_EVERY_S / step)))]
            log.info("preemption checks every %d steps (asking takes %.1f ms, a step %.0f ms)", choice[0],
                     ask * 1e3, step * 1e3)
        if _dist():
            torch.distributed.broadcast_object_list(choice, src=0)
        return int(choice[0])

    def check_preemption(self, state, control) -> None:
        """A node of this worker group is being preempted (Ray Train's watcher saw it drained with reason
        preemption, as the autoscaler does for a spot reclaim): commit a checkpoint at this step if the last
        one's time fits before the deadline, then train on. Ray Train restarts the group from the latest
        committed checkpoint when the deadline passes, counted against max_preemption_failures.

        ``ray.train.get_preemption_info`` is a collective (rank 0's view, broadcast), so every rank calls it at
        the same steps and gets the same answer; the decision, which reads clocks, is rank 0's, broadcast."""
        import ray.train

        info = ray.train.get_preemption_info()
        if info is None or self.preemption_seen:
            return
        self.preemption_seen = True
        decision: list[Any] = [None]
        if self.run.rank == 0:
            left = info.deadline_ms / 1000 - time.time() if info.deadline_ms else None
            need = self.last_save_s
            save = left is None or need is None or need * 1.2 < left
            nodes = ", ".join(f"{n[:12]} (rank {', '.join(map(str, r))})" for n, r in info.preempted_node_to_ranks.items())
            when = f"deadline in {left:.0f}s" if left is not None else "no deadline given"
            took = f"the last checkpoint took {need:.1f}s" if need is not None else "no checkpoint timed yet"
            decision = [(save, f"preemption notice for node {nodes}, {when}: " + (
                f"committing a checkpoint at step {state.global_step}, then training on ({took})" if save else
                f"no checkpoint now: {took}, more than the time left; the restart resumes from the last one"))]
        if _dist():
            torch.distributed.broadcast_object_list(decision, src=0)
        save, message = decision[0]
        if save:
            control.should_save = True
        if self.run.rank == 0:
            # the deadline (epoch s) lets the driver say when Ray Train ends this group, even if no worker does
            deadline = info.deadline_ms / 1000 if info.deadline_ms else None
            self.publisher.push({"kind": "preemption", "message": message, "deadline": deadline})

    def on_train_begin(self, args, state, control, **kwargs):
        from raytune_ft.train.monitor import HardwareMonitor

        self.monitor = HardwareMonitor(args.device.index or 0 if args.device.type == "cuda" else None)
        self.t_start = self.t_last = self.t_step_end = time.time()
        self.step_last = self.start_step = state.global_step
        self.tokens_last = self.tokens_start = state.num_input_tokens_seen or 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs if logs is not None else {}
        now = time.time()
        step = state.global_step
        event: dict[str, Any] = {"step": step, "max_steps": state.max_steps, "epoch": state.epoch}
        if "eval_loss" in logs:
            ev = float(logs["eval_loss"])
            event.update(kind="eval", eval_loss=ev)
            if self.perplexity:
                logs["perplexity"] = event["perplexity"] = math.exp(min(ev, 50.0))
        elif "loss" in logs:
            tokens = state.num_input_tokens_seen or 0
            dt = max(now - self.t_last, 1e-9)
            dsteps = max(step - self.step_last, 0)
            tok_s = (tokens - self.tokens_last) / dt
            samples = dsteps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
            rate = (step - self.start_step) / max(now - self.t_start, 1e-9)
            eta = (state.max_steps - step) / rate if rate > 0 else None
            hw = self.monitor.sample() if getattr(self, "monitor", None) is not None else {}
            logs.update(tokens_per_s=tok_s, samples_per_s=samples / dt, peak_memory_mb=peak_memory_mb(),
                        max_steps=state.max_steps, eta_s=eta, **hw)
            event.update(kind="log", loss=float(logs["loss"]), learning_rate=logs.get("learning_rate"),
                         grad_norm=logs.get("grad_norm"), tokens_per_s=tok_s, eta_s=eta,
                         peak_memory_mb=logs["peak_memory_mb"], gpu_util_percent=hw.get("gpu_util_percent"))
            warning = self.monitor.check(hw, now) if hw else None
            if warning and self.run.rank == 0:
                self.publisher.push({"kind": "info", "message": f"warning: {warning}"})
            self.t_last, self.tokens_last, self.step_last = now, tokens, step
        else:
            return
        record = {"step": step, "time": now, **{k: _plain(v) for k, v in logs.items()}}
        self.last_metrics.update({k: v for k, v in record.items() if isinstance(v, (int, float))})
        if self.run.rank != 0:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and v is not None:
                    tag = k if k.startswith("eval_") or k == "perplexity" else f"train/{k}"
                    self.tb.add_scalar(tag, v, step)
            self.tb.flush()
        self.publisher.push(event)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        """Report the evaluation to Ray Train now (every rank calls this, as Ray Train requires). Not the
        one at the last step: the recipe's final report carries it, once final/ is saved."""
        if not self.report_evals or not metrics or "eval_loss" not in metrics or state.global_step >= state.max_steps:
            return
        import ray.train

        ev = float(metrics["eval_loss"])
        ours = {k: float(v) for k, v in metrics.items() if k.startswith("eval_") and isinstance(v, (int, float))
                and not isinstance(v, bool)}  # an objective's own metrics (eval_r2, eval_accuracy...) too
        if self.perplexity:
            ours["perplexity"] = math.exp(min(ev, 50.0)) if math.isfinite(ev) else ev
        report = {"step": state.global_step, "max_steps": state.max_steps, "epoch": state.epoch, **ours,
                  "eval_loss": ev}
        if self.in_process:  # to a sweep trial's listener, if any (train.config.IN_PROCESS_REPORTS), which may
            self.sync_logs()  # end this thread then and there (an ASHA stop): the run dir has this eval first
            tell_in_process(report)
        else:
            ray.train.report(report)

    # ------------------------------------------------------------------ checkpoints

    def on_save(self, args, state, control, **kwargs):
        import ray.train

        step = state.global_step
        local = os.path.join(args.output_dir, rd.hf_checkpoint_name(step))
        os.makedirs(local, exist_ok=True)
        metrics = {k: v for k, v in self.last_metrics.items() if k in ("loss", "eval_loss", "perplexity",
                                                                          "learning_rate", "epoch")}
        metrics["step"] = step
        name = rd.checkpoint_name(step)
        self.wait_for_upload()  # back-pressure: the previous checkpoint's upload is done (and committed) first
        if self.async_upload:
            self.save_async(state, name, local, metrics)
            if self.stopping:  # SIGTERM (in-process runs): the checkpoint it asked for is committed first
                self.wait_for_upload()
                raise StopRequested(f"SIGTERM: checkpoint committed at step {step}")
            self.maybe_grow(state, control)
            return
        # Synchronous: training waits for this rank's files to be in storage, then for the commit.
        upload = _HashingUpload()
        if self.in_process:  # the gap: Ray Train's local mode keeps a reported checkpoint where it is (and calls
            # no upload fn), so rtf uploads it; the report itself goes to a listener after the commit, below
            upload.digests = st.upload_dir(local, self.run.dir.fs, self.run.dir.join(name), exclude=(ck.MANIFEST,))
        else:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(local),
                             checkpoint_dir_name=name, checkpoint_upload_fn=upload)
        if upload.digests is None:
            raise RuntimeError(f"checkpoint {name}: Ray Train reported it without calling rtf's upload")
        all_digests = gather(upload.digests)  # after every rank's upload: each rank's files, hashed as they streamed
        barrier()
        if self.run.rank == 0:
            self.commit(name, step, state.epoch, metrics, all_digests)
        barrier()
        self.last_save_s = time.time() - self.t_step_end  # HF's save (and an eval at the same step) + commit
        if self.in_process:  # after the commit: a sweep may stop its trial at this report
            tell_in_process(metrics, checkpoint=True)
        if self.stopping:  # the checkpoint SIGTERM asked for is committed
            raise StopRequested(f"SIGTERM: checkpoint committed at step {step}")
        self.maybe_grow(state, control)

    def maybe_grow(self, state, control) -> None:
        """An elastic group below its most workers, at a checkpoint: when Ray would now start more workers than
        run (a node came back), stop training once this checkpoint is committed; the driver starts the run again
        from it, at the larger size, and no step is trained twice (:mod:`raytune_ft.train.elastic`: Ray Train's
        own resize restarts from the latest checkpoint wherever the group is). Rank 0 asks, every rank hears."""
        if (not self.elastic_max or self.run.world_size >= self.elastic_max or state.global_step >= state.max_steps
                or control.should_training_stop  # stopping anyway (early stopping): final/ is next
                or self.preemption_seen):  # Ray still counts a node being drained: it may have "room" there
            return
        from raytune_ft.train.elastic import workers_ray_would_start

        room: list[Any] = [workers_ray_would_start() if self.run.rank == 0 else None]
        if _dist():
            torch.distributed.broadcast_object_list(room, src=0)
        if not room[0] or room[0] <= self.run.world_size:
            return
        self.wait_for_upload()  # an asynchronous upload: committed before the group stops
        self.grow_to = int(room[0])
        control.should_training_stop = True
        if self.run.rank == 0:
            self.publisher.push({"kind": "grow", "step": state.global_step, "workers": self.run.world_size,
                                 "to": self.grow_to, "message": (
                                     f"elastic: Ray has room for {self.grow_to} workers ({self.run.world_size} "
                                     f"now): the workers stop at the checkpoint of step {state.global_step}, and "
                                     f"the run starts again from it with more")})

    def on_epoch_end(self, args, state, control, **kwargs):
        """Stopped mid-epoch to grow: no epoch-end evaluation of a partial epoch (HF runs the epoch's end after
        the stop; the next fit evaluates at the real one). Stopped at an epoch's end: its evaluation runs, and
        the recipe syncs it to storage before the group goes."""
        if self.grow_to and abs(state.epoch - round(state.epoch)) > 1e-6:
            control.should_evaluate = False

    def save_async(self, state, name: str, local: str, metrics: dict[str, Any]) -> None:
        """Hand the checkpoint to Ray Train's asynchronous upload (its one upload thread per worker) and train
        on. The commit follows in that thread (:class:`_AsyncCommit`); a failed upload fails this worker, as
        Ray Train raises it in the training thread, and the restart resumes from the last committed one.
        In-process (Ray Train's local mode has no upload): a thread of rtf's own does the same, and a failed
        upload is raised at the next save or at the end of training."""
        if self.run.rank == 0:  # first, so that `rtf checkpoints list` shows the upload as in flight
            # an earlier attempt at this step may have left ranks' digests: gone before any rank uploads (the
            # others start only after ray.train.report's checkpoint-name sync, which rank 0 joins after this)
            _clear_bookkeeping(self.run.dir.fs, self.run.dir.join(name))
            st.write_bytes(self.run.dir.fs, self.run.dir.join(name, rd.UPLOADING), json.dumps(
                {"started": time.time(), "world_size": self.run.world_size, "step": state.global_step}).encode())
        commit = _AsyncCommit(self, name, state.global_step, state.epoch, dict(metrics), self.t_step_end)
        self.in_flight = commit
        if self.in_process:
            threading.Thread(target=commit.upload_from, args=(local,), name=f"rtf-upload-{name}",
                             daemon=True).start()
            return
        import ray.train
        from ray.train import CheckpointUploadMode

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(local), checkpoint_dir_name=name,
                         checkpoint_upload_fn=commit, checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
                         delete_local_checkpoint_after_upload=False)  # HF rotates its local checkpoints itself

    def abandon_upload(self, wait_s: float = 10.0) -> None:
        """The run stops with an upload in flight (an error, Ctrl-C): that checkpoint is never committed, by
        this run or by a thread that outlives it; wait a little for an in-process upload to let go of the
        local files before they are deleted."""
        commit, self.in_flight = self.in_flight, None
        if commit is not None:
            commit.cancelled = True
            commit.done.wait(wait_s if self.in_process else 0)

    def wait_for_upload(self) -> None:
        """Wait for the asynchronous upload in flight, if any, to be committed (rank 0) or handed over (the
        other ranks); raise what failed it."""
        commit, self.in_flight = self.in_flight, None
        if commit is None:
            return
        t0 = time.time()
        if not commit.done.wait(UPLOAD_WAIT_S):  # (Ray Train skips a report whose group is being torn down)
            raise RuntimeError(f"checkpoint {commit.name}: its upload did not finish within {UPLOAD_WAIT_S:.0f}s")
        waited = time.time() - t0
        if waited > 1.0 and self.run.rank == 0:
            log.info("waited %.1fs for checkpoint %s's upload before going on", waited, commit.name)
        if commit.error is not None:
            raise RuntimeError(f"checkpoint {commit.name}: asynchronous upload failed: {commit.error}") \
                from commit.error

    def on_train_end(self, args, state, control, **kwargs):
        self.wait_for_upload()  # final/ is committed after the last checkpoint, never beside its upload

    def commit(self, name: str, step: int, epoch: float | None, metrics: dict[str, Any],
               all_digests: list[list[dict[str, Any]]]) -> None:
        """Rank 0: write the manifest of checkpoint ``name`` (last), prune older checkpoints, say so."""
        path = self.run.dir.join(name)
        files: dict[str, dict[str, Any]] = {}
        for per_rank in reversed(all_digests):  # rank 0 wins on shared names
            files.update({f["path"]: f for f in per_rank})
        _clear_bookkeeping(self.run.dir.fs, path)  # an asynchronous upload's (this one's, or one cut short by an
        # earlier attempt at this step): gone before the commit
        ck.write_manifest(self.run.dir.fs, path, step=step, epoch=epoch, files=list(files.values()),
                          spec_hash=self.spec_hash, metrics=metrics)
        self.publisher.push({"kind": "checkpoint", "step": step, "path": self.run.dir.uri_of(name)})
        spec = self.run.spec
        best = spec.training.metric_for_best_model if spec.training.load_best_model_at_end else None
        mode = "max" if spec.training.greater_is_better else "min"
        try:  # committed now: what follows is housekeeping, which the next checkpoint does again
            ck.prune(self.run.dir.fs, self.run.dir.path, keep_last=spec.storage.keep_checkpoints,
                     best_metric=best, mode=mode)
            self.sync_logs()
        except Exception as e:  # noqa: BLE001 - never undo (or make Ray retry the upload of) a committed one
            log.warning("checkpoint %s is committed; pruning or the log sync after it failed: %s", name,
                        st.scrub(str(e), spec.storage))

    def sync_logs(self) -> None:
        """Copy metrics.jsonl and the TensorBoard events to the run dir in storage (rank 0)."""
        if self.tb is not None:
            self.tb.flush()
        if os.path.exists(self.metrics_path):
            with open(self.metrics_path, "rb") as f:
                st.write_bytes(self.run.dir.fs, self.run.dir.metrics_file, f.read())
        tb_dir = os.path.join(self.work_dir, rd.TENSORBOARD)
        if os.path.isdir(tb_dir):
            st.upload_dir(tb_dir, self.run.dir.fs, self.run.dir.tensorboard_dir)


class _HashingUpload:
    """Ray Train's ``checkpoint_upload_fn``: this rank's checkpoint files go to where Ray Train would put them
    (``{experiment}/{checkpoint_dir_name}``, on its storage filesystem), each file read once and hashed while
    it streams (:func:`raytune_ft.storage.upload_dir`), so the manifest's digests cost no second read. The gap it
    fills: Ray's default upload (pyarrow ``copy_files``) says nothing about what it copied."""

    def __init__(self) -> None:
        self.digests: list[dict[str, Any]] | None = None

    def __call__(self, checkpoint: Any, checkpoint_dir_name: str) -> Any:
        import ray.train

        storage = ray.train.get_context().get_storage()
        fs = storage.storage_filesystem
        dest = storage.build_checkpoint_path_from_name(checkpoint_dir_name)
        self.digests = st.upload_dir(checkpoint.path, fs, dest, exclude=(ck.MANIFEST,))  # Ray retries: the last wins
        return ray.train.Checkpoint(dest, filesystem=fs)


PEERS_WAIT_S = 3600.0  # how long rank 0 waits for the other ranks' uploads of one checkpoint
PEERS_POLL_S = 0.5
UPLOAD_WAIT_S = PEERS_WAIT_S + 600.0  # how long the next save waits for an upload in flight
UPLOAD_ATTEMPTS = 3  # Ray Train calls the upload fn up to this often on a retryable S3 error (its @retry)


def _clear_bookkeeping(fs: Any, path: str) -> None:
    """Delete an asynchronous upload's marker and ranks' digest files from checkpoint dir ``path``."""
    for rel in st.list_files(fs, path):
        if rel.startswith(rd.BOOKKEEPING):
            st.delete_file(fs, f"{path}/{rel}")


def _ray_retries(e: BaseException) -> bool:
    """Whether Ray Train's upload will call the upload fn again after ``e`` (its retry matches these texts)."""
    try:
        from ray.train.v2._internal.constants import AWS_RETRYABLE_TOKENS
    except ImportError:  # another Ray: assume no retry (the worker then fails on the first error)
        return False
    return any(token in str(e) for token in AWS_RETRYABLE_TOKENS)


class _AsyncCommit(_HashingUpload):
    """The ``checkpoint_upload_fn`` of an asynchronous upload, run in Ray Train's upload thread of this worker:
    this rank's files, hashed as they stream (:class:`_HashingUpload`), then its digests written beside them
    (``.rtf-rank-NNNNN.json``, JSON); rank 0 then waits for every rank's, deletes them and the marker, writes the
    manifest and prunes (:meth:`RtfCallback.commit`). The gap it fills: the synchronous path gathers the digests
    with a collective, which cannot run in a thread beside training's own; storage is the meeting point."""

    def __init__(self, cb: RtfCallback, name: str, step: int, epoch: float | None, metrics: dict[str, Any],
                 t_step_end: float) -> None:
        super().__init__()
        self.cb, self.name, self.step, self.epoch, self.metrics = cb, name, step, epoch, metrics
        self.t_step_end = t_step_end
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.attempts = 0
        self.cancelled = False  # the run stopped meanwhile (in-process): upload, but commit nothing

    def __call__(self, checkpoint: Any, checkpoint_dir_name: str) -> Any:
        self.attempts += 1
        self.error = None
        try:
            out = super().__call__(checkpoint, checkpoint_dir_name)
            self.finish()
        except BaseException as e:
            self.error = e
            if self.attempts >= UPLOAD_ATTEMPTS or not _ray_retries(e):  # else Ray calls again: still in flight
                self.done.set()
            raise
        self.done.set()
        return out

    def upload_from(self, local: str) -> None:
        """An in-process run's upload thread (Ray Train's local mode calls no upload fn)."""
        try:
            self.digests = st.upload_dir(local, self.cb.run.dir.fs, self.cb.run.dir.join(self.name),
                                         exclude=(ck.MANIFEST,))
            self.finish()
        except BaseException as e:  # noqa: BLE001 - raised in the training thread by wait_for_upload
            self.error = e
        finally:
            self.done.set()

    def finish(self) -> None:
        if self.cancelled:
            return
        cb, fs = self.cb, self.cb.run.dir.fs
        path = cb.run.dir.join(self.name)
        st.write_bytes(fs, f"{path}/{rd.RANK_DIGESTS.format(rank=cb.run.rank)}", json.dumps(self.digests).encode())
        if cb.run.rank == 0:
            cb.commit(self.name, self.step, self.epoch, self.metrics, self.peers(fs, path, cb.run.world_size))
            cb.last_save_s = time.time() - self.t_step_end  # step end -> committed, training meanwhile

    def peers(self, fs: Any, path: str, world_size: int) -> list[list[dict[str, Any]]]:
        """Every rank's digests (rank 0's first), once all are in storage."""
        names = [rd.RANK_DIGESTS.format(rank=r) for r in range(world_size)]
        deadline = time.time() + PEERS_WAIT_S
        while True:
            data = [st.read_bytes(fs, f"{path}/{n}") for n in names]
            if all(d is not None for d in data):
                break
            if time.time() > deadline:
                missing = [r for r, d in enumerate(data) if d is None]
                raise RuntimeError(f"rank(s) {missing} did not finish uploading {self.name} "
                                   f"within {PEERS_WAIT_S:.0f}s")
            time.sleep(PEERS_POLL_S)
        out = []
        for n, d in zip(names, data):
            digests = json.loads(d)  # data only: a list of {path, size, sha256}
            if not isinstance(digests, list) or not all(isinstance(f, dict) and isinstance(f.get("path"), str)
                                                        for f in digests):
                raise RuntimeError(f"{self.name}/{n}: not a list of file digests")
            out.append(digests)
        return out  # the commit deletes these files, then writes the manifest


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
