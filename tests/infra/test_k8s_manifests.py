"""The Kubernetes manifests: schema-valid, and wired the way the services need.

Every manifest is checked offline against the Kubernetes API schemas
(``kubernetes-validate``, strict: unknown fields are errors). The checks after
that are the ones a schema cannot make: probes on the paths the services
serve, every setting named as the service spells it, secrets only from the
Secret, the var dir per pod, the artifact dir shared, Services that select
their pods' ports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from _infra_support import REPO, setting_names

K8S = REPO / "infra" / "k8s"
KUSTOMIZATION = K8S / "kustomization.yaml"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p != KUSTOMIZATION)
ON_DEMAND = {"forge-job.yaml"}  # applied by hand, not by the kustomization


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_docs() -> list[dict[str, Any]]:
    return [d for p in MANIFESTS for d in docs(p)]


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in all_docs() if d["kind"] == kind}


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_against_the_kubernetes_schemas(path: Path) -> None:
    version = kubernetes_validate.latest_version()
    for doc in docs(path):
        kubernetes_validate.validate(doc, version, strict=True)


def test_kustomization_lists_every_manifest_but_the_on_demand_ones() -> None:
    listed = set(yaml.safe_load(KUSTOMIZATION.read_text())["resources"])
    assert listed == {p.name for p in MANIFESTS} - ON_DEMAND


def test_workloads_name_only_real_settings_and_take_secrets_from_the_secret() -> None:
    known = setting_names()
    secret = of_kind("Secret")["esper-lite"]
    secret_keys = set(secret["stringData"])
    assert {"ESPER_LEYLINE_SECRET", "REDIS_URL", "URZA_DATABASE_URL"} <= secret_keys
    for workload in [*of_kind("Deployment").values(), *of_kind("Job").values()]:
        for container in pod_spec(workload)["containers"]:
            env = env_of(container)
            assert set(env) <= known, f"{workload['metadata']['name']}: {set(env) - known}"
            assert env["ESPER_LEYLINE_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == "esper-lite"
            for name in ("REDIS_URL", "URZA_DATABASE_URL"):  # they carry passwords
                if name in env:
                    assert "value" not in env[name], name
            for entry in env.values():
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "esper-lite", entry
                    assert ref["key"] in secret_keys, entry


@pytest.mark.parametrize(
    ("name", "port", "host_setting"),
    [("esper-weatherlight", 9101, "WEATHERLIGHT_HTTP"), ("esper-nissa", 9100, "NISSA_HTTP")],
)
def test_deployment_probes_security_and_service(name: str, port: int, host_setting: str) -> None:
    deployment = of_kind("Deployment")[name]
    spec = pod_spec(deployment)
    (container,) = spec["containers"]
    env = env_of(container)
    assert env[f"{host_setting}_HOST"]["value"] == "0.0.0.0"  # reachable by probes and Prometheus
    assert env[f"{host_setting}_PORT"]["value"] == str(port)
    assert container["ports"] == [{"name": "http", "containerPort": port}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["startupProbe"]["httpGet"]["port"] == "http"
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"] for v in spec["volumes"]}
    assert {m["name"] for m in container["volumeMounts"]} <= volumes
    assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}

    service = of_kind("Service")[name]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"] == [{"name": "metrics", "port": port, "targetPort": "http"}]


def test_weatherlight_replicas_keep_a_private_var_dir_and_share_the_artifacts() -> None:
    deployment = of_kind("Deployment")["esper-weatherlight"]
    assert deployment["spec"]["replicas"] > 1
    spec = pod_spec(deployment)
    (container,) = spec["containers"]
    env = {k: v.get("value") for k, v in env_of(container).items()}
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounted = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert "emptyDir" in mounted[env["ESPER_VAR_DIR"]]  # one var dir per pod (the instance lock)
    assert env["TAMIYO_POLICY_DIR"].startswith(env["ESPER_VAR_DIR"] + "/")
    claim = mounted[env["URZA_ARTIFACT_DIR"]]["persistentVolumeClaim"]["claimName"]
    pvc = of_kind("PersistentVolumeClaim")[claim]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    forge = pod_spec(of_kind("Job")["esper-forge"])
    forge_env = {k: v.get("value") for k, v in env_of(forge["containers"][0]).items()}
    assert forge_env["URZA_ARTIFACT_DIR"] == env["URZA_ARTIFACT_DIR"]
    assert {
        v["persistentVolumeClaim"]["claimName"] for v in forge["volumes"] if "persistentVolumeClaim" in v
    } == {claim}
