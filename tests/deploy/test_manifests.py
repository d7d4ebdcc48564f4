"""The Kubernetes manifests: every overlay renders, validates strictly against several Kubernetes
versions, and hangs together (ports, selectors, probes, shutdown timing, the autoscaler's metric);
the tls overlay also mounts its certificate and keys from Secrets, probes a plaintext health port
and scrapes over https.

kubernetes-validate has no schema for the Prometheus Operator's CRDs (ServiceMonitor,
PrometheusRule) and only warns about them: the validation test allows exactly those two
warnings, the PrometheusRule's content goes through promtool (test_rules.py), and the
ServiceMonitor is checked against the Service it must select below.
"""
from __future__ import annotations

import re

import pytest
import yaml

from tests.deploy.helpers import DEPLOY, OVERLAYS, run, tool

# The oldest Kubernetes still widely run, one in the middle, and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.29.0", "1.32.0", "1.37.0")
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
ADAPTER_CONFIG = DEPLOY / "k8s" / "prometheus-adapter" / "adapter-config.yaml"


def validate(path, version: str):
    return run(tool("kubernetes-validate"), "--strict", "-k", version, str(path))


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_rendered_overlays_pass_strict_validation(rendered, tmp_path, version):
    files = [ADAPTER_CONFIG]
    for overlay, text in rendered.items():
        files.append(tmp_path / f"{overlay}.yaml")
        files[-1].write_text(text)
    for path in files:
        result = validate(path, version)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert "ERROR" not in output, output
        passed = re.findall(r"passed for resource (\S+)", output)
        skipped = set(re.findall(r"Couldn't find schema for kind (\w+)", output))
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert skipped <= CRD_KINDS, output
        assert len(passed) == len([d for d in documents if d["kind"] not in CRD_KINDS]), output


def test_strict_validation_rejects_an_unknown_field(rendered, tmp_path):
    """The validator is really strict: one misspelt field in the Deployment fails it."""
    broken = rendered["cpu"].replace("terminationGracePeriodSeconds:", "terminationGracePeriodSecond:")
    assert broken != rendered["cpu"]
    (tmp_path / "broken.yaml").write_text(broken)
    result = validate(tmp_path / "broken.yaml", KUBERNETES_VERSIONS[-1])
    assert result.returncode != 0 and "terminationGracePeriodSecond" in result.stdout + result.stderr


def container(manifests, overlay):
    (only,) = manifests[overlay]["Deployment/attnserve"]["spec"]["template"]["spec"]["containers"]
    return only


def env(manifests, overlay) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container(manifests, overlay)["env"]}


def probed_port(manifests, overlay) -> str:
    """The named port the probes must use: the plaintext health port where the server has one."""
    return "health" if "ATTNSERVE_HEALTH_PORT" in env(manifests, overlay) else "grpc"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_ports_probes_and_shutdown_fit_together(manifests, overlay):
    objects = manifests[overlay]
    pod = objects["Deployment/attnserve"]["spec"]["template"]
    c = container(manifests, overlay)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert {"grpc": 50051, "metrics": 9090, "http": 8000}.items() <= ports.items()
    assert set(ports) <= {"grpc", "metrics", "health", "http"}
    if "health" in ports:  # the server listens where the pod says it does
        assert int(env(manifests, overlay)["ATTNSERVE_HEALTH_PORT"]) == ports["health"]
    assert int(env(manifests, overlay)["ATTNSERVE_HTTP_PORT"]) == ports["http"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        # gRPC probes take a port number, not a name.
        assert c[probe]["grpc"]["port"] == ports[probed_port(manifests, overlay)], probe
    assert c["readinessProbe"]["grpc"]["service"] == "attnserve.v1.Generation"
    # Liveness never fires during startup (startup gates it) nor during a drain (it takes longer than the grace).
    liveness = c["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= pod["spec"]["terminationGracePeriodSeconds"]
    # The pod gets its whole shutdown: preStop sleep, then the server's drain, engine stop (5 s) and gRPC stop (1 s).
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = float(env(manifests, overlay)["ATTNSERVE_DRAIN_GRACE_SECONDS"])
    assert pod["spec"]["terminationGracePeriodSeconds"] > pre_stop + drain + 5 + 1
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert "replicas" not in objects["Deployment/attnserve"]["spec"]  # the autoscaler owns it


def test_overlays_differ_in_device_image_and_resources(manifests):
    cpu, gpu = container(manifests, "cpu"), container(manifests, "gpu")
    assert cpu["image"] == "attnserve:cpu" and gpu["image"] == "attnserve:gpu"
    assert env(manifests, "cpu")["ATTNSERVE_DEVICE"] == "cpu" and env(manifests, "gpu")["ATTNSERVE_DEVICE"] == "cuda"
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in str(cpu["resources"])
    # The overlay's variables join the base's rather than replacing them.
    for overlay in OVERLAYS:
        assert {"ATTNSERVE_DRAIN_GRACE_SECONDS", "ATTNSERVE_MAX_QUEUED_REQUESTS", "ATTNSERVE_KV_SLOTS"} <= set(env(manifests, overlay))
    assert env(manifests, "cpu")["ATTNSERVE_INTRA_OP_THREADS"] == cpu["resources"]["requests"]["cpu"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_the_pods_and_the_monitor_scrapes_only_the_metrics_service(manifests, overlay):
    objects = manifests[overlay]
    pod_labels = objects["Deployment/attnserve"]["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"] for p in container(manifests, overlay)["ports"]}
    services = {name: obj for name, obj in objects.items() if name.startswith("Service/")}
    assert set(services) == {"Service/attnserve", "Service/attnserve-headless"}
    for service in services.values():
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    assert services["Service/attnserve-headless"]["spec"]["clusterIP"] == "None"
    monitor = objects["ServiceMonitor/attnserve"]["spec"]
    selected = [name for name, s in services.items()
                if monitor["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert selected == ["Service/attnserve"]
    assert {e["port"] for e in monitor["endpoints"]} <= {p["name"] for p in services["Service/attnserve"]["spec"]["ports"]}
    # The plaintext health port is for the kubelet only: no Service exposes it.
    assert all(p["targetPort"] != "health" for s in services.values() for p in s["spec"]["ports"])
    pdb = objects["PodDisruptionBudget/attnserve"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()


def test_autoscaler_scales_the_deployment_on_the_adapters_per_pod_queue_metric(manifests):
    hpa = manifests["cpu"]["HorizontalPodAutoscaler/attnserve"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "attnserve"}
    assert hpa["spec"]["minReplicas"] >= 2  # with the budget's maxUnavailable 1, a drain never empties the service
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    (rule,) = yaml.safe_load(yaml.safe_load(ADAPTER_CONFIG.read_text())["data"]["config.yaml"])["rules"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    assert re.fullmatch(rule["name"]["matches"], "attnserve_requests_waiting")
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def secret_mounts(manifests, overlay) -> dict[str, str]:
    """mountPath -> the Secret mounted there, for the container's read-only Secret volumes."""
    pod = manifests[overlay]["Deployment/attnserve"]["spec"]["template"]["spec"]
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    return {m["mountPath"]: secrets[m["name"]] for m in container(manifests, overlay)["volumeMounts"]
            if m["name"] in secrets and m.get("readOnly")}


def test_tls_overlay_mounts_its_secrets_probes_the_health_port_and_scrapes_over_https(manifests):
    c, variables = container(manifests, "tls"), env(manifests, "tls")
    assert c["image"] == container(manifests, "cpu")["image"]  # on top of the cpu overlay
    assert c["resources"] == container(manifests, "cpu")["resources"]
    # Probes on the plaintext health-only port (the kubelet's probes dial plain text and show no
    # client certificate); readiness still asks about the Generation service.
    health = {p["name"]: p["containerPort"] for p in c["ports"]}["health"]
    assert all(c[probe]["grpc"]["port"] == health for probe in ("startupProbe", "readinessProbe", "livenessProbe"))
    assert c["readinessProbe"]["grpc"]["service"] == "attnserve.v1.Generation"
    # Every TLS file and the keys file lies in a read-only Secret volume (rewritten in place on rotation).
    mounts = secret_mounts(manifests, "tls")
    expected = {"ATTNSERVE_TLS_CERT_FILE": ("attnserve-tls", "tls.crt"),
                "ATTNSERVE_TLS_KEY_FILE": ("attnserve-tls", "tls.key"),
                "ATTNSERVE_TLS_CLIENT_CA_FILE": ("attnserve-tls", "ca.crt"),
                "ATTNSERVE_API_KEYS_FILE": ("attnserve-api-keys", "api-keys")}
    for name, (secret, key) in expected.items():
        folder, _, file = variables[name].rpartition("/")
        assert (mounts.get(folder), file) == (secret, key), name
    assert not any("subPath" in m for m in c["volumeMounts"])  # a subPath mount never sees a rotation
    assert "ATTNSERVE_API_KEYS" not in variables  # keys come from the re-read file, not a variable
    # /metrics speaks mutual TLS: the scrape is https with a CA, a client certificate and its key.
    (endpoint,) = manifests["tls"]["ServiceMonitor/attnserve"]["spec"]["endpoints"]
    assert endpoint["scheme"] == "https"
    tls = endpoint["tlsConfig"]
    assert tls["serverName"] and not tls.get("insecureSkipVerify")
    assert {tls["ca"]["secret"]["key"], tls["cert"]["secret"]["key"], tls["keySecret"]["key"]} == {
        "ca.crt", "tls.crt", "tls.key"}
    # The grpc ports are no longer cleartext HTTP/2, nor the HTTP API's plain HTTP.
    for service in ("Service/attnserve", "Service/attnserve-headless"):
        assert all(p.get("appProtocol") not in ("kubernetes.io/h2c", "http")
                   for p in manifests["tls"][service]["spec"]["ports"])
    assert {p["name"]: p.get("appProtocol") for p in manifests["tls"]["Service/attnserve"]["spec"]["ports"]}["http"] == "https"
    # The cpu overlay is untouched.
    assert "ATTNSERVE_TLS_CERT_FILE" not in env(manifests, "cpu")
    assert "scheme" not in manifests["cpu"]["ServiceMonitor/attnserve"]["spec"]["endpoints"][0]
