"""``rtf submit``: pick the target (a Ray cluster through its Jobs API, or an embedded local Ray), say why,
and hand it the spec with its local paths made absolute."""

from __future__ import annotations

import os
import sys

from raytune_ft.launch.driver import check_resume_from  # noqa: F401  (the submit-side check)
from raytune_ft.launch.secrets import Masked, local_values
from raytune_ft.spec import absolutize
from raytune_ft.spec.models import JobSpec


def choose_target(spec: JobSpec, address: str | None) -> tuple[str, str | None, str]:
    """(mode, address, why). An address from --address, RAY_ADDRESS or cluster.address means a
    cluster (through its Jobs API, a running head on this machine included); none of them, or the word
    ``local`` (Ray's own spelling for a new local instance), means a new embedded Ray in this process."""
    if address:
        if address.strip() == "local":
            return "local", None, "--address local"
        return "cluster", address, "--address was given"
    if os.environ.get("RAY_ADDRESS"):
        if os.environ["RAY_ADDRESS"].strip() == "local":
            return "local", None, "RAY_ADDRESS=local"
        return "cluster", os.environ["RAY_ADDRESS"], "RAY_ADDRESS is set"
    if spec.cluster.address:
        return "cluster", spec.cluster.address, "cluster.address is set in the spec"
    return "local", None, "no --address, no RAY_ADDRESS and no cluster.address"


def submit(spec: JobSpec, *, address: str | None = None, fresh: bool = False, resume_from: str | None = None,
           follow: bool = True, out=None, allow_plain_http: bool = False) -> int:
    out = out or sys.stderr
    mode, addr, why = choose_target(spec, address)
    if mode == "cluster":
        from raytune_ft.launch.ray_jobs import submit_cluster

        return submit_cluster(absolutize(spec), addr, why, fresh=fresh, resume_from=resume_from,
                              follow=follow, out=out, allow_plain_http=allow_plain_http)
    from raytune_ft.launch.local import run_local

    out = Masked(out, local_values(spec.forwarded_env))  # what the run shows, as on a cluster

    if resume_from:
        resume_from = check_resume_from(spec, resume_from)
    print(f"mode: local, on this machine ({why})", file=out)  # the next line says: in this process or a Ray of its own
    return run_local(absolutize(spec), fresh=fresh, resume_from=resume_from, out=out)
