"""Checkpoints under a run directory, and the manifest that commits them (design principle 5).

Layout, on a local disk or an S3-compatible store alike (paths native to a pyarrow filesystem)::

    {run}/checkpoint-00000100/            one dir per saved step, zero-padded to 8 digits
              model.safetensors, ...      whatever HF Trainer / peft saved (any depth)
              rtf_checkpoint.json         the manifest: written LAST, after every file exists

A checkpoint counts (is *committed*) only when its manifest exists, parses, names the dir's step,
and every file it lists exists with the listed size (``deep`` also re-hashes). Everything else is
*incomplete*, with the reason, and is never resumed from. Writing the manifest is a single object
PUT on S3 and a rename on a local disk, so a reader sees all of it or none of it.

Pruning rule (:func:`prune`):

* committed checkpoints: the newest ``keep_last`` (at least 2) are kept, plus the best one by
  ``best_metric``/``mode`` when a metric is given; the other committed ones are deleted;
* incomplete checkpoints newer than the newest committed one are never deleted: they may be
  uploading right now (``storage.upload: async`` marks them so: *uploading*). With no committed
  checkpoint at all, every incomplete one counts as newer;
* incomplete checkpoints older than the newest committed one are deleted: their writer has moved
  on, so they are debris of an interrupted upload.

A deletion removes the manifest first, so a half-deleted checkpoint reads as incomplete, never committed.

A run's ``final/`` is committed the same way (:func:`commit_dir`: same manifest, written last, its
``step`` the run's last step) and pulled the same way (:func:`resolve` takes ``{run}/final``).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import posixpath
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from raytune_ft import rundir as rd
from raytune_ft import storage as st
from raytune_ft.errors import StorageError, UserError
from raytune_ft.rundir import MANIFEST, RANK_DIGESTS, UPLOADING, parse_step

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow.fs

MANIFEST_FORMAT = "rtf-checkpoint"
MANIFEST_VERSION = 1
_CHUNK = 1 << 20
checkpoint_dir_name = rd.checkpoint_name  # the names come from the run dir's layout (raytune_ft.rundir)


class ManifestError(StorageError):
    """A manifest exists but cannot be read, or describes files that are not there."""


# ----------------------------------------------------------------------------------------------------
# Manifest


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_digests(local_dir: str) -> list[dict[str, Any]]:
    """``[{path, size, sha256}]`` for every file under ``local_dir`` (recursive, relative posix paths,
    sorted), except a manifest at the top."""
    root = os.path.abspath(local_dir)
    if not os.path.isdir(root):
        raise UserError(f"not a directory: {root}")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if rel == MANIFEST or not os.path.isfile(full):
                continue
            out.append({"path": rel, "size": os.path.getsize(full), "sha256": _sha256_file(full)})
    return sorted(out, key=lambda e: e["path"])


def _check_rel_path(p: Any) -> str:
    if not isinstance(p, str) or not p or p.startswith("/") or "\\" in p:
        raise ValueError(f"bad file path {p!r}")
    parts = p.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"bad file path {p!r}")
    return p


def _clean_metrics(metrics: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (metrics or {}).items():
        if isinstance(v, bool) or v is None or isinstance(v, str):
            out[str(k)] = v
            continue
        try:
            f = float(v)  # numpy / torch scalars too
        except (TypeError, ValueError):
            out[str(k)] = str(v)
            continue
        if not math.isfinite(f):
            out[str(k)] = None  # JSON has no NaN/inf; a diverged loss reads as null
        elif isinstance(v, int) or getattr(getattr(v, "dtype", None), "kind", "") in ("i", "u"):
            out[str(k)] = int(v)
        else:
            out[str(k)] = f
    return out


@dataclass(frozen=True)
class Manifest:
    step: int
    epoch: float | None
    files: tuple[dict[str, Any], ...]
    spec_hash: str | None
    metrics: dict[str, Any]
    created_at: str  # ISO 8601, UTC
    version: int = MANIFEST_VERSION

    @property
    def total_size(self) -> int:
        return sum(int(f["size"]) for f in self.files)

    @property
    def created(self) -> datetime:
        return datetime.fromisoformat(self.created_at.replace("Z", "+00:00"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT, "version": self.version, "step": self.step, "epoch": self.epoch,
            "created_at": self.created_at,
            "spec_hash": self.spec_hash,
            "metrics": dict(self.metrics),
            "total_size": self.total_size,
            "files": [dict(f) for f in self.files],
        }

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        """Validate a parsed manifest; ValueError says what is wrong."""
        if not isinstance(d, dict) or d.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"not an {MANIFEST_FORMAT} manifest")
        if d.get("version") != MANIFEST_VERSION:
            raise ValueError(f"manifest version {d.get('version')!r} is not supported (expected {MANIFEST_VERSION})")
        step = d.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"bad step {step!r}")
        files = d.get("files")
        if not isinstance(files, list):
            raise ValueError("no file list")
        clean = []
        for f in files:
            if not isinstance(f, dict):
                raise ValueError(f"bad file entry {f!r}")
            size, sha = f.get("size"), f.get("sha256")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ValueError(f"bad size for {f.get('path')!r}")
            if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
                raise ValueError(f"bad sha256 for {f.get('path')!r}")
            clean.append({"path": _check_rel_path(f.get("path")), "size": size, "sha256": sha})
        created_at = d.get("created_at")
        try:
            datetime.fromisoformat(str(created_at).replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"bad created_at {created_at!r}")
        epoch = d.get("epoch")
        if epoch is not None and not isinstance(epoch, (int, float)):
            raise ValueError(f"bad epoch {epoch!r}")
        metrics = d.get("metrics") or {}
        if not isinstance(metrics, dict):
            raise ValueError("metrics is not a mapping")
        spec_hash = d.get("spec_hash")
        return cls(
            step=step,
            epoch=epoch,
            files=tuple(clean),
            spec_hash=None if spec_hash is None else str(spec_hash),
            metrics=dict(metrics),
            created_at=str(created_at),
            version=MANIFEST_VERSION,
        )


def write_manifest(
    fs: pyarrow.fs.FileSystem,
    ckpt_path: str,
    *,
    step: int,
    epoch: float | None,
    files: list[dict[str, Any]],
    spec_hash: str | None,
    metrics: dict[str, Any] | None = None,
    check: bool = True,
) -> Manifest:
    """Commit the checkpoint at ``ckpt_path``: write its manifest, after its files.

    ``files`` is what :func:`~raytune_ft.storage.upload_dir` returned (or :func:`file_digests` of the
    local dir that was uploaded). With ``check`` (the
    default) every listed file must already be at ``ckpt_path`` with its size, else ManifestError
    and nothing is written: a checkpoint whose upload silently lost a file is never committed.
    """
    entries = tuple(
        {"path": _check_rel_path(f["path"]), "size": int(f["size"]), "sha256": str(f["sha256"])}
        for f in sorted(files, key=lambda e: e["path"])
    )
    if any(e["path"] == MANIFEST for e in entries):
        raise ValueError(f"{MANIFEST} cannot list itself")
    manifest = Manifest(
        step=int(step),
        epoch=None if epoch is None else float(epoch),
        files=entries,
        spec_hash=spec_hash,
        metrics=_clean_metrics(metrics),
        created_at=datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    )
    Manifest.from_dict(manifest.to_dict())  # what we write, we can read back
    if check:
        problems = verify(fs, ckpt_path, manifest)
        if problems:
            raise ManifestError(
                f"refusing to commit {ckpt_path}: " + "; ".join(problems[:5])
                + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
            )
    st.write_json(fs, st.fs_join(ckpt_path, MANIFEST), manifest.to_dict())
    return manifest


def commit_dir(
    local_dir: str,
    fs: pyarrow.fs.FileSystem,
    dest_path: str,
    *,
    step: int,
    epoch: float | None,
    spec_hash: str | None,
    metrics: dict[str, Any] | None = None,
) -> Manifest:
    """Upload the local dir ``local_dir`` to ``dest_path`` and commit it (the run's ``final/``).

    A manifest already at ``dest_path`` (an earlier attempt's) is deleted first, so an upload that
    stops midway leaves a dir that reads as uncommitted, never old manifest over new files."""
    st.delete_file(fs, st.fs_join(dest_path, MANIFEST))
    files = st.upload_dir(local_dir, fs, dest_path, exclude=(MANIFEST,))  # hashed while it streams: one read
    return write_manifest(fs, dest_path, step=step, epoch=epoch, files=files, spec_hash=spec_hash, metrics=metrics)


def read_manifest(fs: pyarrow.fs.FileSystem, ckpt_path: str) -> Manifest | None:
    """The manifest of ``ckpt_path``; ``None`` when there is none (not committed); ManifestError
    when one exists but is not a valid manifest."""
    path = st.fs_join(ckpt_path, MANIFEST)
    data = st.read_bytes(fs, path)
    if data is None:
        return None
    try:
        import json

        return Manifest.from_dict(json.loads(data.decode("utf-8")))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"unreadable manifest {path}: {exc}") from None


def _sha256_remote(fs: pyarrow.fs.FileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _problems(
    fs: pyarrow.fs.FileSystem,
    ckpt_path: str,
    manifest: Manifest,
    listing: dict[str, st.FileStat],
    deep: bool,
) -> list[str]:
    out = []
    for f in manifest.files:
        stat = listing.get(f["path"])
        if stat is None:
            out.append(f"{f['path']} is missing")
        elif stat.size != f["size"]:
            out.append(f"{f['path']} has {stat.size} bytes, manifest says {f['size']}")
        elif deep and _sha256_remote(fs, st.fs_join(ckpt_path, f["path"])) != f["sha256"]:
            out.append(f"{f['path']} has a different sha256 than the manifest")
    return out


def verify(fs: pyarrow.fs.FileSystem, ckpt_path: str, manifest: Manifest, deep: bool = False) -> list[str]:
    """Problems with ``ckpt_path`` against ``manifest``: a listed file missing or of another size
    (``deep``: or other bytes). Empty when the checkpoint is intact. Extra files are allowed."""
    return _problems(fs, ckpt_path, manifest, st.list_files(fs, ckpt_path), deep)


# ----------------------------------------------------------------------------------------------------
# Listing


@dataclass
class CheckpointInfo:
    name: str  # checkpoint-00000100
    path: str  # native to the filesystem
    step: int
    committed: bool
    reason: str | None = None  # why it is incomplete
    time: datetime | None = None  # manifest time (committed) or newest file mtime (incomplete), UTC
    size: int = 0  # bytes of every file in the dir, manifest included
    n_files: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    manifest: Manifest | None = None
    best: bool = False
    uploading: bool = False  # an asynchronous upload's marker and no manifest yet: in flight (or cut short)

    @property
    def status(self) -> str:
        return "committed" if self.committed else "uploading" if self.uploading else "incomplete"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "step": self.step,
            "status": self.status,
            "reason": self.reason,
            "time": self.time.isoformat() if self.time else None,
            "size": self.size,
            "files": self.n_files,
            "metrics": self.metrics,
            "best": self.best,
            "epoch": self.manifest.epoch if self.manifest else None,
            "spec_hash": self.manifest.spec_hash if self.manifest else None,
        }


def _check_mode(mode: str) -> str:
    if mode not in ("min", "max"):
        raise UserError(f"mode must be 'min' or 'max', got {mode!r}")
    return mode


def inspect_checkpoint(fs: pyarrow.fs.FileSystem, ckpt_path: str, *, deep: bool = False) -> CheckpointInfo:
    """Status of one checkpoint dir (committed, or incomplete with the reason)."""
    name = posixpath.basename(ckpt_path.rstrip("/"))
    step = parse_step(name)
    if step is None:
        raise UserError(f"{ckpt_path} is not a checkpoint dir (expected {rd.CHECKPOINT_PREFIX}<step>)")
    listing = st.list_files(fs, ckpt_path)
    info = CheckpointInfo(
        name=name,
        path=ckpt_path,
        step=step,
        committed=False,
        size=sum(s.size for s in listing.values()),
        n_files=sum(1 for p in listing if p != MANIFEST),
    )
    mtimes = [s.mtime for s in listing.values() if s.mtime is not None]
    info.time = datetime.fromtimestamp(max(mtimes), timezone.utc) if mtimes else None
    if not listing:
        info.reason = "empty"
        return info
    try:
        manifest = read_manifest(fs, ckpt_path) if MANIFEST in listing else None
    except ManifestError as exc:
        info.reason = f"bad manifest: {str(exc).split(': ', 1)[-1]}"
        return info
    if manifest is None:
        info.uploading = UPLOADING in listing
        info.reason = _upload_state(fs, ckpt_path, listing) if info.uploading else \
            "no manifest (upload unfinished or interrupted)"
        return info
    info.manifest = manifest
    info.metrics = dict(manifest.metrics)
    info.time = manifest.created
    if manifest.step != step:
        info.reason = f"manifest is for step {manifest.step}"
        return info
    problems = _problems(fs, ckpt_path, manifest, listing, deep)
    if problems:
        info.reason = problems[0] + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
        return info
    info.committed = True
    return info


def _upload_state(fs: pyarrow.fs.FileSystem, ckpt_path: str, listing: dict[str, Any]) -> str:
    """What an asynchronous upload's marker (rank 0's JSON: when it began, how many ranks) and files say."""
    marker = None
    with contextlib.suppress(OSError, ValueError):
        marker = st.read_json(fs, posixpath.join(ckpt_path, UPLOADING))
    ranks, started = (marker.get("world_size"), marker.get("started")) if isinstance(marker, dict) else (None, None)
    done = sum(1 for r in range(len(listing)) if RANK_DIGESTS.format(rank=r) in listing)
    ok = isinstance(started, float) and 0 < started < 1e11  # read from storage: a NaN or a huge value is no time
    since = f" since {datetime.fromtimestamp(started, timezone.utc):%H:%M:%S} UTC" if ok else ""
    return (f"asynchronous upload in flight{since}, {done} of {ranks if isinstance(ranks, int) else '?'} rank(s) "
            "done, no manifest yet (if the run has stopped, it was cut short)")


def _metric_value(info: CheckpointInfo, metric: str) -> float | None:
    v = info.metrics.get(metric)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def best_checkpoint(infos: list[CheckpointInfo], metric: str, mode: str = "min") -> CheckpointInfo | None:
    """The committed checkpoint with the lowest (``min``) or highest (``max``) ``metric``; on a
    tie the later step. ``None`` when no committed checkpoint reports the metric."""
    _check_mode(mode)
    scored = [(v, i.step, i) for i in infos if i.committed and (v := _metric_value(i, metric)) is not None]
    if not scored:
        return None
    sign = 1.0 if mode == "min" else -1.0
    return min(scored, key=lambda t: (sign * t[0], -t[1]))[2]


def list_checkpoints(
    fs: pyarrow.fs.FileSystem,
    run_path: str,
    *,
    best_metric: str | None = None,
    mode: str = "min",
    deep: bool = False,
) -> list[CheckpointInfo]:
    """Every ``checkpoint-<step>`` dir under ``run_path``, by step, each committed or incomplete
    (with why); with ``best_metric`` the best committed one has ``best=True``."""
    _check_mode(mode)
    infos = []
    for name in st.list_dirs(fs, run_path):
        if parse_step(name) is None:
            continue
        infos.append(inspect_checkpoint(fs, st.fs_join(run_path, name), deep=deep))
    infos.sort(key=lambda i: (i.step, i.name))
    if best_metric:
        best = best_checkpoint(infos, best_metric, mode)
        if best is not None:
            best.best = True
    return infos


def latest_committed(fs: pyarrow.fs.FileSystem, run_path: str) -> CheckpointInfo | None:
    """The committed checkpoint with the highest step (what a resume starts from); incomplete
    ones are skipped. ``None`` when there is none."""
    committed = [i for i in list_checkpoints(fs, run_path) if i.committed]
    return committed[-1] if committed else None


# ----------------------------------------------------------------------------------------------------
# Pruning


def plan_prune(
    infos: list[CheckpointInfo],
    keep_last: int,
    best_metric: str | None = None,
    mode: str = "min",
) -> tuple[list[CheckpointInfo], list[CheckpointInfo]]:
    """(keep, delete) by the rule in this module's docstring. Pure: no I/O."""
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 2:
        raise UserError(f"keep_last must be an integer >= 2 (got {keep_last!r}): a checkpoint may be "
                        "unreadable, so at least two are always kept")
    _check_mode(mode)
    committed = sorted((i for i in infos if i.committed), key=lambda i: i.step)
    keep_ids = {id(i) for i in committed[-keep_last:]}
    if best_metric:
        best = best_checkpoint(committed, best_metric, mode)
        if best is not None:
            keep_ids.add(id(best))
    newest_committed = committed[-1].step if committed else -1
    for i in infos:
        if not i.committed and i.step > newest_committed:
            keep_ids.add(id(i))  # may be uploading right now
    keep = [i for i in infos if id(i) in keep_ids]
    delete = [i for i in infos if id(i) not in keep_ids]
    return keep, delete


def delete_checkpoint(fs: pyarrow.fs.FileSystem, ckpt_path: str) -> None:
    """Delete a checkpoint dir, its manifest first (so it is never seen half-deleted as committed)."""
    st.delete_file(fs, st.fs_join(ckpt_path, MANIFEST))
    st.delete_dir(fs, ckpt_path)


def prune(
    fs: pyarrow.fs.FileSystem,
    run_path: str,
    keep_last: int,
    best_metric: str | None = None,
    mode: str = "min",
    *,
    dry_run: bool = False,
) -> list[CheckpointInfo]:
    """Delete the checkpoints under ``run_path`` that the rule above does not keep; return them
    (oldest first). ``dry_run`` only returns them."""
    infos = list_checkpoints(fs, run_path, best_metric=best_metric, mode=mode)
    _, delete = plan_prune(infos, keep_last, best_metric, mode)
    if not dry_run:
        for info in delete:
            delete_checkpoint(fs, info.path)
    return delete


# ----------------------------------------------------------------------------------------------------
# Pulling


def is_final(path: str) -> bool:
    """``path`` names a run's ``final/`` dir."""
    return posixpath.basename(path.rstrip("/")) == rd.FINAL


def resolve(fs: pyarrow.fs.FileSystem, path: str, step: int | None = None) -> str:
    """``path`` if it is a checkpoint dir or a run's ``final/``; for a run dir, its checkpoint at
    ``step``, else its latest committed one."""
    if is_final(path):
        if step is not None:
            raise UserError(f"--step picks a checkpoint of a run; {path} is the run's {rd.FINAL}/")
        return path.rstrip("/")
    if parse_step(path) is not None:
        if step is not None and parse_step(path) != step:
            raise UserError(f"{path} is step {parse_step(path)}, not {step}")
        return path
    infos = list_checkpoints(fs, path)
    if step is not None:
        match = [i for i in infos if i.step == step]
        if not match:
            raise UserError(f"no checkpoint for step {step} under {path}")
        return match[0].path
    committed = [i for i in infos if i.committed]
    if not committed:
        what = f"{len(infos)} incomplete" if infos else "no"
        raise UserError(f"no committed checkpoint under {path} ({what} checkpoint dirs)")
    return committed[-1].path


@dataclass(frozen=True)
class PullResult:
    """What :func:`pull` did: the manifest it checked against, and how much an earlier, interrupted pull into
    the same ``dest`` had left that could be kept (checked by size and sha256 first)."""

    manifest: Manifest
    dest: str
    reused_files: int = 0  # files kept whole from the interrupted pull
    reused_bytes: int = 0  # their bytes, plus the prefixes that were continued with a ranged read
    fetched_bytes: int = 0  # bytes read from storage this time


def partial_dir(fs: pyarrow.fs.FileSystem, ckpt_path: str, dest: str) -> str:
    """The hidden sibling of ``dest`` that a pull of ``ckpt_path`` fills before it is renamed to ``dest``.

    Its name is the same for the same (storage kind, checkpoint path, destination), so a pull that was
    interrupted (network, Ctrl-C, a killed process) is found again by the next one and continued."""
    dest = st.local_path(dest)
    key = hashlib.sha256(f"{fs.type_name}\0{ckpt_path.rstrip('/')}\0{dest}".encode()).hexdigest()[:12]
    return os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.partial-{key}")


class _Damaged(StorageError):
    """A file that came from storage does not match the manifest."""


def pull(fs: pyarrow.fs.FileSystem, ckpt_path: str, dest: str) -> PullResult:
    """Download a committed checkpoint into the local dir ``dest`` (which must not exist or be empty), ready
    for ``from_pretrained``/``PeftModel.from_pretrained``; resumable.

    Only the files the manifest lists are fetched, each checked for size and sha256 while it streams; the
    manifest is copied last. The files land in a hidden sibling dir (:func:`partial_dir`) that is renamed to
    ``dest`` only when all are good, so ``dest`` never holds a partial checkpoint. An interrupted pull leaves
    that dir behind, and pulling the same checkpoint to the same ``dest`` again continues it: files already
    complete there are kept when their size and sha256 match, a partly written one is continued from its
    length, anything else is fetched again. A file in storage that does not match the manifest removes the
    partial dir (StorageError): nothing there can make this checkpoint pullable.
    """
    manifest = read_manifest(fs, ckpt_path)
    if manifest is None and is_final(ckpt_path):
        raise StorageError(
            f"{ckpt_path} has no {MANIFEST}: its upload did not finish, or an rtf older than final/ manifests "
            "wrote it; refusing to pull unverified files (rtf generate/eval/merge still read it, with a note)"
        )
    if manifest is None:
        raise StorageError(f"{ckpt_path} is not committed (no {MANIFEST}); refusing to pull an incomplete checkpoint")
    problems = verify(fs, ckpt_path, manifest)
    if problems:
        raise StorageError(f"{ckpt_path} is incomplete: " + "; ".join(problems[:5]))
    dest = st.local_path(dest)
    if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise UserError(f"destination {dest} exists and is not an empty directory")
    tmp = partial_dir(fs, ckpt_path, dest)
    os.makedirs(tmp, exist_ok=True)
    lock = st.lock_dir(tmp)  # two pulls into one dest would write the same partial files
    reused_files = reused_bytes = fetched_bytes = 0
    try:
        wanted = {f["path"] for f in manifest.files}
        for rel in local_files(tmp):  # an older manifest's files, our own manifest: not part of this pull
            if rel not in wanted:
                os.remove(os.path.join(tmp, *rel.split("/")))
        for f in manifest.files:
            target = os.path.join(tmp, *f["path"].split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                reused, fetched = st.fetch_file(fs, st.fs_join(ckpt_path, f["path"]), target, f["size"], f["sha256"])
            except st.DigestMismatch as e:
                raise _Damaged(
                    f"{f['path']} in {ckpt_path} does not match its manifest ({e.size} bytes, manifest {f['size']}; "
                    f"sha256 {'ok' if e.sha256_ok else 'differs'}): the stored file was changed or damaged (or "
                    "changed while pulling); refusing it"
                ) from None
            reused_files += fetched == 0 and reused > 0
            reused_bytes += reused
            fetched_bytes += fetched
        st.write_json(_local_fs(), os.path.join(tmp, MANIFEST), manifest.to_dict())
        if os.path.isdir(dest):
            os.rmdir(dest)
        os.rename(tmp, dest)
    except _Damaged:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)
    return PullResult(manifest, dest, reused_files, reused_bytes, fetched_bytes)


def download(fs: pyarrow.fs.FileSystem, ckpt_path: str, dest: str) -> Manifest:
    """:func:`pull`, returning the manifest."""
    return pull(fs, ckpt_path, dest).manifest


def local_files(root: str) -> list[str]:
    """Every file under the local dir ``root``, as /-separated paths relative to it."""
    out = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            out.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return out


def _local_fs():
    import pyarrow.fs as pafs

    return pafs.LocalFileSystem()
