"""RunPod target: pod settings for a RunPod Instant Cluster, and the bootstrap that makes it a Ray cluster.

``render_runpod(spec)`` returns ``{filename: content}``:

* ``pod.json`` — the body of RunPod's REST ``POST https://rest.runpod.io/v1/pods`` (image, GPU type
  and count, cloud type, disk, volume, entrypoint, env). Every node of the cluster uses the same
  settings; the platform tells each node its rank.
* ``cluster.yaml`` — the same, plus what the Instant Cluster form asks for: pod count, GPUs per pod,
  and the RunPod secrets to create first.
* ``entrypoint.sh`` — the bootstrap (``raytune_ft/launch/bootstrap.sh``, shipped with the package and copied
  into the image as its ENTRYPOINT): rank 0 starts the Ray head, waits for every node, runs the driver on the
  spec and exits with its code.
* ``README.md`` — the steps.

Secrets travel by reference only: each ``env`` entry whose value is null becomes
``{{ RUNPOD_SECRET_<name in lower case> }}`` (RunPod's documented syntax; RunPod substitutes the
secret's value when the pod starts), and the Ray cluster token is ``{{ RUNPOD_SECRET_ray_auth_token }}``.
The bootstrap refuses to start when one of them arrives unresolved. The spec itself (names only,
never values) rides in ``RTF_SPEC_B64``.

The node environment the bootstrap reads on RunPod Instant Clusters: ``NODE_RANK`` (0 on the
primary node), ``NUM_NODES``, ``PRIMARY_ADDR`` (or ``MASTER_ADDR``) and ``NODE_ADDR`` (this node's
address on the cluster network). ``RTF_NUM_NODES`` is also set from ``pod_count`` so that a cluster
created with the wrong size fails with a clear message instead of training on fewer GPUs.
"""

from __future__ import annotations

import base64
import json
import math
import posixpath
from importlib import resources

import yaml

from raytune_ft.errors import UserError
from raytune_ft.launch.k8s import shipped_spec_yaml
from raytune_ft.launch.secrets import reserved_in
from raytune_ft.spec import spec_hash
from raytune_ft.spec.models import JobSpec, RunpodSpec

BOOTSTRAP = "bootstrap.sh"  # package data of raytune_ft.launch: the one copy of the bootstrap
ENTRYPOINT_PATH = "/usr/local/bin/rtf-entrypoint"  # where docker/Dockerfile installs the bootstrap
DOCKER_ENTRYPOINT = ["/usr/bin/tini", "--", ENTRYPOINT_PATH]  # the image's ENTRYPOINT (tini reaps Ray's orphans)
VOLUME_MOUNT = "/workspace"
TOKEN_SECRET = "ray_auth_token"


def bootstrap_script() -> str:
    """The bootstrap every pod runs (``raytune_ft/launch/bootstrap.sh``; the images copy the same file)."""
    return resources.files("raytune_ft.launch").joinpath(BOOTSTRAP).read_text(encoding="utf-8")


def secret_ref(name: str) -> str:
    """RunPod's reference to the account secret named ``name``."""
    return "{{ RUNPOD_SECRET_" + name + " }}"


def secret_name(env_name: str) -> str:
    """The RunPod secret a forwarded variable comes from: its name in lower case (HF_TOKEN → hf_token)."""
    return env_name.lower()


def layout(spec: JobSpec) -> tuple[RunpodSpec, int]:
    """RunPod settings and the pod count, checked against what the job needs."""
    rp = spec.cluster.runpod or RunpodSpec()
    c = spec.compute
    need = math.ceil(c.num_workers * c.gpus_per_worker - 1e-9)
    pods = rp.pod_count or max(1, math.ceil(need / rp.gpu_count))
    if c.gpus_per_worker > rp.gpu_count:
        raise UserError(
            f"compute.gpus_per_worker ({c.gpus_per_worker:g}) is more than one pod has "
            f"(cluster.runpod.gpu_count {rp.gpu_count}); a worker cannot span pods"
        )
    if pods * rp.gpu_count < need:
        raise UserError(
            f"the job needs {need} GPU(s) (compute.num_workers {c.num_workers} × gpus_per_worker "
            f"{c.gpus_per_worker:g}) but {pods} pod(s) × {rp.gpu_count} GPU(s) give {pods * rp.gpu_count}",
            hint="raise cluster.runpod.pod_count or gpu_count, or lower compute.num_workers",
        )
    return rp, pods


def check_runpod(spec: JobSpec, pods: int) -> None:
    if not spec.cluster.image:
        raise UserError(
            "cluster.image is required to render for RunPod: the image every pod runs "
            "(built from docker/Dockerfile, it has the bootstrap and the driver)",
            hint="set it in the spec or with --set cluster.image=ghcr.io/you/rtf:TAG",
        )
    p = spec.storage.path
    if pods > 1 and not spec.storage.is_s3 and not posixpath.isabs(p):
        raise UserError(
            f"storage.path {p!r} is local to one pod, but the job runs on {pods} pods, whose workers all "
            "write checkpoints: it needs shared storage",
            hint="use s3://bucket/prefix (any S3-compatible store), or an absolute path on a network "
            f"volume mounted on every pod (e.g. {VOLUME_MOUNT}/rtf_runs)",
        )
    bad = sorted(set(reserved_in(spec.env)) | {k for k in spec.env if k.startswith("RTF_")})  # RTF_*: the bootstrap's
    if bad:
        raise UserError(f"env: {', '.join(bad)} is set by the bootstrap; remove it from env")


def pod_env(spec: JobSpec, pods: int) -> dict[str, str]:
    env: dict[str, str] = {}
    forwarded = sorted(k for k, v in spec.env.items() if v is None)
    for name, value in spec.env.items():
        env[name] = secret_ref(secret_name(name)) if value is None else value
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = secret_ref(TOKEN_SECRET)
    env["RTF_NUM_NODES"] = str(pods)
    if forwarded:
        env["RTF_REQUIRED_ENV"] = " ".join(forwarded)
    if spec.compute.accelerator_type:
        env["RTF_RAY_RESOURCES"] = json.dumps({f"accelerator_type:{spec.compute.accelerator_type}": 1})
    env["RTF_WORKDIR"] = VOLUME_MOUNT
    env["RTF_SPEC_B64"] = base64.b64encode(shipped_spec_yaml(spec).encode()).decode()
    return dict(sorted(env.items()))


def pod_body(spec: JobSpec) -> dict:
    """The REST v1 create-pod body (one pod; every node of the cluster gets the same)."""
    rp, pods = layout(spec)
    check_runpod(spec, pods)
    return {
        "name": spec.name,
        "imageName": spec.cluster.image,
        "gpuTypeIds": [rp.gpu_type],
        "gpuCount": rp.gpu_count,
        "cloudType": rp.cloud_type,
        "containerDiskInGb": rp.container_disk_gb,
        "volumeInGb": rp.volume_gb,
        "volumeMountPath": VOLUME_MOUNT,
        "dockerEntrypoint": list(DOCKER_ENTRYPOINT),
        "env": pod_env(spec, pods),
    }


def render_runpod(spec: JobSpec) -> dict[str, str]:
    """Files for running ``spec`` on RunPod: ``pod.json``, ``cluster.yaml``, ``entrypoint.sh``,
    ``README.md``. Raises :class:`UserError` when the spec cannot run there."""
    body = pod_body(spec)
    rp, pods = layout(spec)
    forwarded = sorted(k for k, v in spec.env.items() if v is None)
    secrets = sorted({secret_name(k) for k in forwarded} | {TOKEN_SECRET})
    cluster = {
        "name": spec.name,
        "podCount": pods,
        "gpuType": rp.gpu_type,
        "gpuCountPerPod": rp.gpu_count,
        "cloudType": rp.cloud_type,
        "secrets": secrets,
        "pod": body,
    }
    head = (
        f"# RunPod Instant Cluster for run {spec.name!r} (spec hash {spec_hash(spec)}), rendered by raytune_ft.\n"
        "# Create the secrets listed below first (RunPod console → Secrets); see README.md.\n"
    )
    return {
        "pod.json": json.dumps(body, indent=2) + "\n",
        "cluster.yaml": head + yaml.safe_dump(cluster, sort_keys=False, default_flow_style=False, width=10_000),
        "entrypoint.sh": bootstrap_script(),
        "README.md": _readme(spec, pods, rp, secrets, forwarded),
    }


def _readme(spec: JobSpec, pods: int, rp: RunpodSpec, secrets: list[str], forwarded: list[str]) -> str:
    rows = "\n".join(
        f"   | `{s}` | {'the Ray cluster token: any long random string, e.g. `openssl rand -hex 32`' if s == TOKEN_SECRET else 'the value of `' + s.upper() + '`'} |"
        for s in secrets
    )
    where = spec.storage.path
    return f"""# Run `{spec.name}` on RunPod

{pods} pod(s) × {rp.gpu_count} × {rp.gpu_type}, image `{spec.cluster.image}`.

1. **Secrets.** In the RunPod console (Secrets), create:

   | secret | value |
   | --- | --- |
{rows}

   The pods reference them as `{{{{ RUNPOD_SECRET_<name> }}}}`; their values never appear in these
   files. A secret that does not exist reaches the pod unresolved, and the bootstrap stops with a
   message naming the variable before Ray starts.

2. **Cluster.** {"Create an Instant Cluster with " + str(pods) + " pods" if pods > 1 else "Create a pod"}
   with the settings in `cluster.yaml` (the same as `pod.json`). Single pod from the API:
   `curl -X POST https://rest.runpod.io/v1/pods -H "Authorization: Bearer $RUNPOD_API_KEY"
   -H "Content-Type: application/json" -d @pod.json`.
   RunPod gives every node `NODE_RANK`, `NUM_NODES`, `PRIMARY_ADDR` and `NODE_ADDR`; the
   bootstrap (`{ENTRYPOINT_PATH}`, this folder's `entrypoint.sh`) starts the Ray head on rank 0,
   joins the others to it, waits for all {pods} node(s), then runs
   `python -m raytune_ft.launch.driver` on the spec carried in `RTF_SPEC_B64`.

3. **Watch.** Rank 0's log shows the cluster forming and then the training; the other pods log
   that they joined, and leave when rank 0 reports the job done. Rank 0 exits with the job's exit
   code (3 if the cluster did not form within `RTF_JOIN_TIMEOUT`, 900 s by default). The Ray
   dashboard listens on 127.0.0.1:8265 of rank 0: reach it through an SSH tunnel, with the token.

4. **Results.** Checkpoints, metrics and the final weights land in `{where}/{spec.name}/`. Running
   the same spec again resumes from the last committed checkpoint there.

Other platforms: the bootstrap also takes `RTF_NODE_RANK`, `RTF_NUM_NODES`, `RTF_HEAD_ADDRESS`,
`RTF_NODE_IP` and `RTF_RAY_PORT` (see the top of `entrypoint.sh`).
"""
