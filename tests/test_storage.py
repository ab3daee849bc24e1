"""raytune_ft.storage against a local dir and a real S3 HTTP endpoint (moto's server on 127.0.0.1)."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time

import pyarrow.fs as pafs
import pytest

from raytune_ft import storage as st
from raytune_ft.errors import StorageError, UserError
from tests.s3server import FAKE_ACCESS_KEY, FAKE_SECRET_KEY, S3Server, blackhole, free_port

pytest_plugins = ["tests.s3server"]  # fixtures: s3_server, s3_env, s3_bucket, s3_server_own, storage_root

SECRETS = (FAKE_ACCESS_KEY, FAKE_SECRET_KEY)


def no_secret(text: str) -> bool:
    return not any(s in text for s in SECRETS)


def err_text(exc: BaseException) -> str:
    return str(exc) + repr(exc) + repr(getattr(exc, "hint", ""))


def cfg(path: str, endpoint: str | None = None, **kw) -> st.StorageConfig:
    return st.StorageConfig(path=path, endpoint_url=endpoint, **kw)


# ------------------------------------------------------------------------------------------------
# URIs and settings (pure)


def test_uri_helpers():
    assert st.is_s3("s3://b/p") and not st.is_s3("/data/runs") and not st.is_s3("runs/s3://x")
    assert st.split_s3("s3://bkt/a/b/") == ("bkt", "a/b")
    assert st.split_s3("s3://bkt") == ("bkt", "")
    assert st.join("s3://bkt/runs/", "exp", "/checkpoint-00000001/") == "s3://bkt/runs/exp/checkpoint-00000001"
    assert st.join("s3://bkt", "x") == "s3://bkt/x"
    assert st.join("/data/runs", "exp", "ckpt") == "/data/runs/exp/ckpt"
    assert st.fs_join("bkt/runs/", "exp", "f.json") == "bkt/runs/exp/f.json"
    with pytest.raises(UserError):
        st.split_s3("s3:///key")
    with pytest.raises(UserError):
        st.split_s3("/local")


def test_endpoint_url_sources_and_validation(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://10.0.0.5:9000/")
    assert st.endpoint_url(cfg("s3://b")) == "http://10.0.0.5:9000"  # from the env
    assert st.endpoint_url(cfg("s3://b", "https://acct.r2.example.com")) == "https://acct.r2.example.com"
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert st.endpoint_url(cfg("s3://b")) is None  # AWS itself
    for bad in ("localhost:9000", "ftp://host:21", "http://host:9000/some/path"):
        with pytest.raises(StorageError):
            st.endpoint_url(cfg("s3://b", bad))
    with pytest.raises(StorageError) as e:
        st.endpoint_url(cfg("s3://b", f"http://{FAKE_ACCESS_KEY}:{FAKE_SECRET_KEY}@host:9000"))
    assert "carries credentials" in str(e.value) and no_secret(err_text(e.value))


def test_credentials_come_from_the_named_env_vars(monkeypatch):
    for n in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "R2_KEY", "R2_SECRET"):
        monkeypatch.delenv(n, raising=False)
    named = cfg("s3://b", access_key_env="R2_KEY", secret_key_env="R2_SECRET")
    # default names, unset: the default AWS chain
    assert st.credentials(cfg("s3://b")) is None
    # custom names, unset: an error naming them, no silent fallback to other credentials
    with pytest.raises(StorageError, match=r"\$R2_KEY and \$R2_SECRET"):
        st.credentials(named)
    monkeypatch.setenv("R2_KEY", FAKE_ACCESS_KEY)
    with pytest.raises(StorageError, match=r"\$R2_KEY is set but \$R2_SECRET is not") as e:
        st.credentials(named)
    assert no_secret(err_text(e.value))
    monkeypatch.setenv("R2_SECRET", FAKE_SECRET_KEY)
    creds = st.credentials(named)
    assert (creds.access_key, creds.secret_key, creds.session_token) == (FAKE_ACCESS_KEY, FAKE_SECRET_KEY, None)
    assert no_secret(repr(creds))


def test_scrub_replaces_every_key_value(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET_KEY)
    text = st.scrub(f"boom: key={FAKE_ACCESS_KEY} secret={FAKE_SECRET_KEY}")
    assert text == "boom: key=*** secret=***"


# ------------------------------------------------------------------------------------------------
# Filesystems


def test_local_filesystem_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, root = st.pyarrow_filesystem(cfg("./rtf_runs"))
    assert isinstance(fs, pafs.LocalFileSystem)
    assert root == str(tmp_path / "rtf_runs")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert st.pyarrow_filesystem(cfg("~/x"))[1] == str(tmp_path / "x")


def test_s3_filesystem_settings(monkeypatch):
    monkeypatch.setenv("MY_KEY", FAKE_ACCESS_KEY)
    monkeypatch.setenv("MY_SECRET", FAKE_SECRET_KEY)
    monkeypatch.delenv("MY_TOKEN", raising=False)
    storage = cfg("s3://bkt/runs/a", "http://127.0.0.1:9000", region="eu-west-1",
                  access_key_env="MY_KEY", secret_key_env="MY_SECRET", session_token_env="MY_TOKEN")
    fs, root = st.pyarrow_filesystem(storage, connect_timeout=2, request_timeout=7)
    assert isinstance(fs, pafs.S3FileSystem) and root == "bkt/runs/a"
    native = pafs.S3FileSystem.__reduce__(fs)[1][0]  # the options the C++ filesystem really holds
    assert native["endpoint_override"] == "127.0.0.1:9000" and native["scheme"] == "http"
    assert native["region"] == "eu-west-1"
    assert (native["connect_timeout"], native["request_timeout"]) == (2.0, 7.0)
    assert (native["access_key"], native["secret_key"]) == (FAKE_ACCESS_KEY, FAKE_SECRET_KEY)
    assert no_secret(repr(fs))


def test_s3_filesystem_pickles_env_var_names_not_keys(s3_env, s3_bucket, monkeypatch):
    """Ray pickles RunConfig.storage_filesystem (Tune writes it into tuner.pkl in the bucket)."""
    import ray.cloudpickle

    fs, root = st.pyarrow_filesystem(cfg(f"s3://{s3_bucket}/r", s3_env.endpoint_url))
    for blob in (pickle.dumps(fs), ray.cloudpickle.dumps(fs)):
        assert FAKE_SECRET_KEY.encode() not in blob and FAKE_ACCESS_KEY.encode() not in blob
    # what a plain S3FileSystem would have leaked (why the subclass exists)
    plain = pafs.S3FileSystem(access_key=FAKE_ACCESS_KEY, secret_key=FAKE_SECRET_KEY)
    assert FAKE_SECRET_KEY.encode() in pickle.dumps(plain)
    # unpickled in a process that has the env vars, it works against the server
    fs2 = pickle.loads(pickle.dumps(fs))
    assert isinstance(fs2, pafs.S3FileSystem)
    st.write_json(fs2, f"{root}/x.json", {"a": 1})
    assert st.read_json(fs, f"{root}/x.json") == {"a": 1}
    # without them, a clear error naming the variable, not a silent anonymous client
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match=r"\$AWS_ACCESS_KEY_ID is set but \$AWS_SECRET_ACCESS_KEY is not"):
        pickle.loads(pickle.dumps(fs))


def test_ray_train_persists_a_checkpoint_through_it(s3_env, s3_bucket, tmp_path):
    """What Ray Train does with RunConfig(storage_filesystem=fs, storage_path=root): ship the
    storage context to a worker (pickled) and upload a checkpoint dir through it."""
    import ray.cloudpickle
    from ray.train import Checkpoint, RunConfig
    from ray.train.v2._internal.execution.storage import StorageContext

    fs, root = st.pyarrow_filesystem(cfg(f"s3://{s3_bucket}/runs", s3_env.endpoint_url))
    blob = ray.cloudpickle.dumps(RunConfig(name="exp", storage_filesystem=fs, storage_path=root))
    assert FAKE_SECRET_KEY.encode() not in blob and FAKE_ACCESS_KEY.encode() not in blob
    context = ray.cloudpickle.loads(ray.cloudpickle.dumps(
        StorageContext(storage_path=root, experiment_dir_name="exp", storage_filesystem=fs)))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "weights.bin").write_bytes(b"w" * 4096)
    context.persist_current_checkpoint(Checkpoint.from_directory(str(tmp_path / "ckpt")), "checkpoint-00000010")
    files = st.list_files(fs, st.fs_join(root, "exp"))
    assert files["checkpoint-00000010/weights.bin"].size == 4096


def test_helpers_roundtrip(storage_root, tmp_path):
    uri, endpoint = storage_root
    fs, root = st.pyarrow_filesystem(cfg(uri, endpoint))
    assert st.list_dirs(fs, root) == [] and st.list_files(fs, root) == {}
    assert st.read_json(fs, st.fs_join(root, "missing.json")) is None

    st.write_json(fs, st.fs_join(root, "run", "state.json"), {"step": 3, "name": "ü"})
    assert st.read_json(fs, st.fs_join(root, "run", "state.json")) == {"step": 3, "name": "ü"}

    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "a.bin").write_bytes(os.urandom(70_000))
    (src / "sub" / "deeper" / "b.txt").write_text("hello")
    st.upload_dir(str(src), fs, st.fs_join(root, "run", "checkpoint-00000001"))
    st.upload_dir(str(src), fs, st.fs_join(root, "run", "checkpoint-00000002"))
    assert st.list_dirs(fs, st.fs_join(root, "run")) == ["checkpoint-00000001", "checkpoint-00000002"]
    files = st.list_files(fs, st.fs_join(root, "run", "checkpoint-00000001"))
    assert {k: v.size for k, v in files.items()} == {"a.bin": 70_000, "sub/deeper/b.txt": 5}

    out = tmp_path / "out"
    st.download_dir(fs, st.fs_join(root, "run", "checkpoint-00000002"), str(out))
    assert (out / "a.bin").read_bytes() == (src / "a.bin").read_bytes()
    assert (out / "sub" / "deeper" / "b.txt").read_text() == "hello"

    st.delete_dir(fs, st.fs_join(root, "run", "checkpoint-00000001"))
    st.delete_dir(fs, st.fs_join(root, "run", "never-existed"))  # no error
    assert st.list_dirs(fs, st.fs_join(root, "run")) == ["checkpoint-00000002"]
    assert st.exists(fs, st.fs_join(root, "run", "state.json"))


# ------------------------------------------------------------------------------------------------
# Preflight: success


def test_preflight_ok(storage_root):
    uri, endpoint = storage_root
    storage = cfg(uri, endpoint)
    msg = st.preflight(storage)
    assert "writable" in msg and no_secret(msg)
    fs, root = st.pyarrow_filesystem(storage)
    assert st.list_files(fs, root) == {}  # the marker was deleted again
    if endpoint:
        assert uri in msg and endpoint in msg


# ------------------------------------------------------------------------------------------------
# Preflight: each failure its own message and kind


def _preflight_error(storage, **kw) -> StorageError:
    with pytest.raises(StorageError) as e:
        st.preflight(storage, **kw)
    assert no_secret(err_text(e.value)), err_text(e.value)
    assert "\n" not in e.value.message  # one line (the hint is separate)
    return e.value


def test_preflight_wrong_port_is_unreachable(s3_env, s3_bucket):
    endpoint = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    err = _preflight_error(cfg(f"s3://{s3_bucket}/p", endpoint))
    assert time.monotonic() - t0 < 10
    assert err.kind == "unreachable"
    assert err.message == f"cannot reach S3 endpoint {endpoint}: connection refused"


def test_preflight_unknown_host_is_unreachable(s3_env):
    err = _preflight_error(cfg("s3://bkt/p", "http://rtf-no-such-host.invalid:9000"))
    assert err.kind == "unreachable"
    assert "rtf-no-such-host.invalid:9000" in err.message and "host not found" in err.message


def test_preflight_stalled_server_fails_in_bounded_time(s3_env):
    with blackhole() as endpoint:
        t0 = time.monotonic()
        err = _preflight_error(cfg("s3://bkt/p", endpoint), timeout=0.5, max_attempts=1)
        assert time.monotonic() - t0 < 6
    assert err.kind == "unreachable" and "timed out" in err.message


def test_pyarrow_on_stalled_server_fails_in_bounded_time(s3_env):
    with blackhole() as endpoint:
        fs, root = st.pyarrow_filesystem(cfg("s3://bkt/p", endpoint), connect_timeout=1, request_timeout=0.5, max_attempts=2)
        t0 = time.monotonic()
        with pytest.raises(OSError) as e:
            fs.get_file_info(pafs.FileSelector(root))
        assert time.monotonic() - t0 < 8
    assert st.classify_pyarrow_error(e.value) == ("unreachable", "timed out")


def test_preflight_missing_bucket(s3_env):
    err = _preflight_error(cfg("s3://rtf-no-such-bucket/p", s3_env.endpoint_url))
    assert err.kind == "no_bucket"
    assert err.message == f"bucket 'rtf-no-such-bucket' does not exist at {s3_env.endpoint_url}"


# moto validates keys, signatures and policies once its IAM auth is on: these are real error
# responses over HTTP, classified by our code.


def test_preflight_unknown_access_key(s3_env, s3_bucket):
    with s3_env.iam_auth():
        err = _preflight_error(cfg(f"s3://{s3_bucket}/p", s3_env.endpoint_url))
    assert err.kind == "bad_key"
    assert "does not recognise the access key in $AWS_ACCESS_KEY_ID" in err.message


def test_preflight_wrong_secret_key(s3_env, s3_bucket, monkeypatch):
    key, _secret = s3_env.create_iam_user()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)  # a real key, with the wrong (fake) secret
    with s3_env.iam_auth():
        err = _preflight_error(cfg(f"s3://{s3_bucket}/p", s3_env.endpoint_url))
    assert err.kind == "bad_secret"
    assert "secret key in $AWS_SECRET_ACCESS_KEY does not match" in err.message
    assert key not in err_text(err) and FAKE_SECRET_KEY not in err_text(err)


def test_preflight_good_iam_user_passes(s3_env, s3_bucket, monkeypatch):
    key, secret = s3_env.create_iam_user(("s3:*",))
    monkeypatch.setenv("RTF_KEY", key)
    monkeypatch.setenv("RTF_SECRET", secret)
    storage = cfg(f"s3://{s3_bucket}/p", s3_env.endpoint_url, access_key_env="RTF_KEY", secret_key_env="RTF_SECRET")
    with s3_env.iam_auth():
        msg = st.preflight(storage)
    assert "credentials accepted" in msg and secret not in msg and key not in msg


@pytest.mark.parametrize(
    "actions, verb",
    [
        (("s3:GetObject",), "list"),
        (("s3:ListBucket",), "write to"),
        (("s3:ListBucket", "s3:PutObject"), "delete objects in"),
    ],
)
def test_preflight_missing_permission(s3_env, s3_bucket, monkeypatch, actions, verb):
    key, secret = s3_env.create_iam_user(actions)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with s3_env.iam_auth():
        err = _preflight_error(cfg(f"s3://{s3_bucket}/p", s3_env.endpoint_url))
    assert err.kind == "denied"
    assert err.message == (
        f"access denied: the credentials in $AWS_ACCESS_KEY_ID may not {verb} "
        f"s3://{s3_bucket}/p at {s3_env.endpoint_url}"
    )
    assert secret not in err_text(err) and key not in err_text(err)


def test_pyarrow_errors_are_classified_too(s3_env, s3_bucket, monkeypatch):
    """The CLI reads through pyarrow: its errors get the same kinds and messages."""
    def kind_of(storage) -> str:
        fs, root = st.pyarrow_filesystem(storage, max_attempts=1)
        with pytest.raises(StorageError) as e, st.storage_errors(storage, "list"):
            fs.get_file_info(pafs.FileSelector(root))
        assert no_secret(err_text(e.value))
        return e.value.kind

    assert kind_of(cfg("s3://rtf-no-such-bucket/p", s3_env.endpoint_url)) == "no_bucket"
    assert kind_of(cfg(f"s3://{s3_bucket}/p", f"http://127.0.0.1:{free_port()}")) == "unreachable"
    key, _ = s3_env.create_iam_user()
    storage = cfg(f"s3://{s3_bucket}/p", s3_env.endpoint_url)
    with s3_env.iam_auth():
        assert kind_of(storage) == "bad_key"
        # a HEAD (what reading one known file starts with) gets a 403 without a body: we say so
        fs, root = st.pyarrow_filesystem(storage, max_attempts=1)
        with pytest.raises(StorageError) as e, st.storage_errors(storage, "read"):
            st.read_bytes(fs, f"{root}/rtf_checkpoint.json")
        assert e.value.kind == "forbidden" and "wrong keys or a missing permission" in e.value.message
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
        assert kind_of(storage) == "bad_secret"


def test_preflight_no_credentials_at_all(s3_env, s3_bucket, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    err = _preflight_error(cfg(f"s3://{s3_bucket}/p", s3_env.endpoint_url))
    assert err.kind == "no_credentials"


# ------------------------------------------------------------------------------------------------
# Preflight: local


def test_local_preflight_file_in_the_way(tmp_path):
    (tmp_path / "afile").write_text("x")
    err = _preflight_error(cfg(str(tmp_path / "afile")))
    assert err.message == f"storage directory {tmp_path / 'afile'}: it is a file, not a directory"
    err = _preflight_error(cfg(str(tmp_path / "afile" / "runs")))
    assert f"{tmp_path / 'afile'} is a file, not a directory" in err.message


def test_local_preflight_creates_the_dir(tmp_path):
    target = tmp_path / "a" / "b"
    st.preflight(cfg(str(target)))
    assert target.is_dir() and list(target.iterdir()) == []


_READONLY_SCRIPT = """
import sys
from raytune_ft import storage as st
from raytune_ft.errors import StorageError
try:
    st.preflight(st.StorageConfig(path=sys.argv[1]))
except StorageError as e:
    print("ERR", e.message)
else:
    print("OK")
"""


def test_local_preflight_read_only_dir():
    base = tempfile.mkdtemp(prefix="rtf-ro-")
    try:
        os.chmod(base, 0o755)  # readable by all, writable only by its owner (root here)
        cmd = [sys.executable, "-c", _READONLY_SCRIPT]
        if os.geteuid() == 0:
            if not shutil.which("setpriv"):
                pytest.skip("running as root without setpriv: cannot make a directory read-only")
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        elif os.access(base, os.W_OK):
            os.chmod(base, 0o555)
        repo = os.path.dirname(os.path.dirname(os.path.abspath(st.__file__)))
        env = {**os.environ, "PYTHONPATH": repo}
        probe = subprocess.run([*cmd[:-2], "-c", "import raytune_ft.storage"], capture_output=True, env=env, timeout=60)
        if probe.returncode != 0:
            pytest.skip("the unprivileged user cannot run this Python/checkout")
        for target in (base, os.path.join(base, "new")):
            out = subprocess.run([*cmd, target], capture_output=True, text=True, env=env, timeout=60)
            assert out.stdout.startswith("ERR storage directory"), out.stdout + out.stderr
            assert ("not writable" in out.stdout) if target == base else ("cannot create it" in out.stdout)
            assert "Permission denied" in out.stdout
    finally:
        os.chmod(base, 0o755)
        shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# The test server itself: goes away for real, comes back on the same port with its data


def test_s3_server_stop_and_restart(s3_server_own, tmp_path):
    srv: S3Server = s3_server_own
    bucket = srv.create_bucket()
    storage = cfg(f"s3://{bucket}/r", srv.endpoint_url)
    fs, root = st.pyarrow_filesystem(storage, max_attempts=1)
    st.write_json(fs, f"{root}/a.json", [1])
    client = st.boto3_client(storage, max_attempts=1)
    client.list_objects_v2(Bucket=bucket)  # leaves a pooled keep-alive connection
    port = srv.port

    srv.stop()
    t0 = time.monotonic()
    with pytest.raises(StorageError) as e, st.storage_errors(storage, "list"):
        client.list_objects_v2(Bucket=bucket)
    assert e.value.kind == "unreachable"
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):
        st.read_json(fs, f"{root}/a.json")
    assert time.monotonic() - t0 < 10

    srv.restart()
    assert srv.port == port
    assert st.read_json(fs, f"{root}/a.json") == [1]
    assert client.list_objects_v2(Bucket=bucket)["KeyCount"] == 1


def test_s3_server_stop_cuts_a_request_in_flight(s3_server_own):
    import socket

    srv: S3Server = s3_server_own
    bucket = srv.create_bucket()
    conn = socket.create_connection((srv.host, srv.port), timeout=5)
    # an upload whose body is still coming when the server goes away
    conn.sendall(f"PUT /{bucket}/big HTTP/1.1\r\nHost: {srv.host}\r\nContent-Length: 1000000\r\n\r\n".encode())
    conn.sendall(b"x" * 1000)
    time.sleep(0.2)
    t0 = time.monotonic()
    srv.stop()
    try:
        assert conn.recv(100) == b""  # closed by the server, not left hanging
    except ConnectionResetError:
        pass
    assert time.monotonic() - t0 < 3
    conn.close()
