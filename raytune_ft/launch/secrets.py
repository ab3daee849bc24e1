"""Secrets by reference (principle 6) for jobs sent through the Ray Jobs API: the submitting side.

The value of each variable the spec forwards must reach every process of the job that may use it (the
driver, Ray Train's controller, every worker on every node) and nothing else: not the Jobs API payload
(entrypoint, ``runtime_env``, metadata: the dashboard shows all three, and ``runtime_env.env_vars`` in
particular), not the logs, not the run directory, not an error message. :func:`collect` reads the values
now (an unset one is a one-line error before anything is uploaded); :mod:`raytune_ft.train.env` seals them
for the cluster's token and opens them in every process of the job, :func:`setup_hook` among them.

One set of reserved names, :data:`RESERVED_ENV`, for every target: rtf and Ray set them on the cluster.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

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
