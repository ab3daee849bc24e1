"""A real S3-compatible HTTP endpoint on 127.0.0.1 for tests: moto's server mode.

Clients reach it over HTTP exactly as they would reach MinIO, R2 or Ceph (boto3 and pyarrow with
``endpoint_url=http://127.0.0.1:<port>``); nothing in-process is patched (no ``mock_aws``).

Use the fixtures by naming this module as a plugin in a test module or the root conftest::

    pytest_plugins = ["tests.s3server"]

    def test_upload(s3_env, s3_bucket):       # s3_env: the S3Server, with env vars set
        storage = StorageConfig(f"s3://{s3_bucket}/runs", endpoint_url=s3_env.endpoint_url)

Or without pytest: ``with S3Server() as srv: srv.create_bucket("b")``.

(PYTEST_DONT_REWRITE: this module is both imported and used as a plugin; it has no asserts.)

Behaviour worth knowing:

* moto keeps buckets, objects and IAM users in process-global backends: every server in one
  process sees the same buckets. Use :meth:`S3Server.create_bucket` (unique names by default).
* :meth:`S3Server.stop` really goes away: it closes the listening socket *and* every open
  keep-alive connection, so clients get "connection refused", not a hang. :meth:`S3Server.restart`
  listens again on the same port; the data survives, like a real server coming back.
* moto checks keys, signatures and IAM policies only while its IAM auth is on
  (:meth:`S3Server.iam_auth`). That switch is moto's process-global setting, flipped over HTTP
  (``POST /moto-api/reset-auth``), so it applies to every moto server in the process while on.
* Credentials are fake, distinctive values (:data:`FAKE_ACCESS_KEY`, :data:`FAKE_SECRET_KEY`) so
  tests can assert that they never show up in output.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

FAKE_ACCESS_KEY = "AKIARTFFAKETESTKEY01"
FAKE_SECRET_KEY = "rtfFakeSecret/DoNotPrint+4f0c2a9b7e1d"
REGION = "us-east-1"

# env vars that could make a client pick up credentials or endpoints from the machine running the tests
_UNSET = (
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (nothing will answer there: a 'wrong port')."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _make_handler():
    from moto.moto_server.werkzeug_app import MotoRequestHandler

    class TrackingHandler(MotoRequestHandler):
        """moto's handler, remembering open connections so that stop() can cut them."""

        def setup(self) -> None:
            super().setup()
            self.server.rtf_connections.add(self.connection)  # type: ignore[attr-defined]

        def finish(self) -> None:
            try:
                super().finish()
            finally:
                self.server.rtf_connections.discard(self.connection)  # type: ignore[attr-defined]

    return TrackingHandler


class S3Server:
    """moto's S3 server on ``host:port`` in a thread.

    What ``moto.server.ThreadedMotoServer`` runs (moto's WSGI app and request handler on
    werkzeug's threaded server), plus a record of open connections: ``ThreadedMotoServer.stop()``
    lets a request that is being handled run to its end, while :meth:`stop` here cuts it, which
    is what a crashed MinIO does to an upload in flight.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host = host
        self.port = port  # 0: a free port, fixed at the first start() and reused by restart()
        self._server = None
        self._thread: threading.Thread | None = None
        self._clients: dict[tuple[str, str], object] = {}

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> S3Server:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        if self._server is not None:
            raise RuntimeError("S3Server already running")
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log on stderr
        server = make_server(
            self.host,
            self.port,
            DomainDispatcherApplication(create_backend_app),
            threaded=True,
            request_handler=_make_handler(),
        )
        server.rtf_connections = set()  # type: ignore[attr-defined]
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name=f"moto-s3-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Go away: stop serving, close the listening socket and every open connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        for conn in list(server.rtf_connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def restart(self) -> None:
        """Come back on the same port (stop first if running). Buckets and objects survive."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self._server is not None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- addresses and credentials --------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self, *, endpoint: bool = False) -> dict[str, str]:
        """Env vars for clients of this server: fake keys, region, no metadata/profile lookups.
        ``endpoint=True`` also sets ``AWS_ENDPOINT_URL``. See :func:`apply_env` for the unsets."""
        env = {
            "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }
        if endpoint:
            env["AWS_ENDPOINT_URL"] = self.endpoint_url
        return env

    def client(self, access_key: str = FAKE_ACCESS_KEY, secret_key: str = FAKE_SECRET_KEY):
        """A boto3 S3 client on this server (over HTTP, path-style); cached per key pair."""
        import boto3
        from botocore.config import Config

        cached = self._clients.get((access_key, secret_key))
        if cached is not None:
            return cached
        self._clients[(access_key, secret_key)] = client = boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )
        return client

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket over HTTP; a unique name unless given. Returns the name."""
        name = name or f"rtf-test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    # -- IAM authentication ---------------------------------------------------------------------

    def create_iam_user(self, actions: tuple[str, ...] = ("s3:*",), resource: str = "*") -> tuple[str, str]:
        """An IAM user allowed ``actions`` on ``resource``; returns its (access key, secret key).
        Call it while IAM auth is off (moto's IAM API is authenticated too while it is on)."""
        import boto3

        iam = boto3.session.Session().client(
            "iam",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=FAKE_ACCESS_KEY,
            aws_secret_access_key=FAKE_SECRET_KEY,
        )
        user = f"rtf-test-{uuid.uuid4().hex[:8]}"
        iam.create_user(UserName=user)
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": list(actions), "Resource": resource}]}
        iam.put_user_policy(UserName=user, PolicyName="rtf-test", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=user)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    def _reset_auth(self, count: str) -> None:
        req = urllib.request.Request(
            f"{self.endpoint_url}/moto-api/reset-auth",
            data=count.encode(),
            method="POST",
            headers={"Content-Type": "text/plain"},  # not form data: moto reads the raw body
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()

    @contextlib.contextmanager
    def iam_auth(self) -> Iterator[None]:
        """While inside, moto validates access keys, signatures and IAM policies on every request
        (unknown key -> InvalidAccessKeyId, wrong secret -> SignatureDoesNotMatch, no policy ->
        AccessDenied). Process-global while on; always switched back off."""
        self._reset_auth("0")
        try:
            yield
        finally:
            self._reset_auth("inf")


def apply_env(monkeypatch: pytest.MonkeyPatch, server: S3Server, *, endpoint: bool = False) -> None:
    for name in _UNSET:
        monkeypatch.delenv(name, raising=False)
    for k, v in server.env(endpoint=endpoint).items():
        monkeypatch.setenv(k, v)


@contextlib.contextmanager
def blackhole() -> Iterator[str]:
    """An endpoint URL whose port accepts TCP connections and never answers (a stalled server)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


# -- pytest fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One moto S3 server for the whole session (shared: use unique buckets)."""
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The session server, with its fake credentials in the environment (AWS_ENDPOINT_URL unset)."""
    apply_env(monkeypatch, s3_server)
    return s3_server


@pytest.fixture
def s3_bucket(s3_env: S3Server) -> str:
    """A fresh, empty bucket on the session server."""
    return s3_env.create_bucket()


@pytest.fixture
def s3_server_own(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """A server of this test's own (to stop and restart without disturbing others), env applied."""
    server = S3Server().start()
    apply_env(monkeypatch, server)
    yield server
    server.stop()


@pytest.fixture(params=["local", "s3", "seaweedfs"])
def storage_root(request: pytest.FixtureRequest, tmp_path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str | None]:
    """A fresh, empty storage root on each backend, as ``(uri, endpoint_url)``: a local dir
    (endpoint ``None``), then ``s3://<new bucket>/root`` on the session moto server, then on the session
    SeaweedFS (tests/seaweed.py; env applied for both)."""
    if request.param == "local":
        return str(tmp_path / "storage"), None
    server = request.getfixturevalue("s3_server" if request.param == "s3" else "seaweed_server")
    apply_env(monkeypatch, server)
    return f"s3://{server.create_bucket()}/root", server.endpoint_url
