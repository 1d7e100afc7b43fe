"""infra/: the kind config, the bootstrap script's secret generation, and the Terraform sketch, which
must parse, be formatted, and agree with the prod overlay it feeds (terraform validate needs the
provider from the Terraform registry, which `terraform init` cannot reach offline: see infra/README.md)."""

import re
import shutil
import subprocess
from pathlib import Path

import hcl2
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
TERRAFORM = INFRA / "terraform" / "gke"
PROD = ROOT / "manifests" / "overlays" / "prod"
DEV_SECRETS = ROOT / "manifests" / "overlays" / "dev" / "secrets"


def unquote(value):
    """python-hcl2 keeps HCL's quotes on names and strings."""
    return value.strip('"') if isinstance(value, str) else value


def terraform_blocks(kind: str) -> dict[str, dict]:
    """{name: body} of every top-level `kind` block (variable, output, ...) across the .tf files."""
    found = {}
    for path in sorted(TERRAFORM.glob("*.tf")):
        for block in hcl2.load(path.open()).get(kind, []):
            found.update({unquote(name): body for name, body in block.items()})
    return found


def resources() -> dict[str, dict]:
    """{"type.name": body} of every resource."""
    found = {}
    for path in sorted(TERRAFORM.glob("*.tf")):
        for block in hcl2.load(path.open()).get("resource", []):
            for rtype, named in block.items():
                found.update({f"{unquote(rtype)}.{unquote(name)}": body for name, body in named.items()})
    return found


def env_keys(text: str) -> set[str]:
    return {line.split("=", 1)[0].strip() for line in text.splitlines() if re.match(r"\s*[A-Z_]+=", line)}


def test_kind_config_is_a_pinned_gpu_less_cluster():
    config = yaml.safe_load((INFRA / "kind" / "llmfab-dev.yaml").read_text())
    assert config["kind"] == "Cluster" and config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    assert {node["role"] for node in config["nodes"]} == {"control-plane", "worker"}
    for node in config["nodes"]:
        assert re.fullmatch(r"kindest/node:v\d+\.\d+\.\d+", node["image"]), node["image"]
        assert "extraMounts" not in node, "the dev profile has no GPU passthrough"
    assert f"CLUSTER={config['name']}" in (INFRA / "bootstrap.sh").read_text()


def test_bootstrap_paths_exist():
    script = (INFRA / "bootstrap.sh").read_text()
    subprocess.run(["bash", "-n", str(INFRA / "bootstrap.sh")], check=True)
    for path in re.findall(r"\b((?:manifests|infra)/[\w./-]+)", script):
        assert (ROOT / path).exists(), f"bootstrap.sh names {path}, which does not exist"


def test_bootstrap_writes_random_secrets_once(tmp_path):
    secrets = tmp_path / "manifests" / "overlays" / "dev" / "secrets"
    shutil.copytree(DEV_SECRETS, secrets, ignore=shutil.ignore_patterns("*.env"))
    run = ["bash", "-c", f"set -euo pipefail; source {INFRA / 'bootstrap.sh'}; write_secrets"]
    subprocess.run(run, cwd=tmp_path, check=True, capture_output=True)
    written = {p.name: p.read_text() for p in secrets.glob("*.env")}
    assert set(written) == {p.name.removesuffix(".example") for p in secrets.glob("*.env.example")}
    values = {}
    for text in written.values():
        for line in text.splitlines():
            name, _, value = line.partition("=")
            values[name] = value
    assert all(values.values()), values
    assert values["MLFLOW_TRACKING_USERNAME"] == "llmfab-pipeline"  # a set value is kept
    # MinIO's limits on its root credentials (they are the dev S3 keys).
    assert 3 <= len(values["AWS_ACCESS_KEY_ID"]) <= 20 and 8 <= len(values["AWS_SECRET_ACCESS_KEY"]) <= 40
    assert len(set(values.values())) == len(values), "every credential is drawn anew"
    subprocess.run(run, cwd=tmp_path, check=True, capture_output=True)
    assert {p.name: p.read_text() for p in secrets.glob("*.env")} == written, "a rerun must not rotate passwords"


def test_terraform_parses_and_declares_its_inputs():
    required = terraform_blocks("terraform")
    assert unquote(required["required_version"]).startswith(">=")
    google = required["required_providers"][0]["google"]
    assert unquote(google["source"]) == "hashicorp/google" and unquote(google["version"]).startswith("~>")
    for name, body in terraform_blocks("variable").items():
        assert body.get("description") and body.get("type"), f"variable {name} needs a description and a type"
    for name, body in terraform_blocks("output").items():
        assert body.get("description"), f"output {name} needs a description"


def test_terraform_gpu_pool_matches_the_prod_runtimes():
    pool = resources()["google_container_node_pool.gpu"]
    assert pool["autoscaling"][0]["min_node_count"] == 0, "the GPU pool scales to zero between TrainJobs"
    assert "guest_accelerator" in pool["node_config"][0]
    variables = terraform_blocks("variable")
    patch = yaml.safe_load((PROD / "runtime-gpu.yaml").read_text())
    limits = next(op["value"]["limits"] for op in patch if op["path"].endswith("/resources"))
    selector = next(op["value"] for op in patch if op["path"].endswith("/nodeSelector"))
    assert limits["nvidia.com/gpu"] == variables["gpu_count"]["default"]
    assert selector["cloud.google.com/gke-accelerator"] == unquote(variables["gpu_type"]["default"])


def test_terraform_outputs_fill_the_prod_overlay():
    """Each env-file output carries exactly the keys of the template it is written over."""
    outputs = terraform_blocks("output")
    for output, template in [
        ("mlflow_env", PROD / "params" / "mlflow.env.example"),
        ("llmfab_env", PROD / "params" / "llmfab.env.example"),
        ("s3_credentials_env", PROD / "secrets" / "s3.env.example"),
    ]:
        assert env_keys(unquote(outputs[output]["value"])) == env_keys(template.read_text()), output
    assert outputs["s3_credentials_env"]["sensitive"] is True


def test_terraform_is_formatted():
    terraform = shutil.which("terraform")
    if not terraform:
        pytest.skip("terraform is not installed (not on PyPI or Debian); `terraform fmt -check` runs where it is")
    out = subprocess.run(
        [terraform, "fmt", "-check", "-recursive", "-diff", str(TERRAFORM)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
