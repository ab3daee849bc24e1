"""KubeRay target: a job spec rendered as a ``RayJob`` (or a bare ``RayCluster``) plus a ConfigMap.

``render_k8s(spec)`` returns YAML text with two documents:

1. a ``ConfigMap`` holding the resolved spec (``spec.yaml``; env var *names* only, never values),
   mounted read-only at ``/etc/rtf`` in every Ray pod;
2. a ``RayJob`` (``ray.io/v1``) whose ``rayClusterSpec`` has one head group and one worker group
   sized from ``compute``, and whose entrypoint is the driver on that spec:
   ``python -m raytune_ft.launch.driver /etc/rtf/spec.yaml``. With ``cluster_only=True`` the second
   document is a ``RayCluster`` with the same cluster spec, to submit to by hand.

Choices, so nobody has to rediscover them:

* **Sizing.** One Ray Train worker per pod when ``gpus_per_worker >= 1`` (a whole number: Kubernetes
  has no fractional GPUs) or ``0``; ``replicas = min = max = num_workers``, no autoscaling.
  Fractional GPUs (``0 < g < 1``) pack ``floor(1/g)`` workers into a one-GPU pod. GPU pods get
  ``nvidia.com/gpu`` as request *and* limit; CPU is ``worker_cpu`` or ``cpus_per_worker`` (times the
  workers per pod); memory is ``worker_memory`` or 8 GiB per CPU on GPU pods, 4 GiB per CPU otherwise.
  The head gets ``head_cpu``/``head_memory`` and ``num-gpus: 0``.
* **Accelerator type.** No Kubernetes node label for GPU models is standard across clusters
  (``nvidia.com/gpu.product`` from GPU feature discovery, ``cloud.google.com/gke-accelerator``,
  ``node.kubernetes.io/instance-type`` …), so no node selector is invented: put the label of *your*
  cluster in ``cluster.kubernetes.node_selector`` (the ``k8s`` preset does). What is rendered is the Ray
  resource ``accelerator_type:<compute.accelerator_type>`` on the worker pods, so the trainer's
  ``accelerator_type`` constraint is satisfiable whatever name Ray auto-detects for the card
  (it calls an 80 GB A100 ``A100``, an RTX 4090 ``GeForce-RTX-4090``).
* **Placement.** ``node_selector`` applies to worker pods (where the GPUs are); ``tolerations`` to
  head and workers (a toleration allows, it never forces, and GPU-only clusters taint every node).
* **Secrets by reference.** Every ``env`` entry whose value is null becomes
  ``valueFrom.secretKeyRef`` (secret ``cluster.kubernetes.secret_name``, key = the variable's name);
  literals become plain ``value``. The spec in the ConfigMap holds names only.
* **Ray token auth** (Ray >= 2.52): ``authOptions: {mode: token, secretName: <secret_name>}`` (the
  CRD has it; KubeRay >= 1.5.1 reads the token from the secret's ``auth_token`` key and injects it
  into every Ray container and the job submitter) *and*, belt and braces, ``RAY_AUTH_MODE=token`` plus
  ``RAY_AUTH_TOKEN`` from the same secret key on the head and worker containers (KubeRay only adds
  these when absent, so nothing is duplicated; an older operator still starts an authenticated
  cluster). ``rayVersion`` is required by the operator with token auth: ``cluster.kubernetes.ray_version``
  or :data:`DEFAULT_RAY_VERSION` (the Ray the project's image pins).
* **Retries resume.** ``backoffLimit = fault_tolerance.max_failures`` (``-1`` = unlimited, rendered
  as the int32 maximum). KubeRay retries a failed RayJob on a *fresh* cluster; the retry runs the
  same spec, whose ``name`` and ``storage.path`` are the run identity, so the driver resumes from the
  last committed checkpoint in storage. That is why storage must be ``s3://`` here: a pod's local
  disk dies with the pod.
* **Long runs.** Every pod mounts a memory-backed ``/dev/shm`` (``kubernetes.shm_size``; default a quarter
  of the pod's memory within [1Gi, 64Gi]: the 64 MiB Kubernetes default breaks NCCL) and gets
  ``terminationGracePeriodSeconds = kubernetes.termination_grace_seconds`` (default 120) between SIGTERM
  and SIGKILL, time for a checkpoint on eviction or a spot reclaim. Worker pods get a ``preStop`` hook
  (``python -m raytune_ft.launch.drain --deadline <grace - 20>``): an evicted pod's Ray node is drained as
  preempted first, so the run gets Ray Train's preemption notice, commits a just-in-time checkpoint and
  restarts elsewhere counted as a preemption, not a failure.
* **Deterministic.** Same spec, same bytes: no timestamps, sorted env, names derived from the spec.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

import yaml

from raytune_ft.errors import UserError
from raytune_ft.launch.secrets import reserved_in
from raytune_ft.spec import dump_spec, spec_hash
from raytune_ft.spec.models import JobSpec, KubernetesSpec

API_VERSION = "ray.io/v1"
SPEC_MOUNT_DIR = "/etc/rtf"
SPEC_FILE = "spec.yaml"
SPEC_PATH = f"{SPEC_MOUNT_DIR}/{SPEC_FILE}"
ENTRYPOINT = f"python -m raytune_ft.launch.driver {SPEC_PATH}"
# The Ray version the project's image installs (docker/Dockerfile ARG RAY_VERSION; a test keeps them equal).
DEFAULT_RAY_VERSION = "2.60.0"
MIN_TOKEN_AUTH_RAY = (2, 52)
# KubeRay's limits (ray-operator/controllers/ray/utils/constant.go): names are DNS-1035 labels and a
# RayJob's name leaves room for the RayCluster suffix it generates.
MAX_RAYJOB_NAME = 47
MAX_RAYCLUSTER_NAME = 53
AUTH_TOKEN_KEY = "auth_token"  # the key KubeRay reads from authOptions.secretName
INT32_MAX = 2**31 - 1
LABEL_APP = "app.kubernetes.io/name"
LABEL_RUN = "raytune-ft/run"
ANN_NAME = "raytune-ft/spec-name"
ANN_HASH = "raytune-ft/spec-hash"


# --------------------------------------------------------------------------- helpers


def k8s_name(name: str, max_len: int = MAX_RAYJOB_NAME) -> str:
    """A DNS-1035 label (lowercase alphanumerics and '-', starting with a letter) from a run name.

    Deterministic; when characters are replaced or the name is cut, a short digest of the original
    keeps two different run names from mapping to the same Kubernetes name."""
    base = re.sub(r"[^a-z0-9-]+", "-", name.lower())
    base = re.sub(r"-{2,}", "-", base).strip("-")
    if not base or not base[0].isalpha():
        base = f"rtf-{base}".rstrip("-")
    if base == name and len(base) <= max_len:
        return base
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    head = base[: max_len - len(digest) - 1].rstrip("-")
    return f"{head}-{digest}"


def _cpu(q: float) -> str:
    """A Kubernetes CPU quantity: whole cores as "8", fractions in millicores ("500m")."""
    if float(q).is_integer():
        return str(int(q))
    return f"{int(round(q * 1000))}m"


def _ray_version_tuple(v: str) -> tuple[int, ...]:
    m = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", v.strip())
    if not m:
        raise UserError(f"cluster.kubernetes.ray_version {v!r} is not a version like 2.60.0")
    return tuple(int(x or 0) for x in m.groups())


def kube_settings(spec: JobSpec) -> KubernetesSpec:
    return spec.cluster.kubernetes or KubernetesSpec()


def shipped_spec(spec: JobSpec) -> dict:
    """The resolved spec as the pods read it. ``extends`` is dropped: the document is already
    merged, and the preset file it names does not exist inside the image."""
    d = dump_spec(spec)
    d.pop("extends", None)
    return d


def shipped_spec_yaml(spec: JobSpec) -> str:
    return yaml.safe_dump(shipped_spec(spec), sort_keys=False, default_flow_style=False)


def check_k8s(spec: JobSpec) -> None:
    """Reasons a spec cannot run on KubeRay, raised before anything is rendered."""
    if not spec.cluster.image:
        raise UserError(
            "cluster.image is required to render for Kubernetes: the image every Ray pod runs "
            "(the project's image, built from docker/Dockerfile, has the driver in it)",
            hint="set it in the spec or with --set cluster.image=ghcr.io/you/rtf:TAG",
        )
    if not spec.storage.is_s3:
        raise UserError(
            f"storage.path {spec.storage.path!r} is a local directory, which dies with the pod on "
            "Kubernetes: checkpoints would be lost and a retried RayJob could not resume",
            hint="use S3-compatible storage: --set storage.path=s3://bucket/prefix",
        )
    g = spec.compute.gpus_per_worker
    if g >= 1 and not float(g).is_integer():
        raise UserError(
            f"compute.gpus_per_worker {g:g} cannot be mapped to whole Kubernetes GPUs; "
            "use a whole number, or a fraction below 1 to share one GPU between workers"
        )
    bad = reserved_in(spec.env)
    if bad:
        raise UserError(f"env: {', '.join(bad)} is set by the renderer (Ray token auth); remove it from env")
    kube = kube_settings(spec)
    if kube.ray_version is not None and _ray_version_tuple(kube.ray_version) < MIN_TOKEN_AUTH_RAY:
        raise UserError(
            f"cluster.kubernetes.ray_version {kube.ray_version} predates Ray token authentication "
            "(2.52); the rendered cluster always uses it",
            hint="use an image with Ray >= 2.52",
        )


def worker_layout(spec: JobSpec) -> dict[str, Any]:
    """How Ray Train workers map to worker pods: pods, workers per pod, GPUs/CPUs/memory per pod."""
    c, kube = spec.compute, kube_settings(spec)
    g = c.gpus_per_worker
    if g == 0:
        per_pod, gpus = 1, 0
    elif g >= 1:
        per_pod, gpus = 1, int(g)
    else:
        per_pod, gpus = max(1, math.floor(1 / g + 1e-9)), 1
    pods = math.ceil(c.num_workers / per_pod)
    cpus = c.cpus_per_worker * per_pod
    if kube.worker_memory:
        memory = kube.worker_memory
    else:
        per_cpu = 8 if gpus else 4
        memory = f"{max(per_cpu, math.ceil(cpus * per_cpu))}Gi"
    return {
        "pods": pods,
        "workers_per_pod": per_pod,
        "gpus": gpus,
        "cpu": kube.worker_cpu or _cpu(cpus),
        "memory": memory,
    }


# --------------------------------------------------------------------------- manifest pieces


def _env(spec: JobSpec, secret: str) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    for name in sorted(spec.env):
        value = spec.env[name]
        if value is None:
            env.append({"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": name}}})
        else:
            env.append({"name": name, "value": value})
    env.append({"name": "RAY_AUTH_MODE", "value": "token"})
    env.append({"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": AUTH_TOKEN_KEY}}})
    return env


# A worker pod's preStop drain: its deadline is the grace period less the time Ray needs to stop after SIGTERM;
# with under PRESTOP_MIN_DEADLINE_S left no checkpoint would fit, and no hook is written
PRESTOP_STOP_MARGIN_S = 20
PRESTOP_MIN_DEADLINE_S = 10


def _container(name: str, image: str, env: list, resources: dict, ports: list | None) -> dict[str, Any]:
    c: dict[str, Any] = {"name": name, "image": image}
    if ports:
        c["ports"] = ports
    c["env"] = env
    c["resources"] = resources
    c["volumeMounts"] = [{"name": "rtf-spec", "mountPath": SPEC_MOUNT_DIR, "readOnly": True},
                         {"name": "dshm", "mountPath": "/dev/shm"}]
    return c


_QUANTITY_BYTES = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
                   "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60, "m": 1e-3}


def shm_size(kube: KubernetesSpec, pod_memory: str) -> str:
    """/dev/shm for a pod: ``kubernetes.shm_size``, else a quarter of its memory within [1Gi, 64Gi].

    Kubernetes gives containers a 64 MiB /dev/shm, which NCCL (and DataLoader workers) outgrow: multi-GPU
    pods fail with "unhandled system error" in NCCL. A memory-backed emptyDir replaces it."""
    if kube.shm_size:
        return kube.shm_size
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([A-Za-z]*)", pod_memory)
    total = float(m.group(1)) * _QUANTITY_BYTES.get(m.group(2), 1) if m else 16 * 2**30
    mib = int(min(max(total / 4, 2**30), 64 * 2**30) // 2**20)
    return f"{mib // 1024}Gi" if mib % 1024 == 0 else f"{mib}Mi"


def _pod_spec(container: dict, configmap: str, kube: KubernetesSpec, node_selector: bool,
              shm: str) -> dict[str, Any]:
    pod: dict[str, Any] = {}
    if kube.service_account:
        pod["serviceAccountName"] = kube.service_account
    if node_selector and kube.node_selector:
        pod["nodeSelector"] = dict(sorted(kube.node_selector.items()))
    if kube.tolerations:
        pod["tolerations"] = [dict(t) for t in kube.tolerations]
    # SIGTERM (eviction, spot reclaim) to SIGKILL: the workers' time to commit a checkpoint
    pod["terminationGracePeriodSeconds"] = kube.termination_grace_seconds
    pod["containers"] = [container]
    pod["volumes"] = [{"name": "rtf-spec", "configMap": {"name": configmap, "items": [{"key": SPEC_FILE, "path": SPEC_FILE}]}},
                      {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}}]
    return pod


def cluster_spec(spec: JobSpec, name: str, configmap: str) -> dict[str, Any]:
    """The ``rayClusterSpec`` (also the ``spec`` of a RayCluster)."""
    kube = kube_settings(spec)
    image = spec.cluster.image
    env = _env(spec, kube.secret_name)
    labels = {LABEL_APP: "raytune-ft", LABEL_RUN: name}

    head_res = {"cpu": kube.head_cpu, "memory": kube.head_memory}
    head = _container(
        "ray-head", image, env,
        {"requests": dict(head_res), "limits": dict(head_res)},
        [
            {"containerPort": 6379, "name": "gcs-server"},
            {"containerPort": 8265, "name": "dashboard"},
            {"containerPort": 10001, "name": "client"},
        ],
    )
    lay = worker_layout(spec)
    w_res: dict[str, Any] = {"cpu": lay["cpu"], "memory": lay["memory"]}
    if lay["gpus"]:
        w_res["nvidia.com/gpu"] = lay["gpus"]
    worker = _container("ray-worker", image, env, {"requests": dict(w_res), "limits": dict(w_res)}, None)
    deadline = kube.termination_grace_seconds - PRESTOP_STOP_MARGIN_S
    if deadline >= PRESTOP_MIN_DEADLINE_S:
        # before the kubelet's SIGTERM: drain this Ray node as preempted and wait out the deadline, so a training
        # run commits a just-in-time checkpoint and moves off the node (raytune_ft/launch/drain.py)
        worker["lifecycle"] = {"preStop": {"exec": {"command": [
            "python", "-m", "raytune_ft.launch.drain", "--deadline", str(deadline)]}}}

    worker_params: dict[str, str] = {"num-gpus": str(lay["gpus"])}
    if spec.compute.accelerator_type:
        # Single-quoted JSON: KubeRay pastes rayStartParams into a bash command line and also parses
        # this value (after trimming quotes) to add accelerator resources.
        worker_params["resources"] = "'" + _json({f"accelerator_type:{spec.compute.accelerator_type}": 1}) + "'"

    return {
        "rayVersion": kube.ray_version or DEFAULT_RAY_VERSION,
        "enableInTreeAutoscaling": False,
        "authOptions": {"mode": "token", "secretName": kube.secret_name},
        "headGroupSpec": {
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0"},
            "template": {
                "metadata": {"labels": dict(labels)},
                "spec": _pod_spec(head, configmap, kube, node_selector=False, shm=shm_size(kube, kube.head_memory)),
            },
        },
        "workerGroupSpecs": [
            {
                "groupName": "gpu-workers" if lay["gpus"] else "workers",
                "replicas": lay["pods"],
                "minReplicas": lay["pods"],
                "maxReplicas": lay["pods"],
                "numOfHosts": 1,
                "rayStartParams": worker_params,
                "template": {
                    "metadata": {"labels": dict(labels)},
                    "spec": _pod_spec(worker, configmap, kube, node_selector=True,
                                      shm=shm_size(kube, lay["memory"])),
                },
            }
        ],
    }


def _json(d: dict) -> str:
    import json

    return json.dumps(d, sort_keys=True, separators=(", ", ": "))


def _metadata(spec: JobSpec, name: str, kube: KubernetesSpec) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": kube.namespace,
        "labels": {LABEL_APP: "raytune-ft", LABEL_RUN: name},
        "annotations": {ANN_NAME: spec.name, ANN_HASH: spec_hash(spec)},
    }


def configmap_manifest(spec: JobSpec, name: str) -> dict[str, Any]:
    kube = kube_settings(spec)
    meta = _metadata(spec, f"{name}-spec", kube)
    meta["labels"][LABEL_RUN] = name
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {SPEC_FILE: shipped_spec_yaml(spec)}}


def rayjob_manifest(spec: JobSpec) -> dict[str, Any]:
    check_k8s(spec)
    kube = kube_settings(spec)
    name = k8s_name(spec.name, MAX_RAYJOB_NAME)
    mf = spec.fault_tolerance.max_failures
    body: dict[str, Any] = {
        "entrypoint": ENTRYPOINT,
        "submissionMode": "K8sJobMode",
        "backoffLimit": INT32_MAX if mf < 0 else mf,
        "shutdownAfterJobFinishes": kube.shutdown_after_job_finishes,
    }
    # KubeRay rejects a TTL on a RayJob that keeps its cluster.
    if kube.shutdown_after_job_finishes:
        body["ttlSecondsAfterFinished"] = kube.ttl_seconds_after_finished
    body["rayClusterSpec"] = cluster_spec(spec, name, f"{name}-spec")
    return {"apiVersion": API_VERSION, "kind": "RayJob", "metadata": _metadata(spec, name, kube), "spec": body}


def raycluster_manifest(spec: JobSpec) -> dict[str, Any]:
    check_k8s(spec)
    kube = kube_settings(spec)
    name = k8s_name(spec.name, MAX_RAYJOB_NAME)
    return {
        "apiVersion": API_VERSION,
        "kind": "RayCluster",
        "metadata": _metadata(spec, name, kube),
        "spec": cluster_spec(spec, name, f"{name}-spec"),
    }


def manifests(spec: JobSpec, cluster_only: bool = False) -> list[dict[str, Any]]:
    """The documents :func:`render_k8s` writes, as data: [ConfigMap, RayJob | RayCluster]."""
    main = raycluster_manifest(spec) if cluster_only else rayjob_manifest(spec)
    return [configmap_manifest(spec, main["metadata"]["name"]), main]


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (the shipped spec reads as YAML inside the ConfigMap), and
    no anchors/aliases: head and workers share one env list in memory, not in the manifest."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, s: str):
    if "\n" in s:
        return dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", s)


_Dumper.add_representer(str, _str)


def render_k8s(spec: JobSpec, cluster_only: bool = False) -> str:
    """YAML for ``kubectl apply -f``: the spec's ConfigMap, then a RayJob (or a RayCluster with
    ``cluster_only=True``). Raises :class:`UserError` when the spec cannot run on KubeRay."""
    docs = manifests(spec, cluster_only=cluster_only)
    kind = docs[1]["kind"]
    name = docs[1]["metadata"]["name"]
    head = (
        f"# {kind} {name} for run {spec.name!r} (spec hash {spec_hash(spec)}), rendered by raytune_ft.\n"
        "# Re-render instead of editing. Needs the KubeRay operator and the secret "
        f"{kube_settings(spec).secret_name!r} (see k8s/README.md).\n"
    )
    body = yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False, explicit_start=True)
    return head + body
