"""Moving big files between a local disk and a storage root (either backend), each byte read once.

* :func:`upload_dir`: a local directory up, a few files at a time, every file hashed (sha256) while it streams,
  so a checkpoint's manifest costs no second read of a multi-GB file.
* :func:`fetch_file`: one file down into a local path, continuing what an earlier, interrupted fetch left
  there (checked first), hashed while it streams, refused when it does not match the expected size and
  sha256. :func:`lock_dir` keeps two such downloads out of one directory.

Paths on ``fs`` are native to it, as in :mod:`raytune_ft.storage.core`.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import posixpath
import shutil
from typing import TYPE_CHECKING, Any

from raytune_ft.errors import StorageError, UserError
from raytune_ft.storage.core import is_local_fs, local_path

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow.fs

# Bounded parallelism of :func:`upload_dir`. Files go up UPLOAD_FILES_AT_ONCE at a time, each read once: the
# bytes are hashed (sha256) as they are written, so the digests a manifest needs cost no second read of a
# multi-GB file. Per file, pyarrow (26) does the rest on S3: its output stream cuts the bytes into 10 MiB parts
# (Arrow's kPartUploadSize: 10,000 parts make its limit of ~98 GB per file; a file under one part goes as one
# PUT) and, with S3Options.background_writes (on by default), each part is sent from Arrow's I/O thread pool
# (pyarrow.io_thread_count(), 8 unless changed, shared by all files) while we read the next one. Those
# background parts are copied and queued without limit, so a disk faster than the network would hold most of
# a big file in memory: every UPLOAD_WINDOW_BYTES written we flush, which waits for the parts in flight. At
# most about UPLOAD_FILES_AT_ONCE * (UPLOAD_WINDOW_BYTES + 10 MiB) is buffered.
UPLOAD_FILES_AT_ONCE = 4
UPLOAD_WINDOW_BYTES = 64 << 20
UPLOAD_READ_BYTES = 8 << 20


def _hash_copy(src: str, out: Any, window: int | None) -> tuple[int, str]:
    """Write the file ``src`` to the open stream ``out``, hashing it on the way: ``(size, sha256)``."""
    h, size, since_flush = hashlib.sha256(), 0, 0
    with builtins.open(src, "rb") as f:
        while chunk := f.read(UPLOAD_READ_BYTES):
            h.update(chunk)  # releases the GIL: the files' threads hash in parallel
            out.write(chunk)
            size += len(chunk)
            since_flush += len(chunk)
            if window and since_flush >= window:
                out.flush()  # S3: waits for the background parts in flight (bounds the memory they hold)
                since_flush = 0
    return size, h.hexdigest()


def upload_dir(local_dir: str, fs: pyarrow.fs.FileSystem, dest_path: str, *,
               exclude: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Copy the contents of a local directory to ``dest_path`` on ``fs`` (recursively), each file read once.

    Returns ``[{path, size, sha256}]`` of what was written (relative posix paths, sorted): the same as a
    separate hashing pass over the local dir would give (:func:`raytune_ft.checkpoints.file_digests`), for
    one read instead of two. ``exclude``: relative paths not to upload (a manifest, which goes last).
    """
    local_dir = local_path(local_dir)
    if not os.path.isdir(local_dir):
        raise UserError(f"not a directory: {local_dir}")
    files = sorted(
        (os.path.relpath(os.path.join(root, name), local_dir).replace(os.sep, "/"), os.path.join(root, name))
        for root, _, names in os.walk(local_dir) for name in names
    )
    files = [(rel, full) for rel, full in files if rel not in exclude and os.path.isfile(full)]
    local = is_local_fs(fs)
    if local:
        fs.create_dir(dest_path, recursive=True)

    def put(item: tuple[str, str]) -> dict[str, Any]:
        rel, src = item
        target = posixpath.join(dest_path, rel)
        if local:  # the same single pass (pyarrow's copy_files would copy, then a hash pass would read again)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with builtins.open(target, "wb") as out:
                size, sha = _hash_copy(src, out, None)
        else:
            # Object stores: one object per file and no directory markers. pyarrow's copy_files writes a "dir/"
            # marker object per directory level; SeaweedFS turns those into real directories that outlive the
            # deletion of their files, so a pruned checkpoint would stay listed as an empty dir.
            with fs.open_output_stream(target) as out:
                size, sha = _hash_copy(src, out, UPLOAD_WINDOW_BYTES)
        return {"path": rel, "size": size, "sha256": sha}

    from concurrent.futures import ThreadPoolExecutor

    files.sort(key=lambda item: -os.path.getsize(item[1]))  # the biggest first: the last to finish is a small one
    with ThreadPoolExecutor(max_workers=max(1, min(UPLOAD_FILES_AT_ONCE, len(files)))) as pool:
        done = list(pool.map(put, files))  # re-raises the first failure
    return sorted(done, key=lambda e: e["path"])


# ----------------------------------------------------------------------------------------------------
# Downloads

FETCH_READ_BYTES = 1 << 20


class DigestMismatch(StorageError):
    """A fetched file does not have the expected size and sha256."""

    def __init__(self, size: int, sha256_ok: bool) -> None:
        super().__init__(f"{size} bytes; sha256 {'ok' if sha256_ok else 'differs'}")
        self.size, self.sha256_ok = size, sha256_ok


def lock_dir(path: str) -> int:
    """An exclusive lock on the directory ``path``, or UserError when another process holds it; returns the fd to
    close when done. The lock moves with the directory when it is renamed and goes away with the process."""
    fd = os.open(path, os.O_RDONLY)
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # pragma: no cover - not POSIX: no lock
        pass
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"another download into {os.path.basename(path)} is under way (or its process hangs); "
                        "wait for it, or stop it") from None
    return fd


def _sha256_prefix(path: str, size: int) -> Any:
    h = hashlib.sha256()
    with builtins.open(path, "rb") as f:
        left = size
        while left and (chunk := f.read(min(FETCH_READ_BYTES, left))):
            h.update(chunk)
            left -= len(chunk)
    return h


def _fetch(fs: pyarrow.fs.FileSystem, src: str, target: str, start: int, h: Any, limit: int) -> int:
    """Append ``src`` from byte ``start`` to ``target`` (which holds exactly ``start`` bytes, already in ``h``),
    hashing as it streams; read at most ``limit`` bytes (storage is not trusted to end where it should).
    A ranged read on S3 (``open_input_file`` seeks), a plain seek on a local disk."""
    got = 0
    with fs.open_input_file(src) as f, builtins.open(target, "ab" if start else "wb") as out:
        if start:
            f.seek(start)
        while got < limit and (chunk := f.read(min(FETCH_READ_BYTES, limit - got))):
            h.update(chunk)
            out.write(chunk)
            got += len(chunk)
    return got


def fetch_file(fs: pyarrow.fs.FileSystem, src: str, target: str, size: int, sha256: str) -> tuple[int, int]:
    """Make the local file ``target`` hold ``src``'s bytes, which must be ``size`` bytes with ``sha256``:
    ``(bytes kept from before, bytes read from storage)``; DigestMismatch when what storage gave does not match.

    What an earlier attempt left at ``target`` is trusted only as far as it checks: a whole file whose sha256
    matches is kept; a shorter one is continued from its length (its prefix re-hashed, the rest a ranged read),
    and fetched again from byte 0 when the whole then does not match; anything longer, or not a file, is
    dropped."""
    have = 0
    if os.path.isdir(target) and not os.path.islink(target):
        shutil.rmtree(target)
    elif os.path.lexists(target):
        have = os.path.getsize(target) if os.path.isfile(target) and not os.path.islink(target) else -1
        if have < 0 or have > size:
            os.remove(target)
            have = 0
    h = _sha256_prefix(target, have) if have else hashlib.sha256()
    if have == size and h.hexdigest() == sha256 and os.path.isfile(target):
        return have, 0
    if have == size:  # complete but other bytes: not trusted, fetched again
        have, h = 0, hashlib.sha256()
    fetched = _fetch(fs, src, target, have, h, size - have + 1)
    reused = have
    if have and (have + fetched != size or h.hexdigest() != sha256):  # the kept prefix was bad: once more, whole
        reused, h = 0, hashlib.sha256()
        fetched += _fetch(fs, src, target, 0, h, size + 1)
    total = os.path.getsize(target)
    if total != size or h.hexdigest() != sha256:
        raise DigestMismatch(total, h.hexdigest() == sha256)
    return reused, fetched
