"""Secrets by reference (principle 6) for jobs sent through the Ray Jobs API: the submitting side.

The value of each variable the spec forwards must reach every process of the job that may use it (the
driver, Ray Train's controller, every worker on every node) and nothing else: not the Jobs API payload
(entrypoint, ``runtime_env``, metadata: the dashboard shows all three, and ``runtime_env.env_vars`` in
particular), not the logs, not the run directory, not an error message. :func:`collect` reads the values
now (an unset one is a one-line error before anything is uploaded); :mod:`raytune_ft.train.env` seals them
for the cluster's token and opens them in every process of the job, :func:`setup_hook` among them.

One set of reserved names, :data:`RESERVED_ENV`, for every target: rtf and Ray set them on the cluster.

Two more guards on what leaves this machine and what it shows: :func:`check_transport` (the bearer token,
and so the seal's key, must not cross a network in clear: plain ``http://`` to another machine warns, and
forwarding secrets there needs :data:`PLAIN_HTTP_FLAG`), and :func:`mask`, the one function every line
rtf shows from a job goes through (``submit --follow``, ``logs [--follow]``, ``status``, ``jobs``, errors,
local mode), through :class:`Masked` streams where the output is a stream.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from raytune_ft import storage as st
from raytune_ft.errors import SealError, UserError
from raytune_ft.train.env import install_sealed

# Set by rtf itself (or by Ray) on the cluster; a spec may not override them.
RESERVED_ENV = frozenset({"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS",
                          "RAY_API_SERVER_ADDRESS", "RTF_EVENTS"})


def reserved_in(env: Mapping[str, Any]) -> list[str]:
    """The names of ``env`` (a spec's ``env``) that rtf and Ray set themselves, sorted."""
    return sorted(RESERVED_ENV & set(env))


def check_names(spec: Any) -> None:
    bad = reserved_in(spec.env)
    if bad:
        raise UserError(f"env: {', '.join(bad)} is set by rtf and Ray for the cluster job; remove it from env")


def collect(spec: Any, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The values of the variables the spec forwards (``NAME: null``), read from ``environ`` now."""
    environ = os.environ if environ is None else environ
    names = list(spec.forwarded_env)
    missing = [n for n in names if not environ.get(n)]
    if missing:
        listed = ", ".join(f"${n}" for n in missing)
        raise UserError(f"env: {listed} {'is' if len(missing) == 1 else 'are'} forwarded by the spec "
                        f"(`{missing[0]}: null`) but not set in this environment; export "
                        f"{'it' if len(missing) == 1 else 'them'} before submitting")
    return {n: environ[n] for n in names}


def setup_hook() -> None:
    """``runtime_env.worker_process_setup_hook`` of a job: runs in every Ray worker process the job
    starts (Train controller, workers), before any task. Never raises (a failing hook would kill the
    worker with a confusing error); :func:`apply_env` in ``train_loop`` reports what is missing."""
    try:
        install_sealed()
    except SealError as e:
        print(f"rtf: warning: {e}", file=sys.stderr, flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"rtf: warning: forwarded secrets not installed ({type(e).__name__})", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the way to the cluster

PLAIN_HTTP_FLAG = "--allow-secrets-over-plain-http"


def sends_in_clear(url: str) -> bool:
    """Whether requests to ``url`` carry the bearer token unencrypted over a network: plain ``http://`` to
    a host other than this machine's loopback (127.0.0.0/8, ::1, localhost). Names are not resolved."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "http":
        return False
    host = (parts.hostname or "").rstrip(".").lower()
    if host == "localhost":
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return True
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return not (ip.is_loopback or (mapped is not None and mapped.is_loopback))


def check_transport(url: str, forwarded: Iterable[str], *, allow_plain_http: bool = False) -> str | None:
    """Before a submit to the Jobs API at ``url``: the one-line warning to print (``None``: say nothing),
    or a UserError when the spec forwards secrets over plain HTTP and the user did not pass
    :data:`PLAIN_HTTP_FLAG` (whoever reads the token on the way can open the sealed secrets)."""
    if not sends_in_clear(url):
        return None
    names = sorted(forwarded)
    if names and not allow_plain_http:
        raise UserError(f"env forwards {', '.join(names)}, but {url} is plain HTTP to another machine: anyone on "
                        "the network path could read the Ray auth token and open them; use https or an SSH "
                        f"tunnel (--address http://127.0.0.1:PORT), or pass {PLAIN_HTTP_FLAG} to send them anyway")
    return (f"warning: {url} is plain HTTP to another machine: the Ray auth token"
            + (f" (and with it {', '.join(names)})" if names else "")
            + " crosses the network unencrypted; prefer https or an SSH tunnel to the head")


# --------------------------------------------------------------------------- what rtf shows


def local_values(names: str | Iterable[str] | None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The values here of the variables a job forwarded (``names``: a list, or its metadata's
    comma-separated ``rtf_forwarded_env``): what :func:`mask` hides in what is shown of it."""
    environ = os.environ if environ is None else environ
    listed = names.split(",") if isinstance(names, str) else list(names or [])
    return {n: environ[n] for n in listed if n and environ.get(n)}


def mask(text: str, values: Mapping[str, str] | Iterable[str]) -> str:
    """``text`` with every forwarded secret value (of at least 4 characters) replaced by ``***``."""
    return st.scrub(text, values if isinstance(values, Mapping) else list(values))


class Masked:
    """A text stream that passes every write through :func:`mask` (rtf's writers, the progress renderer
    included, write each line or message whole, so a value is never split between two writes)."""

    def __init__(self, stream: Any, values: Mapping[str, str]) -> None:
        self.stream, self.values = stream, dict(values)

    def write(self, text: str) -> int:
        return self.stream.write(mask(text, self.values) if self.values else text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()
