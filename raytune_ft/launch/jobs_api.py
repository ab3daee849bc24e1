"""The connection to a Ray cluster's Jobs API (the head's dashboard): the address, the auth token, a
client whose every request has a time limit, and the errors it ends in.

* **Address.** ``http(s)://host:port`` as is; ``ray://host[:port]`` (Ray Client) means the same head's
  dashboard on 8265; ``host[:port]`` gets ``http://``.
* **Token.** Ray's token auth (Ray >= 2.52): ``$RAY_AUTH_TOKEN``, else the file ``$RAY_AUTH_TOKEN_PATH``,
  else ``~/.ray/auth_token`` (Ray's own lookup order), sent as ``Authorization: Bearer``; never printed.
* **Time limits.** Ray's ``JobSubmissionClient`` sends its requests with no timeout, so a server that
  accepts and never answers hangs ``rtf`` for ever. Every request here has one: ``$RTF_RAY_TIMEOUT``
  seconds (default 30) to connect and again to read. Following a job's log stream, a stream that stays
  quiet for ``4 ×`` that long is closed, the job's state is asked over HTTP (time-limited), and the stream
  is opened again if the job still runs.
* **Errors.** Each failure is one line naming the address and what was wrong: not reachable, timed out,
  not a Ray dashboard (any other web server), or the token refused (exit code 2, no traceback, no token).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from raytune_ft.errors import UserError

DEFAULT_DASHBOARD_PORT = 8265
TIMEOUT_ENV = "RTF_RAY_TIMEOUT"
DEFAULT_TIMEOUT_S = 30.0
STREAM_IDLE_FACTOR = 4  # a log stream quiet this many timeouts long is checked (and reopened)
START_HEAD = f"`ray start --head` serves it on port {DEFAULT_DASHBOARD_PORT}"


def timeout_s() -> float:
    """The time limit of one request to the cluster (``$RTF_RAY_TIMEOUT``, seconds)."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise UserError(f"${TIMEOUT_ENV}={raw!r}: give the seconds one request to the Ray cluster may take "
                        f"(a number from 0 to 3600; default {DEFAULT_TIMEOUT_S:g})")
    return value


# --------------------------------------------------------------------------- address and token


def dashboard_url(address: str) -> str:
    """The Jobs API URL for an address: ``http(s)://host:port`` as is; ``ray://host[:port]`` (Ray
    Client) is taken to mean the same head's dashboard on 8265; ``host[:port]`` gets ``http://``."""
    a = (address or "").strip().rstrip("/")
    if a == "auto":
        raise UserError(f"address 'auto' does not say where the cluster is: rtf talks to the Ray dashboard, e.g. "
                        f"--address http://127.0.0.1:{DEFAULT_DASHBOARD_PORT} for a head on this machine")
    if not a or a == "local":
        raise UserError(f"address {address!r} does not say where the cluster is: give the Ray dashboard URL, "
                        f"e.g. --address http://HEAD:{DEFAULT_DASHBOARD_PORT}")
    if a.startswith(("http://", "https://")):
        return a
    if a.startswith("ray://"):
        host = urlsplit(a).hostname
        if not host:
            raise UserError(f"cannot read a host from {address!r}")
        return f"http://{host}:{DEFAULT_DASHBOARD_PORT}"
    if "://" in a:
        raise UserError(f"address {address!r}: use the Ray dashboard URL http://HEAD:{DEFAULT_DASHBOARD_PORT}")
    return f"http://{a}" if ":" in a else f"http://{a}:{DEFAULT_DASHBOARD_PORT}"


def cluster_address(address: str | None) -> str:
    addr = address or os.environ.get("RAY_ADDRESS")
    if not addr:
        raise UserError("which cluster? give --address http://HEAD:8265 or set $RAY_ADDRESS")
    return addr


@dataclass(frozen=True)
class Token:
    value: str | None = field(repr=False)
    source: str  # where it came from, for messages (never the value)


def default_token_path() -> str:
    """Ray's default token file (``ray._private.authentication.authentication_token_setup``)."""
    return os.path.join(os.path.expanduser("~"), ".ray", "auth_token")


def find_token() -> Token:
    """The Ray auth token, looked up as Ray does: ``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH``,
    ``~/.ray/auth_token``."""
    tok = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if tok:
        return Token(tok, "$RAY_AUTH_TOKEN")
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            with open(os.path.expanduser(path)) as f:
                tok = f.read().strip()
        except OSError as e:
            raise UserError(f"$RAY_AUTH_TOKEN_PATH names {path}, which cannot be read ({e.strerror})") from None
        if not tok:
            raise UserError(f"$RAY_AUTH_TOKEN_PATH names {path}, which is empty")
        return Token(tok, f"$RAY_AUTH_TOKEN_PATH ({path})")
    path = default_token_path()
    try:
        with open(path) as f:
            tok = f.read().strip()
    except OSError:
        tok = ""
    return Token(tok, path) if tok else Token(None, "none")


def no_auth_allowed() -> bool:
    return os.environ.get("RTF_ALLOW_NO_AUTH", "") in ("1", "true", "yes")


# --------------------------------------------------------------------------- the client


@dataclass
class Cluster:
    client: Any  # ray.job_submission.JobSubmissionClient, with time limits
    url: str
    token: Token
    timeout: float = DEFAULT_TIMEOUT_S

    @property
    def stream_idle_s(self) -> float:
        return STREAM_IDLE_FACTOR * self.timeout

    @contextlib.contextmanager
    def calls(self, what: str) -> Iterator[None]:
        """Jobs API failures as one-line UserErrors that never hold the token."""
        with api_errors(self.url, self.token, what):
            yield


def _reason(e: BaseException) -> str:
    """A few words for why a connection failed (refused, no such host, ...), from the innermost error."""
    text = str(e)
    for needle, words in (("Connection refused", "connection refused"), ("Name or service not known", "unknown host"),
                          ("nodename nor servname", "unknown host"), ("No route to host", "no route to host"),
                          ("Network is unreachable", "network unreachable"), ("reset by peer", "connection reset"),
                          ("RemoteDisconnected", "closed without an answer"), ("CERTIFICATE_VERIFY_FAILED",
                                                                              "TLS certificate not trusted")):
        if needle in text:
            return words
    return type(e).__name__


def _timed_client_class(timeout: float) -> type:
    """``JobSubmissionClient`` with a time limit on every request and one-line errors for a server that is
    not a Ray dashboard. Fills a gap: Ray's SDK calls ``requests`` with no timeout and turns a 404 from any
    web server into ``RuntimeError("Version check returned 404")``."""
    import requests
    from ray.job_submission import JobSubmissionClient

    class TimedJobSubmissionClient(JobSubmissionClient):
        def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", (timeout, timeout))
            where = f"{self._address} ({method} {endpoint.split('?')[0]})"
            try:
                r = super()._do_request(method, endpoint, **kwargs)
            except requests.Timeout:
                raise UserError(f"the Ray dashboard at {where} did not answer within {timeout:g}s: is it the "
                                f"dashboard's port, and is the head up? (${TIMEOUT_ENV} sets the limit)") from None
            except requests.ConnectionError as e:
                raise UserError(f"cannot reach the Ray dashboard at {self._address} ({_reason(e)}): is the "
                                f"cluster's dashboard there? ({START_HEAD})") from None
            if endpoint == "/api/version":
                check_version_answer(self._address, r)
            return r

    return TimedJobSubmissionClient


def check_version_answer(url: str, r: Any) -> None:
    """A Ray dashboard answers ``GET /api/version`` with JSON holding ``ray_version``; anything else (a 404
    from another web server, a login page, ...) is not one. 401/403 are left to the token messages."""
    if r.status_code in (401, 403):
        return
    try:
        doc = r.json() if r.status_code == 200 else None
    except ValueError:
        doc = None
    if not (isinstance(doc, dict) and "ray_version" in doc):
        server = r.headers.get("Server", "")
        raise UserError(f"{url} is not a Ray dashboard: it answered HTTP {r.status_code} to GET /api/version"
                        + (f" (server: {server[:40]})" if server else "")
                        + f"; give the Ray head's dashboard URL ({START_HEAD})")


class DashboardError(UserError):
    """The dashboard answered a request with a server error (HTTP 5xx): often passing, worth a retry."""


@contextlib.contextmanager
def api_errors(url: str, token: Token, what: str) -> Iterator[None]:
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - classified below, re-raised otherwise
        text = str(e)
        name = type(e).__name__
        status = getattr(e, "status", None)
        if name == "AuthenticationError" or status in (401, 403) or "Unauthorized" in text[:200] \
                or "Forbidden" in text[:200]:
            if "Forbidden" in text or "invalid" in text.lower() or status == 403:
                raise UserError(f"the Ray cluster at {url} refused the auth token from {token.source} "
                                "(403 Forbidden): it is not this cluster's token") from None
            raise UserError(f"the Ray cluster at {url} requires a Ray auth token (401 Unauthorized) and none "
                            "was sent: set $RAY_AUTH_TOKEN or $RAY_AUTH_TOKEN_PATH") from None
        if name in ("TimeoutError", "ServerTimeoutError", "ConnectionTimeoutError"):
            raise UserError(f"the Ray dashboard at {url} did not answer in time ({what}): is the head up? "
                            f"(${TIMEOUT_ENV} sets the limit)") from None
        if name in ("ConnectionError", "ConnectTimeout", "ClientConnectorError", "ServerDisconnectedError",
                    "ClientOSError") or "Failed to connect" in text or "Connection refused" in text:
            raise UserError(f"cannot reach the Ray dashboard at {url} ({what}: {_reason(e)}): is the cluster's "
                            f"dashboard there? ({START_HEAD})") from None
        if "does not exist" in text and what.startswith("job "):
            raise UserError(f"no {what} on the cluster at {url}; `rtf jobs` lists them") from None
        server = re.search(r"status code (5\d\d)", text)
        if server:  # the dashboard's own failure (a node it asked went away, say); the job is not told of it
            raise DashboardError(f"the Ray dashboard at {url} failed to answer ({what}: HTTP {server.group(1)}); its "
                                 "log on the head says why (logs/dashboard*.log in Ray's session dir)") from None
        if name == "WSServerHandshakeError":  # the log stream's URL answered, but not as Ray's does
            raise UserError(f"{url} did not open the job's log stream ({what}: HTTP {status}): is it a Ray "
                            "dashboard?") from None
        raise


@contextlib.contextmanager
def _without_env(*names: str) -> Iterator[None]:
    """JobSubmissionClient prefers $RAY_ADDRESS/$RAY_API_SERVER_ADDRESS to its argument; ours wins."""
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str) -> Cluster:
    """A Jobs API client for ``address`` that authenticates with the Ray token; it has answered as a Ray
    dashboard (``GET /api/version``) when this returns."""
    import logging

    url = dashboard_url(address)
    limit = timeout_s()
    token = find_token()
    if token.value is None and not no_auth_allowed():
        raise UserError(f"no Ray auth token for {url}: set $RAY_AUTH_TOKEN, or $RAY_AUTH_TOKEN_PATH to the "
                        f"token file, or put the token in {default_token_path()} (`ray get-auth-token` on the "
                        "head node prints it)")
    headers = {"Authorization": f"Bearer {token.value}"} if token.value else None
    client_class = _timed_client_class(limit)
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                 "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)  # "Uploading package", "WebSocket closed" chatter
    with _without_env("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"), api_errors(url, token, "connecting"):
        client = client_class(url, headers=headers)
    return Cluster(client, url, token, limit)


def checks_tokens(url: str, timeout: float | None = None) -> bool | None:
    """Whether the cluster refuses a request that carries no token (``None``: could not tell). A
    cluster that answers without one has token auth off: anyone who reaches it can run code there."""
    import requests

    try:
        r = requests.get(f"{url}/api/jobs/", timeout=timeout or timeout_s())
    except requests.RequestException:
        return None
    if r.status_code in (401, 403):
        return True
    return False if r.status_code == 200 else None
