"""The HF Trainer callback that ties a worker to Ray and to storage.

- every logging step: throughput, ETA and memory are added to HF's logs; rank 0 appends them to
  ``metrics.jsonl``, writes TensorBoard scalars and pushes a progress event;
- every save: each rank's checkpoint files are reported to Ray Train (which uploads them into
  ``{run}/checkpoint-NNNNNNNN``), then rank 0 writes the manifest — last — and prunes old ones;
- every evaluation, with ``report_evals`` (sweep trials): the eval metrics are reported to Ray Train
  at once, without a checkpoint, so Ray Tune's scheduler sees each one as it happens.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
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
                 perplexity: bool = True, preemption_check_steps: int | None = None) -> None:
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
            self.publisher.push({"kind": "preemption", "message": message})

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
        if self.in_process:  # to a sweep trial's listener, if any (train.config.IN_PROCESS_REPORTS)
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
        # Synchronous: training waits for this rank's files to be in storage. (Asynchronous upload would pass
        # checkpoint_upload_mode=ASYNC here and move the gather + manifest below into the upload's completion.)
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
            path = self.run.dir.join(name)
            files: dict[str, dict[str, Any]] = {}
            for per_rank in reversed(all_digests):  # rank 0 wins on shared names
                files.update({f["path"]: f for f in per_rank})
            ck.write_manifest(self.run.dir.fs, path, step=step, epoch=state.epoch, files=list(files.values()),
                              spec_hash=self.spec_hash, metrics=metrics)
            spec = self.run.spec
            best = spec.training.metric_for_best_model if spec.training.load_best_model_at_end else None
            mode = "max" if spec.training.greater_is_better else "min"
            ck.prune(self.run.dir.fs, self.run.dir.path, keep_last=spec.storage.keep_checkpoints,
                     best_metric=best, mode=mode)
            self.sync_logs()
            self.publisher.push({"kind": "checkpoint", "step": step, "path": self.run.dir.uri_of(name)})
        barrier()
        self.last_save_s = time.time() - self.t_step_end  # HF's save (and an eval at the same step) + commit
        if self.in_process:  # after the commit: a sweep may stop its trial at this report
            tell_in_process(metrics, checkpoint=True)
        if self.stopping:  # the checkpoint SIGTERM asked for is committed
            raise StopRequested(f"SIGTERM: checkpoint committed at step {step}")

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


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
