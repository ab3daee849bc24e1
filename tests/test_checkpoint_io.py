"""Big checkpoints (issue 13 item 4): uploads that hash while they stream, and pulls that continue where an
interrupted one stopped. On SeaweedFS (a real object store on 127.0.0.1) and on a local dir.

An interrupted pull is caused by :class:`Flaky`, a wrapper around the pyarrow filesystem that raises
``OSError`` once a set number of bytes has been read from storage. That is the way to cause it here: what a
pull must survive is losing the connection (or the process) at an arbitrary byte of a file, and a real store
cannot be made to stop at a chosen byte: stopping the server races with the reads, and pyarrow retries a
failed ranged GET on its own. The wrapper also counts the bytes each pull reads from storage, which is what
"only the missing part is fetched again" is about. Everything below it (SeaweedFS, pyarrow's S3 client, the
local files) is real.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from typer.testing import CliRunner

from raytune_ft import checkpoints as ck
from raytune_ft import storage as st
from raytune_ft.cli.checkpoints import app
from raytune_ft.errors import UserError
from tests.s3server import apply_env


class _CountingFile:
    def __init__(self, f, owner: Flaky) -> None:
        self.f, self.owner = f, owner

    def read(self, n: int = -1) -> bytes:
        o = self.owner
        if o.fail_after is not None:
            left = o.fail_after - o.read_bytes
            if left <= 0:
                if o.once:
                    o.fail_after = None  # the connection comes back
                raise OSError("connection reset by peer (injected)")
            n = left if n is None or n < 0 else min(n, left)
        data = self.f.read() if n is None or n < 0 else self.f.read(n)
        o.read_bytes += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


class Flaky:
    """The filesystem ``fs``, counting the bytes read through ``open_input_file``/``open_input_stream`` (the
    files' contents; listings and the manifest's own read count too, they are small) and, with
    ``fail_after``, raising OSError once that many have been read (every read after that, or with ``once``
    only that one)."""

    def __init__(self, fs, fail_after: int | None = None, once: bool = False) -> None:
        self.fs, self.fail_after, self.once, self.read_bytes = fs, fail_after, once, 0

    def open_input_file(self, path):
        return _CountingFile(self.fs.open_input_file(path), self)

    def open_input_stream(self, path):
        return _CountingFile(self.fs.open_input_stream(path), self)

    def __getattr__(self, name):
        return getattr(self.fs, name)


def make_checkpoint(root: Path) -> Path:
    """Three files like a (very small) HF checkpoint: two of some size, one tiny, one nested."""
    d = root / "local"
    (d / "sub").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(os.urandom(3_000_000))
    (d / "optimizer.pt").write_bytes(os.urandom(2_500_000))
    (d / "sub" / "trainer_state.json").write_text('{"global_step": 7}')
    return d


@pytest.fixture
def seaweed_fs(seaweed_server, monkeypatch):
    """(fs, run path, s3 URI of the run) in a new bucket of the session's SeaweedFS."""
    apply_env(monkeypatch, seaweed_server)
    uri = f"s3://{seaweed_server.create_bucket()}/runs/r"
    fs, path = st.pyarrow_filesystem(st.StorageConfig(uri, endpoint_url=seaweed_server.endpoint_url))
    return fs, path, uri, seaweed_server.endpoint_url


@pytest.fixture(params=["local", "seaweed"])
def store(request, tmp_path):
    if request.param == "local":
        return pafs.LocalFileSystem(), str(tmp_path / "storage" / "r"), None, None
    return request.getfixturevalue("seaweed_fs")


def committed(fs, run_path: str, tmp_path: Path) -> tuple[str, Path]:
    local = make_checkpoint(tmp_path)
    path = st.fs_join(run_path, ck.checkpoint_dir_name(7))
    ck.commit_dir(str(local), fs, path, step=7, epoch=1.0, spec_hash="h")
    return path, local


def verify_local(dest: Path) -> list[str]:
    lfs = pafs.LocalFileSystem()
    return ck.verify(lfs, str(dest), ck.read_manifest(lfs, str(dest)), deep=True)


# ------------------------------------------------------------------------------------------------
# Upload


def test_upload_returns_the_digests_a_separate_pass_would(store, tmp_path):
    fs, run_path, _, _ = store
    local = make_checkpoint(tmp_path)
    (local / "empty").write_bytes(b"")
    got = st.upload_dir(str(local), fs, st.fs_join(run_path, "x"))
    assert got == ck.file_digests(str(local))
    assert {k: v.size for k, v in st.list_files(fs, st.fs_join(run_path, "x")).items()} == {
        e["path"]: e["size"] for e in got}
    data = st.read_bytes(fs, st.fs_join(run_path, "x", "model.safetensors"))
    assert hashlib.sha256(data).hexdigest() == next(e["sha256"] for e in got if e["path"] == "model.safetensors")


def test_upload_window_flushes_do_not_change_the_bytes(seaweed_fs, tmp_path, monkeypatch):
    """A window smaller than a file: the flush that bounds pyarrow's buffered parts happens mid-file."""
    fs, run_path, _, _ = seaweed_fs
    monkeypatch.setattr("raytune_ft.storage.transfer.UPLOAD_WINDOW_BYTES", 1 << 20)
    monkeypatch.setattr("raytune_ft.storage.transfer.UPLOAD_READ_BYTES", 256 << 10)
    local = make_checkpoint(tmp_path)
    got = st.upload_dir(str(local), fs, st.fs_join(run_path, "w"))
    assert got == ck.file_digests(str(local))
    assert st.read_bytes(fs, st.fs_join(run_path, "w", "optimizer.pt")) == (local / "optimizer.pt").read_bytes()


def test_a_checkpoint_committed_by_the_streaming_path_verifies_deep(store, tmp_path):
    fs, run_path, _, _ = store
    path, local = committed(fs, run_path, tmp_path)
    info = ck.inspect_checkpoint(fs, path, deep=True)
    assert info.committed, info.reason
    assert list(info.manifest.files) == ck.file_digests(str(local))


# ------------------------------------------------------------------------------------------------
# Resumable pull


def test_an_interrupted_pull_continues_and_fetches_only_what_is_missing(store, tmp_path):
    fs, run_path, _, _ = store
    path, local = committed(fs, run_path, tmp_path)
    total = sum(e["size"] for e in ck.file_digests(str(local)))
    dest = tmp_path / "out" / "ckpt"
    cut = 4_000_000  # the first file whole (3 MB, files go in manifest order), a million bytes of the next
    broken = Flaky(fs, fail_after=cut)
    with pytest.raises(OSError, match="injected"):
        ck.pull(broken, path, str(dest))
    assert not dest.exists()  # never a partial checkpoint at dest
    partial = Path(ck.partial_dir(fs, path, str(dest)))
    assert partial.is_dir()
    on_disk = sum(p.stat().st_size for p in partial.rglob("*") if p.is_file())
    assert on_disk == cut - len(st.read_bytes(fs, st.fs_join(path, ck.MANIFEST)))  # what was read is what was kept

    again = Flaky(fs)
    before = again.read_bytes
    got = ck.pull(again, path, str(dest))
    manifest_bytes = len(st.read_bytes(fs, st.fs_join(path, ck.MANIFEST)))
    assert got.reused_bytes == on_disk and got.fetched_bytes == total - on_disk
    assert again.read_bytes - before == total - on_disk + manifest_bytes  # counted below the pull, at the store
    assert got.reused_files == 1  # model.safetensors kept whole; optimizer.pt continued from its length
    assert verify_local(dest) == []
    assert (dest / "optimizer.pt").read_bytes() == (local / "optimizer.pt").read_bytes()
    assert not partial.exists()


def test_a_damaged_partial_file_is_fetched_again_not_trusted(store, tmp_path):
    fs, run_path, _, _ = store
    path, local = committed(fs, run_path, tmp_path)
    dest = tmp_path / "ckpt"
    with pytest.raises(OSError):
        ck.pull(Flaky(fs, fail_after=4_000_000), path, str(dest))
    partial = Path(ck.partial_dir(fs, path, str(dest)))
    whole, part = partial / "model.safetensors", partial / "optimizer.pt"
    have = part.stat().st_size
    assert whole.stat().st_size == 3_000_000 and 0 < have < 2_500_000
    for f in (whole, part):  # same sizes, one byte flipped: only a hash can tell
        data = bytearray(f.read_bytes())
        data[100] ^= 0xFF
        f.write_bytes(bytes(data))
    (partial / "stale.bin").write_bytes(b"left by another checkpoint")  # not in the manifest: dropped

    again = Flaky(fs)
    got = ck.pull(again, path, str(dest))
    # model.safetensors fetched whole; optimizer.pt continued (its prefix re-hashed), found bad, fetched whole
    assert got.fetched_bytes == 3_000_000 + (2_500_000 - have) + 2_500_000 + len('{"global_step": 7}')
    assert got.reused_bytes == 0 and got.reused_files == 0
    assert verify_local(dest) == []
    assert not (dest / "stale.bin").exists()
    for name in ("model.safetensors", "optimizer.pt"):
        assert (dest / name).read_bytes() == (local / name).read_bytes()


def test_a_second_pull_into_the_same_dest_is_refused_while_one_is_under_way(tmp_path):
    """Two pulls into one dest would write the same partial files: the second one is refused at once."""
    fs = pafs.LocalFileSystem()
    path, _ = committed(fs, str(tmp_path / "storage" / "r"), tmp_path)
    dest = tmp_path / "ckpt"
    partial = ck.partial_dir(fs, path, str(dest))
    os.makedirs(partial)
    fd = os.open(partial, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a pull under way holds it
        with pytest.raises(UserError, match="another download"):
            ck.pull(fs, path, str(dest))
    finally:
        os.close(fd)
    assert verify_local(Path(ck.pull(fs, path, str(dest)).dest)) == []


def test_cli_pull_says_what_it_reused(seaweed_fs, tmp_path):
    fs, run_path, uri, endpoint = seaweed_fs
    path, local = committed(fs, run_path, tmp_path)
    dest = tmp_path / "model"
    with pytest.raises(OSError):
        ck.pull(Flaky(fs, fail_after=3_500_000), path, str(dest))
    result = CliRunner().invoke(app, ["pull", uri, str(dest), "--endpoint-url", endpoint], env={"COLUMNS": "220"})
    assert result.exit_code == 0, result.output
    assert "pulled checkpoint-00000007 (step 7, 3 files" in result.output
    assert "continued an interrupted pull" in result.output and "(1 whole files)" in result.output
    assert verify_local(dest) == []


def test_resume_continues_a_download_broken_midway(tmp_path):
    """The worker's pull of the checkpoint it resumes from: cut off once, it goes on from where it stopped
    within the same attempt, and fetches each byte once in all."""
    from raytune_ft.train.recipe import pull_to_resume

    fs = pafs.LocalFileSystem()
    path, local = committed(fs, str(tmp_path / "storage" / "r"), tmp_path)
    total = sum(e["size"] for e in ck.file_digests(str(local)))

    flaky = Flaky(fs, fail_after=4_000_000, once=True)
    got = pull_to_resume(flaky, path, str(tmp_path / "resume" / "checkpoint-00000007"))
    manifest_bytes = len(st.read_bytes(fs, st.fs_join(path, ck.MANIFEST)))
    assert got.reused_bytes == 4_000_000 - manifest_bytes and got.fetched_bytes == total - got.reused_bytes
    assert flaky.read_bytes == total + 2 * manifest_bytes  # the manifest is read by each try, the files once
    assert verify_local(Path(got.dest)) == []
