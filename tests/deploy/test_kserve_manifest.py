"""deploy/kserve/inferenceservice.yaml: KServe's InferenceService for attnserve.

kubernetes-validate has no schema for KServe's CRD (it says so, and the first test insists that
it still does, so a schema that appears one day gets used). The predictor's pod spec is a plain
Kubernetes PodSpec, though: it is validated strictly as a Pod. The rest is checked here: the one
gRPC port named h2c, probes on it asking about the KServe service, shutdown timing, and the same
image and resources as the cpu overlay.
"""
from __future__ import annotations

import pytest
import yaml

from server.kserve import SERVICE_NAME
from tests.deploy.helpers import DEPLOY, run, tool
from tests.deploy.test_manifests import KUBERNETES_VERSIONS, container

MANIFEST = DEPLOY / "kserve" / "inferenceservice.yaml"
# What an InferenceService's predictor adds to a PodSpec (KServe's ComponentExtensionSpec).
KSERVE_FIELDS = {"minReplicas", "maxReplicas", "containerConcurrency", "timeout", "scaleTarget", "scaleMetric",
                 "canaryTrafficPercent", "logger", "batcher"}


@pytest.fixture(scope="module")
def service() -> dict:
    (document,) = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    return document


def predictor_container(service: dict) -> dict:
    (only,) = service["spec"]["predictor"]["containers"]
    return only


def env(service: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in predictor_container(service)["env"]}


def test_no_schema_exists_for_the_crd():
    result = run(tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSIONS[-1], str(MANIFEST))
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Couldn't find schema for kind InferenceService" in output, output


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_predictor_is_a_valid_pod_spec(service, tmp_path, version):
    pod_spec = {k: v for k, v in service["spec"]["predictor"].items() if k not in KSERVE_FIELDS}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "attnserve-predictor"}, "spec": pod_spec}
    (tmp_path / "pod.yaml").write_text(yaml.safe_dump(pod))
    result = run(tool("kubernetes-validate"), "--strict", "-k", version, str(tmp_path / "pod.yaml"))
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "passed for resource" in output and "ERROR" not in output, output


def test_one_grpc_port_named_h2c_carries_the_probes(service):
    assert service["apiVersion"] == "serving.kserve.io/v1beta1" and service["kind"] == "InferenceService"
    c = predictor_container(service)
    assert c["name"] == "kserve-container"
    (port,) = c["ports"]  # Knative exposes exactly one container port
    assert port == {"name": "h2c", "containerPort": 50051, "protocol": "TCP"}
    assert int(env(service)["ATTNSERVE_PORT"]) == port["containerPort"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == port["containerPort"], probe
    assert c["readinessProbe"]["grpc"]["service"] == SERVICE_NAME == "inference.GRPCInferenceService"
    annotations = service["metadata"]["annotations"]
    assert annotations["prometheus.kserve.io/port"] == env(service)["ATTNSERVE_METRICS_PORT"]
    assert "command" not in c and "args" not in c  # the image's entrypoint serves


def test_shutdown_and_probe_timing_fit_together(service):
    predictor, c = service["spec"]["predictor"], predictor_container(service)
    grace = predictor["terminationGracePeriodSeconds"]
    liveness = c["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= grace  # never restarted mid-drain
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert grace > pre_stop + float(env(service)["ATTNSERVE_DRAIN_GRACE_SECONDS"]) + 5 + 1
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # a slow model load is not a crash
    assert predictor["securityContext"]["runAsNonRoot"] is True
    assert predictor["minReplicas"] >= 1  # no cold start from zero: loading takes seconds
    assert predictor["containerConcurrency"] == int(env(service)["ATTNSERVE_KV_SLOTS"])


def test_same_image_and_resources_as_the_cpu_overlay(service, manifests):
    c, cpu = predictor_container(service), container(manifests, "cpu")
    assert c["image"] == cpu["image"] and c["resources"] == cpu["resources"]
    assert env(service)["ATTNSERVE_INTRA_OP_THREADS"] == c["resources"]["requests"]["cpu"]
    assert c["securityContext"] == cpu["securityContext"]
