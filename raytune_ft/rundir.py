"""A run's directory in storage: the one module that knows its layout.

A run is ``{storage.path}/{name}/`` on a local disk or an S3-compatible store::

    rtf_spec.yaml                  the resolved spec the run was started with
    metrics.jsonl                  one line per logging step and per evaluation (rank 0)
    tensorboard/                   TensorBoard events
    tokenizer/                     a tokenizer trained on the data (tokenizer.train), shared by every worker
    checkpoint-00000100/           one dir per saved step, zero-padded to 8 digits ...
        rtf_checkpoint.json        ... committed only by its manifest, written last (raytune_ft.checkpoints)
    final/                         the trained weights, tokenizer, trainer_state.json, final_results.json,
                                   and rtf_spec.yaml again
    checkpoint_manager_snapshot.json   Ray Train's own record (rtf resumes from its manifests instead)

A sweep is a directory of the same kind whose trials are run dirs (``trial-000/`` …), beside Ray Tune's
experiment state (``tune/``), ``sweep_spec.yaml`` (what a resubmission must keep), ``results.csv`` and
``best.yaml``. A run (or sweep) stopped before final/ holds ``rtf_stopped.json`` (why, at which step).

Every other module takes these names from here. Paths are native to the run's pyarrow filesystem
(``bucket/key`` or an absolute local path); URIs are what users see (``s3://bucket/key`` or the path).
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from raytune_ft import storage as st

SPEC = "rtf_spec.yaml"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
TOKENIZER = "tokenizer"
FINAL = "final"
FINAL_RESULTS = "final_results.json"
TRAINER_STATE = "trainer_state.json"
HEAD_WEIGHTS = "head.safetensors"  # regression/reward: the head's weights beside the adapter or model (final/)
HEAD_CONFIG = "head.json"  # ... and what rebuilds it: objective, MLP shape, label scale
MANIFEST = "rtf_checkpoint.json"
# An asynchronous upload (storage.upload: async) has no collective to gather every rank's digests at its end:
# rank 0 marks the checkpoint as uploading, each rank writes its files' digests beside them when its upload
# is done, and rank 0 commits (these files deleted, then the manifest written) once every rank's are in.
BOOKKEEPING = ".rtf-"  # what such files' names begin with; never part of a committed checkpoint
UPLOADING = ".rtf-uploading.json"
RANK_DIGESTS = ".rtf-rank-{rank:05d}.json"
CHECKPOINT_PREFIX = "checkpoint-"
STEP_DIGITS = 8
CHECKPOINT_RE = re.compile(rf"{CHECKPOINT_PREFIX}(\d+)")  # fullmatch: `$` alone accepts a trailing newline

TRIAL_PREFIX = "trial-"
TUNE_DIR = "tune"
SWEEP_SPEC = "sweep_spec.yaml"
RESULTS_CSV = "results.csv"
TRACKERS = "trackers.json"  # the MLflow/W&B run ids a resumed run reattaches to (raytune_ft.train.trackers)
STOPPED = "rtf_stopped.json"  # why a run ended without final/ (Ctrl-C, rtf stop, a failure); gone when it resumes
BEST_YAML = "best.yaml"


def checkpoint_name(step: int) -> str:
    """``checkpoint-00000100`` for step 100: the name of a checkpoint dir in a run."""
    if int(step) < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"{CHECKPOINT_PREFIX}{int(step):0{STEP_DIGITS}d}"


def hf_checkpoint_name(step: int) -> str:
    """``checkpoint-100``: the dir HF Trainer saves step 100 to in a worker's scratch space."""
    return f"{CHECKPOINT_PREFIX}{int(step)}"


def parse_step(name: str) -> int | None:
    """The step of a dir named ``checkpoint-<digits>`` (any path ending in one), else ``None``."""
    m = CHECKPOINT_RE.fullmatch(posixpath.basename(str(name).rstrip("/")))
    return int(m.group(1)) if m else None


def trial_name(trial_id: str) -> str:
    """``trial-003`` for Ray Tune's ``<experiment>_00003`` ids (random and grid search), else ``trial-<id>``."""
    head, _, tail = str(trial_id).rpartition("_")
    if head and tail.isdigit():
        return f"{TRIAL_PREFIX}{int(tail):03d}"
    return f"{TRIAL_PREFIX}{trial_id}"


def is_trial(name: str) -> bool:
    return str(name).startswith(TRIAL_PREFIX)


def train_snapshot_name() -> str:
    """The file Ray Train keeps in a run dir about the checkpoints it was told of."""
    try:
        from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME as name
    except ImportError:  # pragma: no cover - a Ray that moved it
        name = "checkpoint_manager_snapshot.json"
    return name


def run_uri(storage_path: str, name: str) -> str:
    """Where run ``name`` of storage root ``storage_path`` lives, as users see it (no I/O)."""
    base = str(storage_path)
    return st.join(base if st.is_s3(base) else st.local_path(base), name)


@dataclass(frozen=True)
class RunDir:
    """A run (or sweep) directory: its filesystem, native path and URI, and every file in it."""

    fs: Any
    path: str
    uri: str

    @classmethod
    def of(cls, spec: Any) -> RunDir:
        """The run dir of a spec: ``{storage.path}/{name}`` with the spec's endpoint and credentials."""
        fs, root = st.open(spec.storage)
        return cls(fs, st.fs_join(root, spec.name), run_uri(spec.storage.path, spec.name))

    @classmethod
    def at(cls, target: str, *, storage: Any = None, endpoint_url: str | None = None) -> RunDir:
        """The dir at a local path or s3:// URI (with ``storage``'s endpoint and keys when given)."""
        fs, path = st.open(target, storage=storage, endpoint_url=endpoint_url)
        return cls(fs, path, f"s3://{path}" if st.is_s3(str(target)) else path)

    # ---- paths (native to fs) and URIs

    def join(self, *parts: str) -> str:
        return st.fs_join(self.path, *parts)

    def uri_of(self, *parts: str) -> str:
        return st.join(self.uri, *parts)

    def child(self, name: str) -> RunDir:
        """A run dir inside this one (a sweep's trial)."""
        return RunDir(self.fs, self.join(name), self.uri_of(name))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    @property
    def spec_file(self) -> str:
        return self.join(SPEC)

    @property
    def metrics_file(self) -> str:
        return self.join(METRICS)

    @property
    def tensorboard_dir(self) -> str:
        return self.join(TENSORBOARD)

    @property
    def tokenizer_dir(self) -> str:
        return self.join(TOKENIZER)

    @property
    def final_dir(self) -> str:
        return self.join(FINAL)

    @property
    def final_uri(self) -> str:
        return self.uri_of(FINAL)

    def checkpoint(self, step: int) -> str:
        return self.join(checkpoint_name(step))

    # sweeps
    @property
    def tune_dir(self) -> str:
        return self.join(TUNE_DIR)

    @property
    def results_file(self) -> str:
        return self.join(RESULTS_CSV)

    @property
    def best_file(self) -> str:
        return self.join(BEST_YAML)

    @property
    def sweep_spec_file(self) -> str:
        return self.join(SWEEP_SPEC)

    # ---- reading and writing

    def exists(self) -> bool:
        return st.exists(self.fs, self.path)

    def read_final_results(self) -> Any:
        """``final/final_results.json`` parsed (None when absent; ValueError when not JSON)."""
        return st.read_json(self.fs, self.join(FINAL, FINAL_RESULTS))

    def read_final_state(self) -> Any:
        """``final/trainer_state.json`` parsed (None when absent; ValueError when not JSON)."""
        return st.read_json(self.fs, self.join(FINAL, TRAINER_STATE))

    def has_final_results(self) -> bool:
        return st.exists(self.fs, self.join(FINAL, FINAL_RESULTS))

    def write_spec(self, spec_yaml: str) -> None:
        st.write_bytes(self.fs, self.spec_file, spec_yaml.encode())

    def move_aside(self) -> str | None:
        """``--fresh``: move the dir aside (never delete it) to ``{path}.old-{UTC time}-{random}``; where it went."""
        if not self.exists():
            return None
        import uuid

        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        aside = f"{self.path}.old-{stamp}-{uuid.uuid4().hex[:6]}"  # two --fresh in one second must not collide
        if st.is_local_fs(self.fs):
            os.rename(self.path, aside)
        else:
            for rel in st.list_files(self.fs, self.path):
                self.fs.copy_file(st.fs_join(self.path, rel), st.fs_join(aside, rel))
            st.delete_dir(self.fs, self.path)
        return aside

    def mark_stopped(self, reason: str, step: int | None) -> None:
        """Record that the run ended without final/ (``interrupted``: Ctrl-C; ``stopped``: SIGTERM, as `rtf stop`
        sends; ``failed: …``) and its last committed step, so `rtf runs` reports it from this record."""
        st.write_json(self.fs, self.join(STOPPED), {
            "reason": reason, "step": step, "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})

    def clear_stopped(self) -> None:
        """A resumed run is no longer stopped: its record goes when it starts again."""
        st.delete_file(self.fs, self.join(STOPPED))

    def read_stopped(self) -> Any:
        return st.read_json(self.fs, self.join(STOPPED))

    def forget_train_snapshot(self) -> None:
        """rtf resumes from its own manifests (the recipe reads them). Ray Train's snapshot of the checkpoints
        it was told about still lists those rtf has pruned since (storage.keep_checkpoints), and Ray Train
        refuses to start a run whose snapshot names a checkpoint that is gone: so it goes before every fit."""
        st.delete_file(self.fs, self.join(train_snapshot_name()))
