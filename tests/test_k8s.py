"""KubeRay manifests: every preset renders, and every manifest passes the operator's own CRD schema.

The schemas are read from ``../shared/kuberay`` (beside the checkout; never copied into the repo).
Kubernetes validates a custom resource with a *structural* OpenAPI schema plus extensions that
plain JSON Schema does not know, so :func:`k8s_to_jsonschema` translates them:

* ``x-kubernetes-int-or-string: true`` → ``anyOf: [integer, string]`` (any ``pattern`` still applies
  to the string form, so a quantity like ``16GB`` is rejected);
* ``x-kubernetes-preserve-unknown-fields: true`` → unknown fields are allowed there;
* everywhere else an object that lists ``properties`` gets ``additionalProperties: false``. The API
  server would *prune* such a field silently; the renderer's job is to never emit one, so a typo
  (``minReplica``) fails here instead of vanishing on the cluster;
* ``nullable`` → also accept null; ``format: int32`` → the int32 range.

CEL rules (``x-kubernetes-validations``) are not evaluated; the KubeRay webhook rules that matter to
these manifests (names, replicas, token auth needs rayVersion, TTL needs shutdown, backoffLimit ≥ 0)
are checked by :func:`kuberay_errors`, written from ray-operator/controllers/ray/utils/validation.go.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from raytune_ft.errors import UserError
from raytune_ft.launch import k8s
from raytune_ft.launch.k8s import render_k8s
from raytune_ft.spec import load_spec, spec_from_dict
from tests.specs import base_doc

REPO = Path(__file__).resolve().parents[1]
KUBERAY = REPO.parent / "shared" / "kuberay"
PRESETS = sorted((REPO / "jobspecs").glob("*.yaml"))
IMAGE = "registry.example/rtf:test"
S3 = "s3://rtf-test-bucket/runs"

needs_crds = pytest.mark.skipif(
    not (KUBERAY / "ray.io_rayjobs.yaml").is_file(),
    reason=f"KubeRay CRDs not found at {KUBERAY} (shared/ sits beside the checkout in CI)",
)


# --------------------------------------------------------------------------- CRD → JSON Schema

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)


def k8s_to_jsonschema(node):
    """Translate one Kubernetes structural-schema node (recursively) into draft-7 JSON Schema."""
    if isinstance(node, list):
        return [k8s_to_jsonschema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out: dict = {}
    for key, val in node.items():
        if key == "properties":
            out[key] = {name: k8s_to_jsonschema(sub) for name, sub in val.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(val, dict):
            out[key] = k8s_to_jsonschema(val)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [k8s_to_jsonschema(x) for x in val]
        elif key.startswith("x-kubernetes-") or key in ("nullable", "default", "description", "format"):
            continue  # handled below, or documentation only
        else:
            out[key] = val
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
    if node.get("format") in ("int32", "int64") and out.get("type") == "integer":
        lo, hi = INT32 if node["format"] == "int32" else INT64
        out.setdefault("minimum", lo)
        out.setdefault("maximum", hi)
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    fname = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}[kind]
    crd = yaml.safe_load((KUBERAY / fname).read_text())
    assert crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = k8s_to_jsonschema(v1["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def _pod_errors(where: str, pod: dict) -> list[str]:
    errs = []
    containers = pod.get("containers") or []
    if not containers:
        errs.append(f"{where}: no containers")
    volumes = {v["name"] for v in pod.get("volumes", [])}
    for c in containers:
        names = [e.get("name") for e in c.get("env", [])]
        if len(names) != len(set(names)):
            errs.append(f"{where}/{c['name']}: duplicate env names {sorted(n for n in names if names.count(n) > 1)}")
        for m in c.get("volumeMounts", []):
            if m.get("name") not in volumes:
                errs.append(f"{where}/{c['name']}: volumeMount {m['name']} has no volume")
        res = c.get("resources", {})
        for k, v in res.get("limits", {}).items():
            if "/" in k and res.get("requests", {}).get(k, v) != v:
                errs.append(f"{where}/{c['name']}: extended resource {k} request != limit")
    return errs


def kuberay_errors(doc: dict) -> list[str]:
    """What KubeRay's validating logic rejects beyond the CRD schema (validation.go)."""
    errs: list[str] = []
    kind, meta = doc["kind"], doc.get("metadata", {})
    name = meta.get("name", "")
    limit = k8s.MAX_RAYJOB_NAME if kind == "RayJob" else k8s.MAX_RAYCLUSTER_NAME
    if len(name) > limit or not DNS1035.match(name):
        errs.append(f"metadata.name {name!r} must be a DNS-1035 label of at most {limit} characters")
    spec = doc.get("spec", {})
    if kind == "RayJob":
        ttl = spec.get("ttlSecondsAfterFinished", 0)
        if not spec.get("shutdownAfterJobFinishes") and isinstance(ttl, int) and ttl > 0:
            errs.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
        if isinstance(spec.get("backoffLimit"), int) and spec["backoffLimit"] < 0:
            errs.append("backoffLimit must be >= 0")
        if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
            errs.append("one of rayClusterSpec or clusterSelector must be set")
        cluster = spec.get("rayClusterSpec", {})
    else:
        cluster = spec
    auth = cluster.get("authOptions") or {}
    if auth.get("mode") == "token":
        rv = cluster.get("rayVersion")
        if not rv or _version(rv) < (2, 52, 0):
            errs.append(f"authOptions.mode token needs rayVersion >= 2.52.0 (got {rv!r})")
    if not cluster.get("enableInTreeAutoscaling"):
        for g in cluster.get("workerGroupSpecs", []):
            lo, hi, n = g.get("minReplicas"), g.get("maxReplicas"), g.get("replicas")
            if lo is None or hi is None:
                errs.append(f"worker group {g.get('groupName')}: minReplicas and maxReplicas are required")
            elif not all(isinstance(x, int) for x in (lo, hi, n if n is not None else 0)):
                continue  # wrong types are the schema's to report
            elif not (0 <= lo <= hi) or (n is not None and not lo <= n <= hi):
                errs.append(f"worker group {g.get('groupName')}: need 0 <= minReplicas <= replicas <= maxReplicas")
    head = cluster.get("headGroupSpec", {}).get("template", {}).get("spec", {})
    errs += _pod_errors("head", head)
    for g in cluster.get("workerGroupSpecs", []):
        errs += _pod_errors(f"group {g.get('groupName')}", g.get("template", {}).get("spec", {}))
    return errs


def manifest_errors(doc: dict) -> list[str]:
    v = crd_validator(doc["kind"])
    errs = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in v.iter_errors(doc)]
    return errs + kuberay_errors(doc)


def configmap_errors(doc: dict) -> list[str]:
    errs = []
    if doc.get("apiVersion") != "v1" or doc.get("kind") != "ConfigMap":
        errs.append("not a v1 ConfigMap")
    name = doc.get("metadata", {}).get("name", "")
    if len(name) > 253 or not DNS1123_SUBDOMAIN.match(name):
        errs.append(f"ConfigMap name {name!r} is not a DNS-1123 subdomain")
    if not all(isinstance(v, str) for v in doc.get("data", {}).values()):
        errs.append("ConfigMap data values must be strings")
    return errs


# --------------------------------------------------------------------------- helpers


def docs_of(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def runnable(path: Path) -> tuple:
    """A preset loaded with what KubeRay needs: an image and S3 storage. Asserts the clear errors
    that come without them."""
    spec = load_spec(path)
    sets = []
    if not spec.cluster.image:
        with pytest.raises(UserError, match=r"cluster\.image is required"):
            render_k8s(spec)
        sets.append(f"cluster.image={IMAGE}")
    if not spec.storage.is_s3:
        with pytest.raises(UserError, match=r"storage\.path .* local directory"):
            render_k8s(load_spec(path, sets))
        sets.append(f"storage.path={S3}")
    return load_spec(path, sets), sets


def containers(cluster: dict) -> list[dict]:
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    workers = [c for g in cluster["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]
    return head + workers


def check_contents(spec, docs: list[dict]) -> None:
    cm, main = docs
    cluster = main["spec"]["rayClusterSpec"] if main["kind"] == "RayJob" else main["spec"]
    (group,) = cluster["workerGroupSpecs"]
    c = spec.compute
    worker = group["template"]["spec"]["containers"][0]
    if c.gpus_per_worker >= 1:
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == c.num_workers
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == c.gpus_per_worker
        assert worker["resources"]["requests"]["nvidia.com/gpu"] == c.gpus_per_worker
        assert group["rayStartParams"]["num-gpus"] == str(int(c.gpus_per_worker))
    elif c.gpus_per_worker == 0:
        assert group["replicas"] == c.num_workers
        assert "nvidia.com/gpu" not in worker["resources"]["limits"]
    # secrets by reference, in every Ray container; literals as values
    for ctr in containers(cluster):
        env = {e["name"]: e for e in ctr["env"]}
        for name, value in spec.env.items():
            if value is None:
                assert env[name] == {"name": name, "valueFrom": {"secretKeyRef": {
                    "name": spec.cluster.kubernetes.secret_name if spec.cluster.kubernetes else "rtf-secrets",
                    "key": name}}}
            else:
                assert env[name] == {"name": name, "value": value}
        assert env["RAY_AUTH_MODE"] == {"name": "RAY_AUTH_MODE", "value": "token"}
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "auth_token"
        assert {"name": "rtf-spec", "mountPath": "/etc/rtf", "readOnly": True} in ctr["volumeMounts"]
        assert ctr["image"] == spec.cluster.image
    assert cluster["authOptions"]["mode"] == "token"
    if c.accelerator_type:
        res = yaml.safe_load(group["rayStartParams"]["resources"].strip("'"))
        assert res == {f"accelerator_type:{c.accelerator_type}": 1}
    if main["kind"] == "RayJob":
        mf = spec.fault_tolerance.max_failures
        assert main["spec"]["backoffLimit"] == (mf if mf >= 0 else 2**31 - 1)
        assert main["spec"]["entrypoint"] == "python -m raytune_ft.launch.driver /etc/rtf/spec.yaml"
    # the ConfigMap the pods mount is the one rendered, and holds this spec
    vol = group["template"]["spec"]["volumes"][0]
    assert vol["configMap"]["name"] == cm["metadata"]["name"]
    assert set(cm["data"]) == {"spec.yaml"}


def roundtrip(spec, cm: dict, tmp_path: Path):
    p = tmp_path / "spec.yaml"
    p.write_text(cm["data"]["spec.yaml"])
    loaded = load_spec(p)
    assert loaded == spec.model_copy(update={"extends": None})
    return loaded


# --------------------------------------------------------------------------- every preset


@needs_crds
@pytest.mark.parametrize("cluster_only", [False, True], ids=["rayjob", "raycluster"])
@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_every_preset_renders_valid_manifests(path, cluster_only, tmp_path):
    spec, _ = runnable(path)
    text = render_k8s(spec, cluster_only=cluster_only)
    docs = docs_of(text)
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayCluster" if cluster_only else "RayJob"]
    assert docs[1]["apiVersion"] == "ray.io/v1"
    assert configmap_errors(docs[0]) == []
    assert manifest_errors(docs[1]) == []
    check_contents(spec, docs)
    roundtrip(spec, docs[0], tmp_path)
    assert render_k8s(spec, cluster_only=cluster_only) == text  # deterministic


def test_k8s_preset_contents(monkeypatch, tmp_path):
    fake = {"HF_TOKEN": "hf_FAKEsecretVALUE_4242", "AWS_ACCESS_KEY_ID": "AKIAFAKEFAKEFAKE4242",
            "AWS_SECRET_ACCESS_KEY": "fake/Secret+Access/Key4242", "RAY_AUTH_TOKEN": "fake-ray-token-4242"}
    for k, v in fake.items():
        monkeypatch.setenv(k, v)
    spec = load_spec(REPO / "jobspecs" / "k8s.yaml", ["env.WANDB_PROJECT=rtf-demo"])
    text = render_k8s(spec) + render_k8s(spec, cluster_only=True)
    for v in fake.values():
        assert v not in text
    cm, job = docs_of(render_k8s(spec))
    check_contents(spec, [cm, job])
    s = job["spec"]
    assert s["backoffLimit"] == 3 and s["shutdownAfterJobFinishes"] is True and s["ttlSecondsAfterFinished"] == 3600
    assert job["metadata"] == {
        "name": "llama31-8b-lora-k8s", "namespace": "ml",
        "labels": {"app.kubernetes.io/name": "raytune-ft", "raytune-ft/run": "llama31-8b-lora-k8s"},
        "annotations": {"raytune-ft/spec-name": "llama31-8b-lora-k8s", "raytune-ft/spec-hash": job["metadata"]["annotations"]["raytune-ft/spec-hash"]},
    }
    cluster = s["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "rtf-secrets"}
    assert cluster["rayVersion"] == k8s.DEFAULT_RAY_VERSION
    head = cluster["headGroupSpec"]["template"]["spec"]
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert "nodeSelector" not in head  # the head needs no GPU node
    tol = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert head["tolerations"] == worker["tolerations"] == tol
    assert head["containers"][0]["resources"]["limits"] == {"cpu": "4", "memory": "16Gi"}
    assert worker["containers"][0]["resources"]["limits"] == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": 1}
    env = {e["name"]: e for e in head["containers"][0]["env"]}
    assert env["WANDB_PROJECT"] == {"name": "WANDB_PROJECT", "value": "rtf-demo"}
    assert cm["metadata"]["namespace"] == "ml"
    loaded = roundtrip(spec, cm, tmp_path)
    assert loaded.env["HF_TOKEN"] is None and "extends" not in cm["data"]["spec.yaml"]


def test_examples_in_k8s_dir_are_up_to_date():
    spec = load_spec(REPO / "jobspecs" / "k8s.yaml")
    for fname, cluster_only in (("rayjob.yaml", False), ("raycluster.yaml", True)):
        path = REPO / "k8s" / fname
        assert path.is_file(), f"missing {path}"
        assert path.read_text() == render_k8s(spec, cluster_only=cluster_only), (
            f"k8s/{fname} is stale: rtf render k8s jobspecs/k8s.yaml [--cluster-only]"
            f"{' --cluster-only' if cluster_only else ''} > k8s/{fname}"
        )


@needs_crds
def test_examples_in_k8s_dir_validate():
    for fname in ("rayjob.yaml", "raycluster.yaml"):
        cm, main = docs_of((REPO / "k8s" / fname).read_text())
        assert configmap_errors(cm) == [] and manifest_errors(main) == []


# --------------------------------------------------------------------------- sizing and options


def spec_with(**over):
    doc = base_doc(cluster={"image": IMAGE}, storage={"path": S3})
    for dotted, value in over.items():
        cur = doc
        *parents, last = dotted.split("__")
        for p in parents:
            cur = cur.setdefault(p, {})
        cur[last] = value
    return spec_from_dict(doc)


def main_doc(spec, cluster_only=False) -> dict:
    docs = docs_of(render_k8s(spec, cluster_only=cluster_only))
    if KUBERAY.is_dir():
        assert manifest_errors(docs[1]) == []
    return docs[1]


def group_of(doc) -> dict:
    cluster = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    return cluster["workerGroupSpecs"][0]


def test_multi_gpu_workers_get_whole_gpus():
    g = group_of(main_doc(spec_with(compute__num_workers=2, compute__gpus_per_worker=4, compute__cpus_per_worker=16)))
    assert g["replicas"] == 2
    assert g["template"]["spec"]["containers"][0]["resources"]["limits"] == {"cpu": "16", "memory": "128Gi", "nvidia.com/gpu": 4}


def test_fractional_gpus_share_a_pod():
    g = group_of(main_doc(spec_with(compute__num_workers=3, compute__gpus_per_worker=0.5, compute__cpus_per_worker=1.5)))
    assert g["replicas"] == 2  # two workers per one-GPU pod
    assert g["template"]["spec"]["containers"][0]["resources"]["limits"] == {"cpu": "3", "memory": "24Gi", "nvidia.com/gpu": 1}
    g = group_of(main_doc(spec_with(compute__num_workers=1, compute__cpus_per_worker=0.5)))
    assert g["template"]["spec"]["containers"][0]["resources"]["limits"] == {"cpu": "500m", "memory": "4Gi"}


def test_impossible_or_unsafe_specs_fail_clearly():
    with pytest.raises(UserError, match="whole Kubernetes GPUs"):
        render_k8s(spec_with(compute__gpus_per_worker=1.5))
    with pytest.raises(UserError, match="predates Ray token authentication"):
        render_k8s(spec_with(cluster__kubernetes={"ray_version": "2.40.0"}))
    with pytest.raises(UserError, match="RAY_AUTH_TOKEN is set by the renderer"):
        render_k8s(spec_with(env={"RAY_AUTH_TOKEN": None}))


def test_kubernetes_options_are_honoured():
    spec = spec_with(
        cluster__kubernetes={"namespace": "team-a", "service_account": "rtf-sa", "secret_name": "my-secrets",
                             "worker_cpu": "6", "worker_memory": "40Gi", "head_cpu": "2", "head_memory": "8Gi",
                             "shutdown_after_job_finishes": False, "ray_version": "2.55.1"},
        fault_tolerance={"max_failures": -1}, env={"HF_TOKEN": None},
    )
    job = main_doc(spec)
    assert job["metadata"]["namespace"] == "team-a"
    assert job["spec"]["backoffLimit"] == 2**31 - 1
    assert job["spec"]["shutdownAfterJobFinishes"] is False and "ttlSecondsAfterFinished" not in job["spec"]
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.55.1" and cluster["authOptions"]["secretName"] == "my-secrets"
    head = cluster["headGroupSpec"]["template"]["spec"]
    worker = group_of(job)["template"]["spec"]
    assert head["serviceAccountName"] == worker["serviceAccountName"] == "rtf-sa"
    assert worker["containers"][0]["resources"]["limits"] == {"cpu": "6", "memory": "40Gi"}
    assert head["containers"][0]["resources"]["limits"] == {"cpu": "2", "memory": "8Gi"}
    env = {e["name"]: e for e in worker["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "my-secrets", "key": "HF_TOKEN"}
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "my-secrets", "key": "auth_token"}


def test_pods_get_shared_memory_and_a_grace_period():
    job = main_doc(spec_with(cluster__kubernetes={"worker_memory": "40Gi", "head_memory": "2Gi"}))
    cluster = job["spec"]["rayClusterSpec"]
    for pod, shm in ((group_of(job)["template"]["spec"], "10Gi"),  # a quarter of 40Gi
                     (cluster["headGroupSpec"]["template"]["spec"], "1Gi")):  # at least 1Gi
        assert pod["terminationGracePeriodSeconds"] == 120
        assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}} in pod["volumes"]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]
    job = main_doc(spec_with(cluster__kubernetes={"worker_memory": "1000Gi", "shm_size": None}))
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in \
        group_of(job)["template"]["spec"]["volumes"]  # at most 64Gi
    job = main_doc(spec_with(cluster__kubernetes={"worker_memory": "6000Mi", "shm_size": "3Gi",
                                                  "termination_grace_seconds": 300}))
    worker = group_of(job)["template"]["spec"]
    assert worker["terminationGracePeriodSeconds"] == 300
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "3Gi"}} in worker["volumes"]
    assert k8s.shm_size(k8s.kube_settings(spec_with()), "6000Mi") == "1500Mi"
    # the worker container drains its Ray node as preempted before the kubelet's SIGTERM, with the grace period
    # less Ray's stop time as the deadline; the head (whose loss ends the run anyway) has no hook
    hook = worker["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert hook == ["python", "-m", "raytune_ft.launch.drain", "--deadline", "280"]
    default = main_doc(spec_with())
    assert group_of(default)["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1] == "100"
    assert "lifecycle" not in default["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    short = main_doc(spec_with(cluster__kubernetes={"termination_grace_seconds": 25}))
    assert "lifecycle" not in group_of(short)["template"]["spec"]["containers"][0]  # no checkpoint would fit


@pytest.mark.parametrize("name", ["Quickstart", "my_run.v2", "7b-lora", "x" * 63, "a" * 47, "-", "Ünïcode"])
def test_k8s_names_are_valid_and_distinct(name):
    n = k8s.k8s_name(name)
    assert len(n) <= k8s.MAX_RAYJOB_NAME and DNS1035.match(n), n
    assert k8s.k8s_name(name) == n
    assert k8s.k8s_name(name + "x") != n


# --------------------------------------------------------------------------- the validator bites


@pytest.fixture
def good_job() -> dict:
    return docs_of(render_k8s(load_spec(REPO / "jobspecs" / "k8s.yaml")))[1]


def _broken(doc: dict, edit) -> dict:
    d = copy.deepcopy(doc)
    edit(d)
    return d


@needs_crds
@pytest.mark.parametrize(
    "what, edit, expect",
    [
        pytest.param("string replicas", lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas="4"), "is not of type 'integer'", id="string-replicas"),
        pytest.param("misspelled field", lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(minReplica=1), "'minReplica' was unexpected", id="misspelled-field"),
        pytest.param("typo in a pod field", lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].update(nodeSelectr={}), "'nodeSelectr' was unexpected", id="typo-in-a-pod-field"),
        pytest.param("typo at the top of spec", lambda d: d["spec"].update(shutdownAfterJobFinish=True), "was unexpected", id="typo-at-the-top-of-spec"),
        pytest.param("bad quantity", lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"].update(memory="16GB"), "does not match", id="bad-quantity"),
        pytest.param("bad enum", lambda d: d["spec"]["rayClusterSpec"]["authOptions"].update(mode="Token"), "is not one of", id="bad-enum"),
        pytest.param("int32 overflow", lambda d: d["spec"].update(backoffLimit=2**31), "is greater than the maximum", id="int32-overflow"),
        pytest.param("missing groupName", lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"), "'groupName' is a required property", id="missing-groupName"),
        pytest.param("env without name", lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append({"value": "x"}), "'name' is a required property", id="env-without-name"),
        pytest.param("name too long", lambda d: d["metadata"].update(name="a" * 48), "DNS-1035", id="name-too-long"),
        pytest.param("uppercase name", lambda d: d["metadata"].update(name="MyJob"), "DNS-1035", id="uppercase-name"),
        pytest.param("ttl without shutdown", lambda d: d["spec"].update(shutdownAfterJobFinishes=False), "ttlSecondsAfterFinished needs", id="ttl-without-shutdown"),
        pytest.param("token auth without rayVersion", lambda d: d["spec"]["rayClusterSpec"].pop("rayVersion"), "rayVersion >= 2.52.0", id="token-auth-without-rayVersion"),
        pytest.param("replicas above max", lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas=9), "replicas <= maxReplicas", id="replicas-above-max"),
        pytest.param("negative backoffLimit", lambda d: d["spec"].update(backoffLimit=-1), "backoffLimit must be >= 0", id="negative-backoffLimit"),
        pytest.param("mount without volume", lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].pop("volumes"), "has no volume", id="mount-without-volume"),
        pytest.param("duplicate env", lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append({"name": "HF_TOKEN", "value": "x"}), "duplicate env", id="duplicate-env"),
    ],
)
def test_validator_rejects_broken_manifests(good_job, what, edit, expect):
    assert manifest_errors(good_job) == []
    errs = manifest_errors(_broken(good_job, edit))
    assert errs, f"{what}: the validator accepted a broken manifest"
    assert any(expect in e for e in errs), errs


@needs_crds
def test_validator_honours_int_or_string(good_job):
    for cpu in (4, "4", "3500m"):
        d = _broken(good_job, lambda d, cpu=cpu: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"].update(cpu=cpu))
        assert manifest_errors(d) == [], cpu
    d = _broken(good_job, lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"].update(cpu=4.5))
    assert manifest_errors(d)  # a float is neither an integer nor a string


def test_schema_translation_rules():
    """The translation on a small schema, independent of the CRD files."""
    k8s_schema = {
        "type": "object",
        "properties": {
            "port": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]},
            "bare": {"x-kubernetes-int-or-string": True},
            "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {"type": "string"}}},
            "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
            "free": {"type": "object"},
            "maybe": {"type": "string", "nullable": True},
            "n": {"type": "integer", "format": "int32"},
        },
    }
    v = jsonschema.Draft7Validator(k8s_to_jsonschema(k8s_schema))
    ok = {"port": "http", "bare": 8080, "open": {"a": "x", "anything": [1]}, "closed": {"a": "x"},
          "free": {"whatever": 1}, "maybe": None, "n": 2**31 - 1}
    assert list(v.iter_errors(ok)) == []
    for bad in ({"bare": 1.5}, {"closed": {"b": 1}}, {"n": 2**31}, {"typo": 1}, {"open": {"a": 1}}):
        assert list(v.iter_errors(bad)), bad
